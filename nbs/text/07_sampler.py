# %% [markdown]
# # Sampler
#
# > Euler and Heun integration of the learned ODE from noise (t=0) to data (t=1), with classifier-free guidance as one doubled batch — the whole loop one compiled program.

# %%
#| default_exp sampler

# %%
#| export
from __future__ import annotations
import functools
from functools import partial
from dataclasses import dataclass
from typing import Any, Callable
import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from fsdit.config import GUIDE_UPTO, ModelConfig, check_guidance, check_interval, check_start
from fsdit.dit import DiT
from fsdit.conds import conditioning
from fsdit.flow import condition
from fsdit.utils import data_mesh, DATA_AXIS, LatentScaling, l2_normalize

# %%
import numpy as np
from fastcore.test import test_eq, test_close
from fsdit.config import model_config
from fastcore.test import test_fail
from fsdit.dit import DiT, init_params, example_cond
from fsdit.testing import perturb


# %% [markdown]
# ## Integrating the ODE
#
# Sampling solves $dx/dt = v_\theta(x, t)$ from $x_0 = \varepsilon$ to $t = 1$ in `steps` equal steps
# $h = 1/N$. Euler: $x_{i+1} = x_i + h\,v(x_i, t_i)$. Heun (explicit trapezoid, two evaluations per
# step): $\tilde x = x_i + h\,v(x_i, t_i)$, $x_{i+1} = x_i + \tfrac h2\,[v(x_i, t_i) + v(\tilde x, t_{i+1})]$.
# The loop is a `lax.fori_loop`, so under `jit` it is one program with no host round trip per step
# (the seed ran a Python loop of 50 pmap calls). The increments are summed with Kahan compensation, so
# float32 rounding does not pile up over the steps (plain summation drifts by ~5e-6 over 50 steps of a
# constant field; compensated, the result is exact to 1e-6 at any step count) — a few elementwise ops
# per step, nothing beside a DiT evaluation.

# %%
#| export
def integrate(velocity_fn: Callable, x0, steps: int, method: str = 'euler', start: int = 0):
    "Integrate `dx/dt = velocity_fn(x, t)` (t a float32 scalar) from t = `start`/`steps` (0: noise) to 1 in steps of 1/`steps`; traceable."
    if method not in ('euler', 'heun'): raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    h = 1.0 / steps

    def body(i, carry):
        x, comp = carry
        t = i.astype(jnp.float32) / steps
        v = velocity_fn(x, t)
        if method == 'heun': v = 0.5 * (v + velocity_fn(x + h * v, (i + 1).astype(jnp.float32) / steps))
        y = h * v - comp                      # compensated (Kahan) sum of the increments
        s = x + y
        return s, (s - x) - y

    return jax.lax.fori_loop(start, steps, body, (x0, jnp.zeros_like(x0)))[0]


# %% [markdown]
# Both are exact on a constant field; on a curved one Heun's error is far smaller (second order):

# %%
x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
c = jnp.linspace(-2, 2, 96).reshape(2, 4, 4, 3)

@jax.jit
def cases(x0):
    return {'const': {(m, n): integrate(lambda x, t: c, x0, n, m) for m in ('euler', 'heun') for n in (7, 50)},
            'exp': {m: integrate(lambda x, t: x, x0, 20, m) for m in ('euler', 'heun')},   # dx/dt = x
            'lin_t': integrate(lambda x, t: 2 * t * jnp.ones_like(x), x0, 10, 'heun')}     # dx/dt = 2t

r = cases(x0)
for xc in r['const'].values(): test_close(xc, x0 + c, eps=1e-6)
err = {m: float(jnp.abs(r['exp'][m] - x0 * np.e).max()) for m in ('euler', 'heun')}
assert err['heun'] < err['euler'] / 20, err
test_close(r['lin_t'], x0 + 1, eps=1e-6)   # the trapezoid rule is exact for v linear in t
# from t = start / steps: a constant field moves x by (1 - 3/10) c, and dx/dt = 2t from t = 0.3 adds 1 - 0.09
test_close(jax.jit(lambda x: integrate(lambda x, t: c, x, 10, 'euler', start=3))(x0), x0 + 0.7 * c, eps=1e-6)
test_close(jax.jit(lambda x: integrate(lambda x, t: 2 * t * jnp.ones_like(x), x, 10, 'heun', start=3))(x0), x0 + 0.91, eps=1e-6)


# %% [markdown]
# ## Classifier-free guidance
#
# The model is trained with the condition replaced by the null condition 10% of the time, so the same
# network gives a conditional $v_c = v_\theta(x, t, c)$ and an unconditional $v_u = v_\theta(x, t, \varnothing)$
# velocity. Guidance extrapolates from one to the other:
#
# $$v = v_u + s\,(v_c - v_u),$$
#
# $s = 1$ is the conditional model, $s = 0$ the unconditional one, $s > 1$ trades diversity for fidelity
# to the condition (the seed samples at $s = 3$). Both halves come from **one** call on a doubled
# batch: inputs repeated, `drop = [False]*B + [True]*B`.
#
# **A guidance interval.** Guidance need not act all along the path. With `interval = (lo, hi)` the scale $s$
# applies where $lo \le t \le hi$ and the plain conditional velocity ($s = 1$) elsewhere (t = 0 is noise, t = 1
# data; the velocity is evaluated at $t_i = i/N$, so the interval acts on whole steps). Guiding only part of the
# path is Kynkäänniemi et al., *Applying Guidance in a Limited Interval Improves Sample and Distribution Quality
# in Diffusion Models* (2024): at high noise guidance pulls every sample toward the same few shapes and away
# from the data's distribution, for little gain in fidelity to the condition. On the glyph demo's validation
# classes (`bench/demo_cfg.py`, the 1,100-step run), guidance over the last 40% of the path (t >= 0.6) at scale 8
# reaches class consistency 68.4% at glyph-FD 35.6, against 64.8% and 47.3 for scale 3 all along (real images:
# 81.4%, floor 20.2). Leaving out the *end* of the path instead costs consistency; see BENCHMARKS.md.

# %%
#| export
def guided_velocity(apply_fn: Callable, params, cond: dict, cfg_scale=3.0, interval=(0.0, 1.0)) -> Callable:
    """`(x, t) -> v_u + s (v_c - v_u)` from one doubled-batch call, s = `cfg_scale` for t in `interval` = (lo, hi)
    (both ends included) and 1 (the conditional velocity) elsewhere; `cfg_scale=None`: conditional only."""
    if cfg_scale is None:
        return lambda x, t: apply_fn({'params': params}, x, jnp.full(x.shape[:1], t), cond)
    cond2 = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), cond)

    def v(x, t):
        B = x.shape[0]
        drop = jnp.arange(2 * B) >= B                                        # [F]*B + [T]*B
        out = apply_fn({'params': params}, jnp.concatenate([x, x]), jnp.full((2 * B,), t), cond2, drop)
        v_c, v_u = out[:B], out[B:]
        s = jnp.where((t >= interval[0]) & (t <= interval[1]), cfg_scale, 1.0)
        return v_u + s * (v_c - v_u)

    return v


# %% [markdown]
# The sampler can also add *encoder guidance* (`encoder_guided`), explained with its example under **Encoder guidance** below.

# %%
#| export
@dataclass(frozen=True, eq=False)
class Guide:
    "The frozen encoder seen through the decoder: `fn(params, x)` -> unit embeddings (B, E) of the model's latents `x`."
    fn: Callable          # traceable; the same object for the same codecs, so the compiled sampler is reused
    params: Any = None    # its weights (a pytree of arrays: traced, not baked into the program)


def encoder_guided(velocity_fn: Callable, guide_fn: Callable, guide_params, target, scale, upto) -> Callable:
    """`(x, t) -> v + scale g / (1 - t)` for t <= `upto` (the plain `v` after), g the unit-RMS gradient with respect to x
    of cos(guide(x + (1 - t) v(x, t)), target): through the model's estimate of the clean sample."""
    def guided(x, t):
        def sim(x):
            u = velocity_fn(x, t)
            return (guide_fn(guide_params, x + (1 - t) * u) * target).sum(), u   # a sum of per-sample cosines
        (_, u), g = jax.value_and_grad(sim, has_aux=True)(x)
        g = g / (jnp.sqrt(jnp.mean(g ** 2, axis=tuple(range(1, g.ndim)), keepdims=True)) + 1e-12)
        return u + scale * g / jnp.maximum(1 - t, 1e-3)

    return lambda x, t: jax.lax.cond(t <= upto, guided, velocity_fn, x, t)   # no gradient computed past `upto`


# %%
#| export
class _ModuleApply:
    "A module's `apply` that equals the `apply` of an equal module (bound methods compare by identity)."
    def __init__(self, module): self.module = module
    def __call__(self, *args, **kwargs): return self.module.apply(*args, **kwargs)
    def __eq__(self, other): return isinstance(other, _ModuleApply) and other.module == self.module
    def __hash__(self): return hash(self.module)


def _static(apply_fn):
    m = getattr(apply_fn, '__self__', None)
    return _ModuleApply(m) if isinstance(m, nn.Module) and getattr(apply_fn, '__name__', '') == 'apply' else apply_fn


@partial(jax.jit, static_argnames=('apply_fn', 'steps', 'method', 'guide_fn', 'i0'))
def _sample(apply_fn, params, noise, cond, cfg_scale, interval, steps, method, guide_fn=None, guide=None, i0=0):
    v = guided_velocity(apply_fn, params, cond, cfg_scale, interval)
    if guide_fn is not None: v = encoder_guided(v, guide_fn, *guide)
    return integrate(v, noise, steps, method, i0)


def start_noise(noise, init, start: float, steps: int):
    """The first step's index i0 = round(`start` x `steps`) and the sample there, t0 x init + (1 - t0) x noise with
    t0 = i0 / steps: the flow's own interpolation at t0, so the sampler goes on from a noised `init` (SDEdit)."""
    check_start(start)
    i0 = int(round(start * steps))
    if not i0: return 0, noise
    if init is None: raise ValueError("starting from a support (start > 0) needs init: one latent per sample, in the model's scale")
    if np.shape(init) != np.shape(noise):
        raise ValueError(f"init must have the noise's shape {tuple(np.shape(noise))}, got {tuple(np.shape(init))}")
    t0 = i0 / steps
    return i0, t0 * jnp.asarray(init, jnp.float32) + (1 - t0) * noise


def sample(apply_fn: Callable, params, noise, cond: dict, *, steps: int = 50, cfg_scale=3.0, method: str = 'euler',
           cfg_interval=(0.0, 1.0), guide: Guide | None = None, target=None, guide_scale: float = 0.0,
           guide_upto: float = GUIDE_UPTO, init=None, start: float = 0.0):
    """Generate from `noise (B, H, W, C)` at t=0 to t=1 with CFG at `cfg_scale` where `cfg_interval[0] <= t <= cfg_interval[1]`,
    and with `guide_scale > 0` encoder guidance towards `target (B, E)` (see `encoder_guided`); with `start > 0` from
    `init (B, H, W, C)` noised to t = `start` (see `start_noise`); one compiled program per (model, shapes, steps, method,
    guide, start)."""
    if cfg_scale is not None: cfg_scale = jnp.asarray(cfg_scale, jnp.float32)   # traced: a new scale does not recompile
    interval = jnp.asarray(check_interval(cfg_interval), jnp.float32)           # nor does a new interval
    i0, x0 = start_noise(noise, init, start, steps)
    if not guide_scale: return _sample(_static(apply_fn), params, x0, cond, cfg_scale, interval, steps, method, i0=i0)
    check_guidance(guide_scale, guide_upto)
    if guide is None or target is None: raise ValueError("encoder guidance needs the guide (the run's codecs) and a target embedding")
    if np.shape(target)[0] != noise.shape[0]:
        raise ValueError(f"one target embedding per sample: got {np.shape(target)[0]} targets for {noise.shape[0]} samples")
    return _sample(_static(apply_fn), params, x0, cond, cfg_scale, interval, steps, method, guide.fn,
                   (guide.params, jnp.asarray(target, jnp.float32), jnp.float32(guide_scale), jnp.float32(guide_upto)), i0=i0)


# %% [markdown]
# With a `mu` DiT (perturbed away from its all-zero start), guidance at $s = 1$ reproduces the
# conditional sampler and $s = 0$ the unconditional one:

# %%
cfg = model_config('mu')
params = perturb(init_params(cfg, jax.random.PRNGKey(0)))
apply = DiT(cfg).apply
noise = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 4))
cond = example_cond(cfg, 2)

# reference: the plain model integrated on [noise, noise] with drop = [F, F, T, T] -> [conditional; unconditional]
cond2 = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), cond)
drop2 = jnp.array([False, False, True, True])
ref = jax.jit(lambda p, n: integrate(lambda x, t: apply({'params': p}, x, jnp.full(4, t), cond2, drop2), n, 4))(
    params, jnp.concatenate([noise, noise]))
x_c, x_u = ref[:2], ref[2:]
test_close(sample(apply, params, noise, cond, steps=4, cfg_scale=1.0), x_c, eps=1e-5)
test_close(sample(apply, params, noise, cond, steps=4, cfg_scale=0.0), x_u, eps=1e-5)
x3 = sample(apply, params, noise, cond, steps=4)
test_eq(x3.shape, noise.shape); assert np.isfinite(np.asarray(x3)).all()
assert not np.allclose(x3, x_c, atol=1e-4)


# %% [markdown]
# A guidance interval switches the scale per step. Against a plain Euler loop written out by hand (scale 1 at
# t = 0 and 1/4, scale 3 at t = 1/2 and 3/4), and at its two ends: the whole path is the default, and an
# interval no Euler step reaches (t = 1 is never evaluated) is the conditional sampler.

# %%
def by_hand(s_of_t, n=4):
    x = noise
    for i in range(n):
        t = i / n
        out = apply({'params': params}, jnp.concatenate([x, x]), jnp.full(4, t), cond2, drop2)
        x = x + (out[2:] + s_of_t(t) * (out[:2] - out[2:])) / n
    return x

test_close(sample(apply, params, noise, cond, steps=4, cfg_interval=(0.5, 1.0)), by_hand(lambda t: 3.0 if t >= 0.5 else 1.0), eps=1e-5)
test_close(sample(apply, params, noise, cond, steps=4, cfg_interval=(0.0, 1.0)), x3, eps=1e-6)
test_close(sample(apply, params, noise, cond, steps=4, cfg_interval=(1.0, 1.0)), x_c, eps=1e-5)
test_fail(lambda: sample(apply, params, noise, cond, cfg_interval=(0.8, 0.2)), contains='0 <= lo <= hi <= 1')
test_fail(lambda: sample(apply, params, noise, cond, cfg_interval=0.5), contains='two times')

# %% [markdown]
# The scale and the interval are traced arguments and the model, steps and method are static: a new scale
# (the explorer's slider) or interval reuses the compiled program, and a fresh `DiT(cfg).apply` of an equal
# config is the same static argument.

# %%
n0 = _sample._cache_size()
sample(DiT(cfg).apply, params, noise, cond, steps=4, cfg_scale=5.0)
sample(DiT(cfg).apply, params, noise, cond, steps=4, cfg_scale=5.0, cfg_interval=(0.25, 0.75))
test_eq(_sample._cache_size(), n0)

# %% [markdown]
# ## Starting from a support (SDEdit)
#
# With `start = t0 > 0` the sampler does not begin at pure noise: it begins at the flow's own interpolation
# $x_{t_0} = t_0\,x_{\text{init}} + (1 - t_0)\,\varepsilon$ of an image `init` (one of the supports, in `generate`)
# and integrates from $t_0$ to 1 — Meng et al., *SDEdit* (2022), used for few-shot data by Trabucco et al.,
# *DA-Fusion* (2023). Below $t_0$ the noise has washed out the support's detail; what survives is its layout — where the
# subject sits, its size, its colours — and the model, conditioned on all K supports (and guided by the encoder, if
# asked), redraws the rest. Where the supports do not line up and the model has not learned to place the class by
# itself, this hands it a place to draw (BENCHMARKS §8 measures how far the samples then sit from their supports).
# `t0` is rounded to the sampler's grid (`round(t0 * steps) / steps`), so the model is evaluated only at its usual times.

# %%
init = jax.random.normal(jax.random.PRNGKey(5), noise.shape)
def by_hand_from(init, t0_steps, n=4):
    x = (t0_steps / n) * init + (1 - t0_steps / n) * noise
    for i in range(t0_steps, n):
        out = apply({'params': params}, jnp.concatenate([x, x]), jnp.full(4, i / n), cond2, drop2)
        x = x + (out[2:] + 3.0 * (out[:2] - out[2:])) / n
    return x

test_close(sample(apply, params, noise, cond, steps=4, init=init, start=0.5), by_hand_from(init, 2), eps=1e-5)
test_close(sample(apply, params, noise, cond, steps=4, init=init, start=0.55), by_hand_from(init, 2), eps=1e-5)  # on the grid
test_close(sample(apply, params, noise, cond, steps=4, init=init, start=0.1), x3, eps=1e-6)     # rounds to 0: from noise
test_fail(lambda: sample(apply, params, noise, cond, steps=4, start=0.5), contains='needs init')
test_fail(lambda: sample(apply, params, noise, cond, steps=4, init=init[:1], start=0.5), contains="noise's shape")
test_fail(lambda: sample(apply, params, noise, cond, steps=4, init=init, start=1.0), contains='[0, 1)')

# %% [markdown]
# ## Encoder guidance
#
# The support encoder knows far more classes than the DiT has learned to draw: SigLIP2 was trained on web images,
# the unaligned glyph demo's stand-in on its own renderings of every class. Where the supports do not line up, the
# DiT trained at the demo's budget draws its class's texture but not its shape (BENCHMARKS §8). *Encoder guidance*
# puts the encoder's knowledge into each sampler step, as CLIP guidance does (Nichol et al., *GLIDE*, 2022;
# Bansal et al., *Universal Guidance for Diffusion Models*, 2023): the model's estimate of the clean sample,
# $\hat x_1 = x + (1 - t)\,v(x, t)$, is decoded and embedded by the frozen encoder, and the gradient $g$ of its cosine
# similarity to the supports' mean embedding with respect to $x$ (through the model, decoder and encoder; scaled to
# unit RMS per sample) moves that estimate by `scale` latent units:
#
# $$v \leftarrow v + \text{scale}\cdot\frac{g}{1 - t}\qquad\text{for } t \le \text{upto}.$$
#
# Guiding the early part of the path (t <= 0.7 by default) sets the shape; the model alone then draws the last
# steps, which keeps the paper flat (guided to the end, the gradient leaves an adversarial texture the encoder likes
# and no reader does). A `Guide` is the encoder after the decoder, `fn(params, x) -> unit embeddings`, traceable, with
# its frozen weights: `fsdit.codecs.Codecs.guide` builds it for a run. Guidance is off by default (scale 0).

# %% [markdown]
# On a toy guide — the mean of each sample's pixels, pushed towards +1 or -1 — guidance moves every sample the way
# its target asks, and scale 0 is the plain sampler exactly. Bad settings are refused before anything compiles.

# %%
toy = Guide(lambda p, x: jnp.stack([x.mean((1, 2, 3)), jnp.full(x.shape[:1], p)], -1) / jnp.sqrt(x.mean((1, 2, 3)) ** 2 + p ** 2)[:, None],
            jnp.float32(0.05))
target = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
plain = sample(apply, params, noise, cond, steps=4)
test_close(sample(apply, params, noise, cond, steps=4, guide=toy, target=target, guide_scale=0.0), plain, eps=1e-6)
up = sample(apply, params, noise, cond, steps=4, guide=toy, target=target, guide_scale=1.0, guide_upto=0.5)
shift = np.asarray(up - plain).mean((1, 2, 3))
assert shift[0] > 0.1 and shift[1] < -0.1, shift
test_fail(lambda: sample(apply, params, noise, cond, guide=toy, target=target, guide_scale=-1.0), contains='>= 0')
test_fail(lambda: sample(apply, params, noise, cond, guide=toy, target=target, guide_scale=1.0, guide_upto=1.0), contains='[0, 1)')
test_fail(lambda: sample(apply, params, noise, cond, guide_scale=1.0), contains='needs the guide')
test_fail(lambda: sample(apply, params, noise, cond, guide=toy, target=target[:1], guide_scale=1.0), contains='one target embedding per sample')


# %% [markdown]
# ## Generating
#
# `generate` draws one image per episode: the condition is built exactly as in training
# (`fsdit.flow.condition`: the mean of the K support embeddings; for `cond='context'` also the scaled
# support latents), the noise of episode *i* comes from `fold_in(key, i)` — so an image does not depend on
# the batch it was drawn in — and each batch is split over the local devices (padded to a multiple of
# them) and run through the compiled sampler. Latents come back in posterior space (`scaling.to_posterior`, the scaling the run trained at: `Run.scaling`).
#
# **How many supports.** Both support conditionings are defined for any K >= 1: `'support'` averages the K
# embeddings, `'context'` attends to any number of support tokens with no order. So a model trained on
# 5-shot episodes accepts 1 or 3 supports (the eval sweeps exactly that); quality at a K it was not trained
# on is what the eval measures. Zero supports, or supports given to a class-conditioned run, are errors.

# %%
#| export
def check_supports(mc: ModelConfig, k: int | None):
    "Raise `ValueError` unless the run's conditioning takes `k` supports."
    conditioning(mc).check_shots(k)


@functools.lru_cache(maxsize=8)
def _dit(mc: ModelConfig) -> DiT:
    "One module per config, so that the sampler's compiled function is reused across calls."
    return DiT(mc)


@functools.lru_cache(maxsize=8)
def _model_fn(fn: Callable, scale: float) -> Callable:
    "One function per (guide, scale), so that the compiled sampler is reused."
    return lambda p, x: fn(p, x / scale)


def _model_space_guide(guide: Guide, scale: float) -> Guide:
    "The guide of posterior latents seen from the model's latents (posterior x scale)."
    return Guide(_model_fn(guide.fn, float(scale)), guide.params)


def _noise(key, start: int, n: int, shape) -> jax.Array:
    "Per-example noise (n, *shape): example i from fold_in(key, start + i)."
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(jnp.arange(start, start + n))


def generate(params, mc: ModelConfig, support_embeds=None, support_latents=None, labels=None, *,
             scaling: LatentScaling = LatentScaling(), seed: int = 0, steps: int = 50, cfg_scale: float = 3.0,
             method: str = 'euler', batch_size: int = 256, cfg_interval=(0.0, 1.0), guide: Guide | None = None,
             guide_scale: float = 0.0, guide_upto: float = GUIDE_UPTO, from_support: float = 0.0) -> np.ndarray:
    """Latents (M, h, w, c) in posterior space from M episodes: support_embeds (M, K, D), support_latents (M, K, h, w, c), labels (M,).
    `guide_scale > 0`: encoder guidance towards the supports' mean embedding, `guide` taking posterior latents.
    `from_support > 0`: episode i starts at t = from_support from its support i mod K, noised (`start_noise`)."""
    check_start(from_support)
    if from_support and support_latents is None:
        raise ValueError("sampling from a support (from_support > 0) needs the supports' latents: pass support_latents")
    if guide_scale:
        check_guidance(guide_scale, guide_upto)
        if guide is None: raise ValueError("encoder guidance needs the run's guide: fsdit.codecs.run_codecs(run).guide")
        if support_embeds is None: raise ValueError("encoder guidance steers towards the supports' embedding: pass support_embeds")
    given = {'support_embeds': support_embeds, 'support_latents': support_latents, 'labels': labels}
    given = {k: np.asarray(v) for k, v in given.items() if v is not None}
    check_supports(mc, None if 'support_embeds' not in given else given['support_embeds'].shape[1])
    missing = [k for k in conditioning(mc).batch_keys if k not in given]
    if missing: raise ValueError(f"cond={mc.cond!r} needs {missing[0]}")
    M, n_dev, mesh = len(next(iter(given.values()))), jax.local_device_count(), data_mesh()
    n_batches = max(1, -(-M // batch_size))
    bs = max(1, -(-(-(-M // n_batches)) // n_dev)) * n_dev        # equal batches of one shape (one compilation), little padding
    key, shape, model = jax.random.PRNGKey(seed), (mc.input_size, mc.input_size, mc.in_channels), _dit(mc)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    out = []
    for i in range(0, M, bs):
        n = min(bs, M - i)
        b = {k: np.concatenate([v[i:i + n], np.repeat(v[i + n - 1:i + n], bs - n, 0)]) for k, v in given.items()}
        init = None                                       # episode i + j starts from its support (i + j) mod K
        if from_support: init = scaling.to_model(b['support_latents'][np.arange(bs), (i + np.arange(bs)) % b['support_latents'].shape[1]])
        b, init = jax.device_put((b, init), NamedSharding(mesh, P(DATA_AXIS)))
        noise = jax.device_put(_noise(key, i, bs, shape), NamedSharding(mesh, P(DATA_AXIS)))
        gk = {}
        if guide_scale:                                   # the guide sees posterior latents; the model works in its own scale
            target = l2_normalize(jnp.mean(b['support_embeds'], 1), eps=1e-6)
            gk = dict(guide=_model_space_guide(guide, scaling.scale), target=target, guide_scale=guide_scale, guide_upto=guide_upto)
        x = sample(model.apply, params, noise, condition(b, mc, scaling), steps=steps, cfg_scale=cfg_scale, method=method,
                   cfg_interval=cfg_interval, init=init, start=from_support, **gk)
        out.append(scaling.to_posterior(np.asarray(x)[:n]))
    return np.concatenate(out) if out else np.zeros((0, *shape), np.float32)


# %% [markdown]
# The episodes are cut into the fewest batches of at most `batch_size`, all of one size, so that padding the last
# one wastes little (400 episodes at 256: two batches of 200, not 256 + 144 padded to 256, which sampled 28% more).
# An image depends on its episode and the seed, not on how the episodes were batched; supports given to a
# class-conditioned model, or none to a support-conditioned one, are refused.

# %%
mc = model_config('mu', input_size=8, in_channels=3, support_dim=16, patch=4, cond='context')
params = perturb(init_params(mc, jax.random.PRNGKey(0)))
r = np.random.default_rng(0)
emb = r.normal(size=(5, 3, 16)).astype(np.float32); lat = r.normal(size=(5, 3, 8, 8, 3)).astype(np.float32)
z_all = generate(params, mc, emb, lat, steps=3, seed=1)
z_bat = generate(params, mc, emb, lat, steps=3, seed=1, batch_size=2)
test_eq(z_all.shape, (5, 8, 8, 3)); test_close(z_all, z_bat, eps=1e-5)
assert not np.allclose(z_all, generate(params, mc, emb, lat, steps=3, seed=2))
test_fail(lambda: check_supports(model_config('mu', cond='class', num_classes=3), 5), contains='class-conditioned')
test_fail(lambda: check_supports(mc, 0), contains='at least one support')
check_supports(mc, 1); check_supports(model_config('mu', cond='context'), 7)   # any K >= 1

# %% [markdown]
# With a guide, `generate` steers each episode towards its supports' mean embedding. Here the guide is a fixed random
# projection of the (posterior) latents: guided samples sit closer to their targets by that projection, scale 0 is the
# plain sampler, and guidance without a guide is refused.

# %%
proj = jnp.asarray(r.normal(size=(8 * 8 * 3, 16)).astype(np.float32))
toy_guide = Guide(lambda p, x: l2_normalize(x.reshape(len(x), -1) @ p, eps=1e-6), proj)
cos = lambda z: np.asarray((toy_guide.fn(proj, jnp.asarray(z)) * l2_normalize(jnp.asarray(emb).mean(1))).sum(-1))
z_g = generate(params, mc, emb, lat, steps=3, seed=1, guide=toy_guide, guide_scale=2.0, guide_upto=0.9)
assert cos(z_g).mean() > cos(z_all).mean() + 0.1, (cos(z_g), cos(z_all))
test_close(generate(params, mc, emb, lat, steps=3, seed=1, guide=toy_guide, guide_scale=0.0), z_all, eps=1e-6)
test_fail(lambda: generate(params, mc, emb, lat, steps=3, guide_scale=1.0), contains="needs the run's guide")

# %% [markdown]
# From a support: episode *i* starts from its support *i* mod K, whatever the batching, and the model's scale is applied
# to it (here 2: the support's latents are halved in posterior space).

# %%
sc = LatentScaling(2.0)
z_s = generate(params, mc, emb, lat, steps=4, seed=1, from_support=0.5, scaling=sc)
test_close(generate(params, mc, emb, lat, steps=4, seed=1, from_support=0.5, scaling=sc, batch_size=2), z_s, eps=1e-5)
for i in range(5):
    b = {'support_embeds': jnp.asarray(emb[i:i + 1]), 'support_latents': jnp.asarray(lat[i:i + 1])}
    ref = sample(DiT(mc).apply, params, _noise(jax.random.PRNGKey(1), i, 1, (8, 8, 3)), condition(b, mc, sc), steps=4,
                 init=sc.to_model(lat[i:i + 1, i % 3]), start=0.5)
    test_close(z_s[i], sc.to_posterior(ref)[0], eps=1e-4)
test_fail(lambda: generate(params, mc, emb, steps=3, from_support=0.5), contains='pass support_latents')
test_fail(lambda: generate(params, mc, emb, lat, steps=3, from_support=-0.1), contains='[0, 1)')
