# %% [markdown]
# # Flow matching
#
# > The interpolant, its velocity, the timestep distribution and the loss — pure functions the trainer, the evaluation and the tests share.

# %%
#| default_exp flow

# %%
#| export
from __future__ import annotations
from typing import Callable
import jax, jax.numpy as jnp
import numpy as np

from fsdit.config import ModelConfig, TrainConfig, check_align
from fsdit.conds import conditioning
from fsdit.utils import LatentScaling, l2_normalize

# %%
import optax
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config
from fsdit.dit import DiT, init_params, example_cond


# %% [markdown]
# ## The straight path
#
# Rectified flow / flow matching with a linear interpolant between noise $\varepsilon \sim N(0, I)$ at
# $t = 0$ and data $x_1$ at $t = 1$:
#
# $$x_t = (1 - t)\,\varepsilon + t\,x_1, \qquad \frac{d x_t}{dt} = v = x_1 - \varepsilon.$$
#
# The network $v_\theta(x_t, t, c)$ regresses $v$ with a mean-squared error; at the optimum it is
# $E[x_1 - \varepsilon \mid x_t, c]$, the velocity of an ODE that carries noise to the data
# distribution (Lipman et al. 2022; Liu et al. 2022). The sampler integrates that ODE from $t=0$ to 1.

# %%
#| export
def _bcast(t, x):
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))               # (B,) -> (B, 1, 1, 1)


def interpolate(x1, eps, t):
    "`x_t = (1 - t) eps + t x1`, with `t (B,)` broadcast over the other axes."
    t = _bcast(jnp.asarray(t, x1.dtype), x1)
    return (1 - t) * eps + t * x1


def velocity_target(x1, eps):
    "The straight path's velocity `x1 - eps` (independent of t)."
    return x1 - eps


# %%
k1, k2 = jax.random.split(jax.random.PRNGKey(0))
x1, eps = jax.random.normal(k1, (4, 8, 8, 3)), jax.random.normal(k2, (4, 8, 8, 3))
test_close(interpolate(x1, eps, jnp.zeros(4)), eps); test_close(interpolate(x1, eps, jnp.ones(4)), x1)
h = 1e-3; t0 = jnp.full(4, 0.3)   # the target is the path's derivative
test_close((interpolate(x1, eps, t0 + h) - interpolate(x1, eps, t0)) / h, velocity_target(x1, eps), eps=1e-2)


# %% [markdown]
# ## Timesteps
#
# The seed draws $t = \mathrm{sigmoid}(n)$, $n \sim N(0, 1)$ (logit-normal, Esser et al. 2024), which
# spends more of the training on the middle of the path than `uniform`.

# %%
#| export
def shift_t(t, shift: float = 1.0):
    "Move times toward the noise (t=0): `t / (t + shift (1 - t))`, SD3's resolution shift; `shift=1` leaves `t` as it is."
    return t if shift == 1.0 else t / (t + shift * (1 - t))


def sample_t(key, shape, mode: str = 'logit_normal', shift: float = 1.0):
    "Training timesteps in (0, 1): `'logit_normal'` = sigmoid(N(0, 1)), or `'uniform'`; then `shift_t(t, shift)`."
    if mode == 'logit_normal': t = jax.nn.sigmoid(jax.random.normal(key, shape))
    elif mode == 'uniform': t = jax.random.uniform(key, shape)
    else: raise ValueError(f"t sampling must be 'logit_normal' or 'uniform', got {mode!r}")
    return shift_t(t, shift)


# %%
ts = np.asarray(sample_t(jax.random.PRNGKey(0), (20_000,)))
assert 0 < ts.min() and ts.max() < 1 and abs(np.median(ts) - 0.5) < 0.01
assert ((ts > 0.25) & (ts < 0.75)).mean() > 0.65        # uniform would give 0.5
tu = np.asarray(sample_t(jax.random.PRNGKey(0), (20_000,), 'uniform'))
assert abs(((tu > 0.25) & (tu < 0.75)).mean() - 0.5) < 0.02

# %% [markdown]
# A shift $S > 1$ spends more of training near the noise, where a larger image (more values per token) is
# still legible after more noise is added (SD3, section 5.3.2). It is a bijection of (0, 1) that keeps the
# order of times and moves the median from 1/2 to $1/(1+S)$; the sampler's grid stays uniform (on the glyph
# demo, sampling the shifted model on the shifted grid left coloured speckle on the paper, the uniform grid
# did not, and the judge's figures were the same: BENCHMARKS.md section 8).

# %%
S = 2.6
tsh = np.asarray(sample_t(jax.random.PRNGKey(0), (20_000,), shift=S))
test_close(tsh, ts / (ts + S * (1 - ts)), eps=1e-6)
assert abs(np.median(tsh) - 1 / (1 + S)) < 0.01 and (np.diff(np.asarray(shift_t(jnp.linspace(0, 1, 11), S))) > 0).all()
assert shift_t(ts, 1.0) is ts and float(shift_t(jnp.float32(1.0), S)) == 1.0 and float(shift_t(jnp.float32(0.0), S)) == 0.0


# %% [markdown]
# ## Loss, overall and per t-bin
#
# The per-example loss is the MSE over every non-batch axis. To see where along the path the model is
# weak, the loss is also reported in 10 bins of $t$ as a **sum and a count** per bin; a mean per bin is
# `sum / count` after summing both over devices and steps, and NaN for a bin that saw no example.
# (The seed averaged per-device bin *means* in which an empty bin counted as 0: with logit-normal $t$
# the edge bins are often empty on a device's 16 examples, so their logged loss was several times too
# low.)

# %%
#| export
def per_example_loss(v_pred, v_target):
    "MSE over all non-batch axes, in float32: `(B,)`."
    d = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
    return d.reshape(d.shape[0], -1).mean(axis=1)


def t_bin_stats(loss, t, n_bins: int = 10):
    "Per-bin `(sums, counts)`, each `(n_bins,)`, of the per-example `loss (B,)` binned by `t (B,)` in [0, 1]."
    idx = jnp.clip(jnp.floor(t * n_bins).astype(jnp.int32), 0, n_bins - 1)
    sums = jax.ops.segment_sum(loss.astype(jnp.float32), idx, num_segments=n_bins)
    counts = jax.ops.segment_sum(jnp.ones_like(loss, jnp.float32), idx, num_segments=n_bins)
    return sums, counts


def bin_means(sums, counts):
    "Mean loss per bin: `sums / counts`, NaN where a bin is empty."
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# %%
loss = jnp.array([1., 2., 3., 4., 6.]); tt = jnp.array([0.05, 0.5, 0.55, 0.99, 1.0])
s, n = t_bin_stats(loss, tt)
test_eq(np.asarray(n), [1, 0, 0, 0, 0, 2, 0, 0, 0, 2])
m = bin_means(s, n)
test_eq(m[[0, 5, 9]], [1., 2.5, 5.]); assert np.isnan(m[1:5]).all()
test_close(np.nansum(m * np.asarray(n)) / np.asarray(n).sum(), float(loss.mean()))   # count-weighted = overall


# %% [markdown]
# ## The loss function
#
# One pure function from a batch to the loss, reused by the trainer (under `jax.grad`) and the
# validation loop. It draws $\varepsilon$ and $t$ from `key` unless they are given (the tests fix them),
# and returns the per-example loss and $t$ so the caller can form t-bin statistics across devices.
# `apply_fn` is `DiT(cfg).apply`; `drop (B,)` marks the examples whose condition is replaced by the
# null condition (CFG training).

# %%
#| export
def flow_loss(apply_fn: Callable, params, x1, cond: dict, drop=None, *, key=None, eps=None, t=None,
              t_sampling: str = 'logit_normal', t_shift: float = 1.0, intermediates: bool = False):
    "Flow-matching MSE of `apply_fn` on targets `x1 (B, H, W, C)`: `(mean loss, {'loss': (B,), 't': (B,), 'intermediates'})`."
    if eps is None or t is None:
        assert key is not None, 'flow_loss needs `key` unless both `eps` and `t` are given'
        k_eps, k_t = jax.random.split(key)
        eps = jax.random.normal(k_eps, x1.shape, x1.dtype) if eps is None else eps
        t = sample_t(k_t, x1.shape[:1], t_sampling, t_shift) if t is None else t
    out = apply_fn({'params': params}, interpolate(x1, eps, t), t, cond, drop,
                   **({'return_intermediates': True} if intermediates else {}))
    v, inter = out if intermediates else (out, {})
    loss = per_example_loss(v, velocity_target(x1, eps))
    return loss.mean(), {'loss': loss, 't': t, 'intermediates': inter}


# %% [markdown]
# The loss of the true velocity is zero, and a fresh DiT (which outputs 0) has loss $E|x_1 - \varepsilon|^2$:

# %%
true_v = lambda variables, x, t, cond, drop: velocity_target(x1, eps)
l0, aux = flow_loss(true_v, None, x1, {}, eps=eps, key=jax.random.PRNGKey(1))   # t drawn from the key
test_eq(float(l0), 0.0); test_eq(aux['loss'].shape, (4,)); test_eq(aux['t'].shape, (4,))

cfg = model_config('mu')
params = init_params(cfg, jax.random.PRNGKey(0))
apply = DiT(cfg).apply
xb = jax.random.normal(jax.random.PRNGKey(3), (4, 28, 28, 4))
cond = example_cond(cfg, 4)
e0, t0 = jax.random.normal(jax.random.PRNGKey(4), xb.shape), sample_t(jax.random.PRNGKey(5), (4,))
lf, aux = flow_loss(apply, params, xb, cond, eps=e0, t=t0)
test_close(float(lf), float(jnp.mean(jnp.square(xb - e0))), eps=1e-5)
s, n = t_bin_stats(aux['loss'], aux['t'])
test_close(float(np.nansum(bin_means(s, n) * np.asarray(n)) / 4), float(lf), eps=1e-5)


# %% [markdown]
# ## Randomness keyed by example, not by device
#
# Every random number of a step — $t$, the noise $\epsilon$, the CFG drop, the posterior sample and the
# mirror choice — comes from a key that depends only on the step and the example's index in the *global*
# batch: `fold_in(fold_in(key, step), index)`. The step is one program over the global batch (`jax.jit` with
# shardings), so the index is the example's place in that batch whichever device holds it: 1 device, 8 devices
# or 2 processes draw the same numbers for the same example and a run does not depend on how its batch is split.
# (The seed split one key per device and reused one fixed key for the VAE posterior noise.)

# %%
#| export
def example_keys(key: jax.Array, step, n: int) -> jax.Array:
    "Keys (n, 2) for the n examples of the global batch: fold_in(fold_in(key, step), example index)."
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(n))



# %%
k = example_keys(jax.random.PRNGKey(0), 3, 4)                         # one device: examples 0..3
test_eq(k.shape, (4, 2)); assert len({tuple(np.asarray(r)) for r in k}) == 4
test_eq(np.asarray(example_keys(jax.random.PRNGKey(0), 3, 4)), np.asarray(k))                     # a pure function of (key, step, index)
assert not np.array_equal(np.asarray(example_keys(jax.random.PRNGKey(0), 4, 4)), np.asarray(k))  # a new step, new numbers


# %% [markdown]
# On the device a batch becomes the model's inputs. The target latent is a fresh posterior sample of the
# mirror state chosen at random (the seed's flip augmentation; `TrainConfig.mirror=False` turns it off for
# data such as characters, where a mirror image is another class), $x_1 = (\mu + e^{\frac12 \log\sigma^2} n)\cdot s$, where $s$ is the VAE's scaling
# factor as the feature store records it (0.18215 for the SD-VAE, 0.13025 for the SDXL VAE, 1 in pixel
# mode, where the store holds the image as $\mu$ with $\log\sigma^2 = -30$), applied by the
# `fsdit.utils.LatentScaling` the store hands out; the support embedding is the mean of the K support
# embeddings, in float32. The support latents of the `aligned` and `context`
# conditionings are scaled the same way. $t$ is not clipped: the original clipped it at 0.99 inside the
# interpolant (from jax-flow) to keep away from $t = 1$, but `sample_t` never returns 1 for float32
# (logit-normal reaches it only for $n > 17$), so the clip would only bias the top percent of the path.

# %%
#| export
def condition(batch: dict, mc: ModelConfig, scaling: LatentScaling) -> dict:
    "The model's condition from a batch (`fsdit.conds`): mean support embedding (B, D), labels (B,), scaled support latents."
    return conditioning(mc).inputs(batch, scaling)


def model_inputs(batch: dict, keys: jax.Array, mc: ModelConfig, tc: TrainConfig, scaling: LatentScaling, train: bool = True):
    "Target x1 (B, h, w, c), t (B,), noise (B, h, w, c), CFG drop (B,) and condition, each example from its own key."
    def one(key, moments):  # moments (2 mirror, 2 [mean, logvar], h, w, c)
        kt, keps, kdrop, knoise, kmirror = jax.random.split(key, 5)
        mean, logvar = moments[(jax.random.bernoulli(kmirror) & tc.mirror).astype(jnp.int32)].astype(jnp.float32)
        x1 = scaling.to_model(mean + jnp.exp(0.5 * logvar) * jax.random.normal(knoise, mean.shape))
        drop = jax.random.bernoulli(kdrop, mc.cfg_drop) & train
        return x1, sample_t(kt, (), tc.t_sampling, tc.t_shift), jax.random.normal(keps, mean.shape), drop
    x1, t, eps, drop = jax.vmap(one)(keys, batch['moments'])
    if train and tc.self_cond: batch = self_conditioned(batch, keys, tc.self_cond)
    return x1, t, eps, drop, condition(batch, mc, scaling)


def self_conditioned(batch: dict, keys: jax.Array, share: float) -> dict:
    """The batch with the support embeddings of a `share` of its episodes (each drawn from its own key) replaced by
    the target's own embedding, K times: those episodes teach the model what an embedding says about the image it
    came from. The supports' latents are left as they are."""
    own = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1), share))(keys)       # (B,)
    se = batch['support_embeds']
    mine = jnp.broadcast_to(batch['target_embeds'][:, None].astype(se.dtype), se.shape)
    return {**batch, 'support_embeds': jnp.where(own[:, None, None], mine, se)}


# %%
from fsdit.testing import synthetic_batch
mc, tc = model_config('mu'), train_config('test')
b = synthetic_batch(4, mc)
keys = example_keys(jax.random.PRNGKey(0), 3, 4)
inputs = jax.jit(model_inputs, static_argnums=(2, 3, 4))
x1, t, eps, drop, c_in = inputs(b, keys, mc, tc, LatentScaling(0.18215))
test_eq((x1.shape, t.shape, eps.shape, drop.shape, c_in['support_embed'].shape), ((4, 28, 28, 4), (4,), (4, 28, 28, 4), (4,), (4, 768)))
assert x1.dtype == c_in['support_embed'].dtype == jnp.float32 and bool(((t > 0) & (t < 1)).all())
# each example's numbers come with its key, wherever it sits in the batch
rev = inputs({k: v[::-1] for k, v in b.items()}, keys[::-1], mc, tc, LatentScaling(0.18215))
test_eq(np.asarray(rev[0][::-1]), np.asarray(x1)); test_eq(np.asarray(rev[1][::-1]), np.asarray(t))
# pixel mode: logvar -30 makes the posterior sample the stored image itself (one of its two mirror states)
pb = synthetic_batch(4, mc, space='pixel')
x1p = np.asarray(inputs(pb, keys, mc, tc, LatentScaling())[0])[:, None]
assert np.all(np.isclose(x1p, pb['moments'][:, :, 0].astype(np.float32), atol=1e-5).all((2, 3, 4)).any(1))
# without the mirror augmentation (glyphs: a mirrored character is another character) the target is never flipped
x1u = np.asarray(inputs(pb, keys, mc, train_config('test', mirror=False), LatentScaling())[0])
test_close(x1u, pb['moments'][:, 0, 0].astype(np.float32), eps=1e-5)
# self-conditioning: a share of the episodes see the target's own embedding as every support's; none at evaluation
sb = {**b, 'target_embeds': np.random.default_rng(1).normal(size=(4, 768)).astype(np.float32)}
k64 = example_keys(jax.random.PRNGKey(0), 3, 64)
sb64 = {k: np.concatenate([v] * 16) for k, v in sb.items()}
half = self_conditioned(sb64, k64, 0.5)['support_embeds']
own = np.all(np.asarray(half) == sb64['target_embeds'].astype(half.dtype)[:, None], axis=(1, 2))   # in the store's dtype
kept = np.all(np.asarray(half) == sb64['support_embeds'], axis=(1, 2))
assert (own | kept).all() and 16 < own.sum() < 48, own.sum()
tc_s = train_config('test', self_cond=0.5)
test_close(model_inputs(sb, keys, mc, tc_s, LatentScaling(0.18215), train=False)[4]['support_embed'], c_in['support_embed'])


# %% [markdown]
# The trainer's loss is `flow_loss` on those inputs: `loss_fn` is what `jax.grad` differentiates in the train
# step and what the validation step evaluates, so the invariants above hold for the code that trains.
#
# **A representation loss beside it (REPA-style, off by default).** REPA (Yu et al., 2024) speeds up a DiT's
# training by pulling its hidden tokens, through a small MLP, toward a frozen encoder's features of the clean
# image. The store keeps one pooled embedding per image (the one the supports are conditioned on), so here the
# head reads the *mean* target token after `mc.align_depth` blocks and is pulled toward the target image's own
# embedding: `align_loss = mean(1 - cos(head, e_target))`, added with weight `tc.align_weight` in training only.
# The DiT then has to recognise, from the noisy target, what the encoder would say about it — in the space the
# supports' embeddings condition it from. The head's output is `sow`n (`'intermediates'`), so sampling, which
# does not ask for it, never computes it.

# %%
#| export
def align_loss(z, target_embed):
    "Mean over the batch of `1 - cos(z, e)`: the head's output `z (B, S)` against the targets' embeddings `e (B, S)`."
    cos = jnp.sum(l2_normalize(z.astype(jnp.float32), eps=1e-6) * l2_normalize(target_embed.astype(jnp.float32), eps=1e-6), -1)
    return jnp.mean(1 - cos)


def loss_fn(params, model, batch: dict, keys: jax.Array, mc: ModelConfig, tc: TrainConfig, scaling: LatentScaling,
            train: bool = True, intermediates: bool = False):
    "The objective of a device batch: `(flow loss [+ align_weight x align_loss], {'loss': (B,), 't': (B,), 'intermediates'[, 'align']})`."
    x1, t, eps, drop, cond = model_inputs(batch, keys, mc, tc, scaling, train)
    if not (train and tc.align_weight):
        return flow_loss(model.apply, params, x1, cond, drop, eps=eps, t=t, intermediates=intermediates)
    check_align(mc, tc)
    head = []                                           # the sown head output, caught while flow_loss applies the model
    def apply(variables, *args, **kw):
        out, state = model.apply(variables, *args, mutable=['intermediates'], **kw)
        head.append(state['intermediates']['align'][0]); return out
    loss, aux = flow_loss(apply, params, x1, cond, drop, eps=eps, t=t, intermediates=intermediates)
    align = align_loss(head[0], batch['target_embeds'])
    return loss + tc.align_weight * align, dict(aux, align=align)


# %%
params = init_params(mc, jax.random.PRNGKey(0))                       # a fresh DiT outputs 0: loss = E|x1 - eps|^2
l, aux = jax.jit(loss_fn, static_argnums=(1, 4, 5, 6))(params, DiT(mc), b, keys, mc, tc, LatentScaling(0.18215))
test_close(float(l), float(jnp.mean(jnp.square(x1 - eps))), eps=1e-5); test_eq(aux['t'], t)
_, aux_i = loss_fn(params, DiT(mc), b, keys, mc, tc, LatentScaling(0.18215), train=False, intermediates=True)
test_eq(aux_i['intermediates']['attn_entropy'].shape, (mc.depth, mc.heads))

# %% [markdown]
# With the representation loss on, the objective is the flow loss plus `align_weight` times `align_loss`, whose
# value at a fresh head is near 1 (a random direction); the validation loss (`train=False`) stays the flow loss
# alone, and gradients reach the head and the blocks below it:

# %%
amc, atc = model_config('mu', align_depth=1), train_config('test', align_weight=0.5)
aparams = init_params(amc, jax.random.PRNGKey(0))
test_eq(aparams['align_head']['out']['kernel'].shape, (2 * amc.hidden, amc.support_dim))
afn = jax.jit(loss_fn, static_argnums=(1, 4, 5, 6, 7))
(la, auxa), ga = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 4, 5, 6, 7))(
    aparams, DiT(amc), b, keys, amc, atc, LatentScaling(0.18215), True)
test_close(float(la), float(aux['loss'].mean()) + 0.5 * float(auxa['align']), eps=1e-5)   # a fresh DiT: the same flow loss
assert 0.5 < float(auxa['align']) < 1.5
lv, auxv = afn(aparams, DiT(amc), b, keys, amc, atc, LatentScaling(0.18215), False)
test_close(float(lv), float(l), eps=1e-5); assert 'align' not in auxv
assert all(float(jnp.abs(g).max()) > 0 for g in (ga['align_head']['out']['kernel'], ga['x_embed']['proj']['kernel'],
                                                    ga['block_0']['adaLN']['kernel']))   # (a fresh block's gates are 0)
# the head's own target: a head that returns the target's embedding scores 0
test_close(float(align_loss(b['target_embeds'] * 3.0, b['target_embeds'])), 0.0, eps=1e-3)
test_fail(lambda: loss_fn(params, DiT(mc), b, keys, mc, atc, LatentScaling(0.18215)), contains='model.align_depth')

# %% [markdown]
# ## A `mu` DiT fits a batch
#
# With $(\varepsilon, t)$ fixed the regression is deterministic, and Adam (lr 1e-2, cosine decay) drives the loss to below
# 1/1000 of its start within 300 steps (`fsdit.testing.fit_step` is that Adam step on `flow_loss`). (With fresh noise every step the loss must still fall at least
# 10x within 2,000 steps at lr 1e-3 (on spatially smooth targets, like real latents); that longer run
# lives in `tests/test_model.py`.)

# %%
from fsdit.testing import fit_step
opt = optax.adam(optax.cosine_decay_schedule(1e-2, 300))   # decaying lr: converges, not oscillates
step, p, st = fit_step(apply, opt), params, opt.init(params)
xs, cs = xb[:2], jax.tree_util.tree_map(lambda a: a[:2], cond)
losses = []
for i in range(300):
    p, st, l = step(p, st, xs, cs, jax.random.PRNGKey(i), e0[:2], t0[:2])
    losses.append(float(l))
print(f'{losses[0]:.3f} -> {losses[-1]:.2e}')
assert losses[-1] < 1e-3 * losses[0]
