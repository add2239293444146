# %% [markdown]
# # Train
#
# > The seed's recipe, data-parallel over every device: AdamW with a weight-decay mask, warmup-cosine LR, EMA, a pure per-device step under `jax.pmap`, metrics that are right, and checkpoints that resume exactly.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import argparse, contextlib, dataclasses, functools, json, logging, math, os, re, shutil, signal, sys, threading, time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import jax, jax.numpy as jnp
import optax
import flax
from flax import struct

from fsdit.config import (ModelConfig, TrainConfig, model_config, train_config, check_batch,
                          config_to_dict, config_from_dict, MODEL_PRESETS, TRAIN_PRESETS)
from fsdit import flow
from fsdit.dit import DiT, init_params, SUPPORT_LATENT_CONDS
from fsdit.sampler import sample

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## The optimizer
#
# The seed's table: AdamW ($\beta$ = 0.9, 0.99), weight decay 0.01, global-norm clipping at 1.0, and a
# learning rate that rises linearly from 0 to `lr` over `warmup` steps and then follows a cosine down to
# `min_lr` at `max_steps`. The step that is taken with learning rate $\eta_s$ is step $s$, counted from 0,
# as optax counts.

# %%
#| export
def lr_schedule(c: TrainConfig) -> optax.Schedule:
    "Linear warmup 0 -> `lr` over `warmup` steps, then cosine to `min_lr` at `max_steps`."
    # optax needs at least one cosine step; warmup == max_steps then ends at `lr` without decaying
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup, max(c.max_steps, c.warmup + 1), end_value=c.min_lr)


# %%
tc = train_config('seed')
s = lr_schedule(tc)
test_close([float(s(i)) for i in (0, 2_500, 5_000, 102_500, 200_000, 250_000)],
           [0.0, 5e-5, 1e-4, (1e-4 + 1e-6) / 2, 1e-6, 1e-6], eps=1e-9)


# %% [markdown]
# Weight decay applies to weight matrices only. The seed decays every parameter, including biases,
# LayerNorm scales and the fixed sin-cos positional table it stores as a parameter behind `stop_gradient`:
# that table receives no gradient, so decay is the only thing that changes it and it slowly shrinks to zero.
# Here a leaf decays when it is a `kernel` of two or more dimensions (dense and conv weights); biases,
# norm scales, positional tables and embedding tables do not (the usual rule since GPT-2).

# %%
#| export
def decay_mask(params) -> Any:
    "Pytree of bools: True where AdamW applies weight decay (kernels with ndim >= 2)."
    def rule(path, x): return getattr(path[-1], 'key', None) == 'kernel' and len(np.shape(x)) >= 2
    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(c: TrainConfig) -> optax.GradientTransformation:
    "Global-norm clipping, then AdamW with the warmup-cosine schedule and the decay mask."
    return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                       optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=decay_mask))


# %% [markdown]
# With zero gradients only weight decay moves a parameter, so one step shows the mask: kernels shrink by
# $\eta\lambda$, everything else stays put.

# %%
p = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)}, 'norm': {'scale': jnp.ones(4)}, 'pos_embed': jnp.ones((1, 5, 4))}
test_eq(decay_mask(p), {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False}, 'pos_embed': False})
tx = make_optimizer(train_config('test', warmup=0, lr=0.1, min_lr=0.1, weight_decay=0.5))
u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
q = optax.apply_updates(p, u)
test_close(q['dense']['kernel'], 1 - 0.1 * 0.5)
for leaf in (q['dense']['bias'], q['norm']['scale'], q['pos_embed']): test_eq(leaf, jnp.ones_like(leaf))


# %% [markdown]
# ## The train state
#
# Everything a resumed run needs is in one pytree: live parameters, their EMA, the optimizer state, the
# number of steps done, and the run's base key (every random number of the run is derived from it and the
# step, so the key never changes). Parameters and optimizer state are float32 whatever the compute dtype.

# %%
#| export
@struct.dataclass
class TrainState:
    "Parameters, EMA parameters, optimizer state, steps done and the run's base key."
    params: Any
    ema_params: Any
    opt_state: Any
    step: jax.Array  # () int32, optimizer steps done
    key: jax.Array   # (2,) uint32 base key of the run


@partial(jax.jit, static_argnums=(0, 1))
def create_state(mc: ModelConfig, tc: TrainConfig) -> TrainState:
    "A fresh state: parameters from `init_params`, EMA = parameters, step 0 (one compiled call)."
    init_key, run_key = jax.random.split(jax.random.PRNGKey(tc.seed))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init_params(mc, init_key))
    return TrainState(params, jax.tree.map(jnp.copy, params), make_optimizer(tc).init(params),
                      jnp.zeros((), jnp.int32), run_key)


def ema_update(ema, params, decay: float):
    "EMA of the parameters: `decay * ema + (1 - decay) * params`."
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


# %%
mc = model_config('mu')
tc = train_config('test', max_steps=10, eval_every=10, sample_every=10, save_every=5, keep=1, sample_steps=2)
st = create_state(mc, tc)  # one compiled call
test_eq(int(st.step), 0)
assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.params))
test_close(ema_update({'w': jnp.zeros(2)}, {'w': jnp.ones(2)}, 0.9)['w'], 0.1)

# %% [markdown]
# ## Randomness keyed by example, not by device
#
# Every random number of a step — $t$, the noise $\epsilon$, the CFG drop, the posterior sample and the
# mirror choice — comes from a key that depends only on the step and the example's index in the *global*
# batch: `fold_in(fold_in(key, step), index)`. A device finds the index of its first example from its
# position on the data axis (`lax.axis_index`, global across processes), so 1 device, 8 devices or 2
# processes draw the same numbers for the same example and a run does not depend on how its batch is split.
# (The seed split one key per device and reused one fixed key for the VAE posterior noise.)

# %%
#| export
AXIS = 'batch'  # the data-parallel axis name


def example_keys(key: jax.Array, step, n: int, axis_name: str | None = AXIS) -> jax.Array:
    "Keys (n, 2) for this device's n examples: fold_in(fold_in(key, step), global example index)."
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(n))


# %% [markdown]
# On the device a batch becomes the model's inputs. The target latent is a fresh posterior sample of the
# chosen mirror state, $x_1 = (\mu + e^{\frac12 \log\sigma^2} n)\cdot s$ with $s$ = 0.18215 (1 in pixel
# mode, where the store holds the image as $\mu$ with $\log\sigma^2 = -30$); the support embedding is the
# mean of the K support embeddings, in float32.

# %%
#| export
def condition(batch: dict, mc: ModelConfig, latent_scale: float) -> dict:
    "The model's condition from a batch: mean support embedding (B, D), labels (B,), scaled support latents."
    cond = {}
    if mc.cond != 'class': cond['support_embed'] = batch['support_embeds'].astype(jnp.float32).mean(1)
    if mc.cond == 'class': cond['labels'] = batch['labels']
    if mc.cond in SUPPORT_LATENT_CONDS: cond['support_latents'] = batch['support_latents'].astype(jnp.float32) * latent_scale
    return cond


def model_inputs(batch: dict, keys: jax.Array, mc: ModelConfig, tc: TrainConfig, latent_scale: float, train: bool = True):
    "Target x1 (B, h, w, c), t (B,), noise (B, h, w, c), CFG drop (B,) and condition, each example from its own key."
    def one(key, moments):  # moments (2 mirror, 2 [mean, logvar], h, w, c)
        kt, keps, kdrop, knoise, kmirror = jax.random.split(key, 5)
        mean, logvar = moments[jax.random.bernoulli(kmirror).astype(jnp.int32)].astype(jnp.float32)
        x1 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(knoise, mean.shape)) * latent_scale
        drop = jax.random.bernoulli(kdrop, mc.cfg_drop) & train
        return x1, flow.sample_t(kt, (), tc.t_sampling), jax.random.normal(keps, mean.shape), drop
    x1, t, eps, drop = jax.vmap(one)(keys, batch['moments'])
    return x1, t, eps, drop, condition(batch, mc, latent_scale)


# %% [markdown]
# A batch as the data iterator hands it over (float16 moments of both mirror states, K support embeddings),
# here from a store of random arrays with the real layout:

# %%
#| export
from fsdit.data import EpisodeBatches, EpisodeSource, validation_batches, host_batch, process_share
from fsdit.features import store_source


def synthetic_store(mc: ModelConfig, n_classes: int = 6, per_class: int = 12, seed: int = 0, space: str = 'latent'):
    "Random store arrays: embeds (N, D) float16, moments (N, 2, 2, h, w, c) float16, and each class's rows."
    r, s, c = np.random.default_rng(seed), mc.input_size, mc.in_channels
    N = n_classes * per_class
    mean = r.normal(size=(N, 2, 1, s, s, c))
    logvar = np.full_like(mean, -30.0) if space == 'pixel' else r.uniform(-6, -2, size=mean.shape)
    emb = r.normal(size=(N, mc.support_dim))
    embeds = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float16)
    return embeds, np.concatenate([mean, logvar], 2).astype(np.float16), [np.arange(k * per_class, (k + 1) * per_class) for k in range(n_classes)]


def synthetic_batch(n: int, mc: ModelConfig, shots: int = 5, seed: int = 0, space: str = 'latent') -> dict:
    "A host batch of n random episodes, gathered from a random store as the data iterator gathers them."
    embeds, moments, _ = synthetic_store(mc, 1, n, seed, space)
    idx = {'target_index': np.arange(n), 'support_index': np.random.default_rng(seed).integers(0, n, (n, shots)),
           'labels': np.zeros(n, np.int32)}
    return host_batch(embeds, moments, idx)


# %%
b = synthetic_batch(4, mc)
keys = example_keys(jax.random.PRNGKey(0), 3, 4, axis_name=None)
inputs = jax.jit(model_inputs, static_argnums=(2, 3))
x1, t, eps, drop, cond = inputs(b, keys, mc, tc, 0.18215)
test_eq((x1.shape, t.shape, eps.shape, drop.shape, cond['support_embed'].shape), ((4, 28, 28, 4), (4,), (4, 28, 28, 4), (4,), (4, 768)))
assert x1.dtype == cond['support_embed'].dtype == jnp.float32 and bool(((t > 0) & (t < 1)).all())
# each example's numbers come with its key, wherever it sits in the batch
rev = inputs({k: v[::-1] for k, v in b.items()}, keys[::-1], mc, tc, 0.18215)
test_eq(np.asarray(rev[0][::-1]), np.asarray(x1)); test_eq(np.asarray(rev[1][::-1]), np.asarray(t))
# pixel mode: logvar -30 makes the posterior sample the stored image itself (one of its two mirror states)
pb = synthetic_batch(4, mc, space='pixel')
x1p = np.asarray(inputs(pb, keys, mc, tc, 1.0)[0])[:, None]
assert np.all(np.isclose(x1p, pb['moments'][:, :, 0].astype(np.float32), atol=1e-5).all((2, 3, 4)).any(1))


# %% [markdown]
# ## The step
#
# Flow matching (`fsdit.flow`): $x_t = (1-t)\,\epsilon + t\,x_1$, the model predicts the velocity
# $v = x_1 - \epsilon$, and the loss is the mean squared error. Each device computes the loss and gradient
# of its share; `pmean` over the data axis makes them the global batch's (all shares are the same size).
# The per-example losses also go into 10 t-bins as sums and counts, reduced with `psum`: a bin's mean is
# sum / count over all devices (NaN when empty) — the seed averaged per-device bin means with empty bins
# counted as 0, which reads the edge bins too low.

# %%
#| export
def _pmean(x, axis_name): return x if axis_name is None else jax.lax.pmean(x, axis_name)
def global_norm(tree) -> jax.Array: return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
def _psum(x, axis_name): return x if axis_name is None else jax.lax.psum(x, axis_name)


def loss_fn(params, model, batch, keys, mc, tc, latent_scale, train=True, intermediates=False):
    "Mean flow-matching loss of a device batch, with per-example losses, t and the model's intermediates."
    x1, t, eps, drop, cond = model_inputs(batch, keys, mc, tc, latent_scale, train)
    out = model.apply({'params': params}, flow.interpolate(x1, eps, t), t, cond, drop=drop,
                      return_intermediates=intermediates)
    v, inter = out if intermediates else (out, {})
    per_example = flow.per_example_loss(v, flow.velocity_target(x1, eps))  # (B,)
    return per_example.mean(), (per_example, t, inter)


def compute_grads(state, batch, *, model, mc, tc, latent_scale, axis_name=AXIS):
    "Global-batch loss and gradients (pmean over the data axis), and this device's per-example losses and t."
    keys = example_keys(state.key, state.step, batch['moments'].shape[0], axis_name)
    (loss, (per_example, t, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, model, batch, keys, mc, tc, latent_scale)
    return _pmean(loss, axis_name), _pmean(grads, axis_name), per_example, t


# %% [markdown]
# The step itself is a pure function of (state, device batch): no host sync, no Python side effects.
# Its metrics stay on the device until a log step fetches them; `finite` is the NaN/Inf check. The grad
# norm is reported before clipping and after it ($\min(\|g\|, c)$ is exactly the norm clipping leaves).

# %%
#| export
def train_step(state: TrainState, batch: dict, *, model, tx, mc, tc, latent_scale, axis_name=AXIS):
    "One optimizer step on this device's share of the global batch; returns the new state and metrics."
    loss, grads, per_example, t = compute_grads(state, batch, model=model, mc=mc, tc=tc,
                                                latent_scale=latent_scale, axis_name=axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    bin_sums, bin_counts = _psum(flow.t_bin_stats(per_example, t), axis_name)
    metrics = dict(loss=loss, grad_norm=grad_norm, grad_norm_clipped=jnp.minimum(grad_norm, tc.grad_clip),
                   param_norm=global_norm(params), lr=lr_schedule(tc)(state.step),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm), bin_sums=bin_sums, bin_counts=bin_counts)
    return state.replace(params=params, ema_params=ema_update(state.ema_params, params, tc.ema_decay),
                         opt_state=opt_state, step=state.step + 1), metrics


# %% [markdown]
# `data_parallel` is the one place that knows how the step is spread over devices: `jax.pmap` over the
# local devices with the named axis. Moving to `jax.shard_map` means changing this wrapper only.
#
# On accelerators the state's buffers are donated: the step updates them in place and the peak holds two
# parameter-sized buffers fewer. On the CPU backend they are not: there XLA, given the donated state, keeps the
# gradients and the updates in two parameter-sized temporaries of their own (1.25 GB more at B/2), and the step
# was slower in every interleaved round at B/2 (`BENCHMARKS.md`). The state is replicated with `jax.device_put` and a `NamedSharding`
# (`device_put_replicated` is gone from current JAX).

# %%
#| export
def donate_state() -> bool:
    "Whether the train step donates the state by default: on accelerators yes, on the CPU backend no."
    return jax.default_backend() != 'cpu'


def data_parallel(step_fn: Callable, donate: bool | None = None) -> Callable:
    "Run a per-device step on every local device along `AXIS`; the state (argument 0) donated if `donate` (default `donate_state()`)."
    donate = donate_state() if donate is None else donate
    return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=8)
def make_train_step(mc: ModelConfig, tc: TrainConfig, latent_scale: float, donate: bool | None = None) -> Callable:
    "The data-parallel train step: (replicated state, sharded batch) -> (state, metrics)."
    return data_parallel(partial(train_step, model=DiT(mc), tx=make_optimizer(tc), mc=mc, tc=tc,
                                 latent_scale=latent_scale), donate)


def replicate(tree, devices=None):
    "A copy of `tree` on every local device, stacked on a leading device axis."
    devices = devices or jax.local_devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def unreplicate(tree):
    "The first local device's copy of a replicated tree, as host numpy arrays."
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), tree)


def shard(batch: dict, n_devices: int) -> dict:
    "Split a host batch (B, ...) into (n_devices, B / n_devices, ...)."
    return {k: v.reshape(n_devices, v.shape[0] // n_devices, *v.shape[1:]) for k, v in batch.items()}


# %% [markdown]
# One step on the `mu` model: the loss is finite, the step counter moves, clipping caps the norm, and the
# EMA moved by exactly $1 - d$ of the update.

# %%
n_dev = jax.local_device_count()
step_fn = make_train_step(mc, tc, 0.18215)
state = replicate(create_state(mc, tc))
p0 = unreplicate(state.params)
state, m = step_fn(state, shard(synthetic_batch(tc.batch_size, mc), n_dev))
m = unreplicate(m)
assert m['finite'] and np.isfinite(m['loss']) and m['grad_norm_clipped'] <= tc.grad_clip
test_eq(int(unreplicate(state.step)), 1); test_eq(float(m['lr']), 0.0)  # the first warmup step has lr 0
test_eq(m['bin_counts'].sum(), tc.batch_size)
ema, p1 = unreplicate(state.ema_params), unreplicate(state.params)
for e, a, b_ in zip(jax.tree.leaves(ema), jax.tree.leaves(p0), jax.tree.leaves(p1)): test_close(e, tc.ema_decay * a + (1 - tc.ema_decay) * b_, eps=1e-6)


# %% [markdown]
# ## Evaluation
#
# Validation uses fixed episodes and fixed keys (the run's seed + 1, step 0) and no CFG drop, so two
# evaluations differ only through the parameters. It runs for the live and the EMA parameters and also
# returns the attention entropy per layer and head, which the DiT reports through `return_intermediates`.

# %%
#| export
def eval_step(params, batch: dict, key: jax.Array, *, model, mc, tc, latent_scale, axis_name=AXIS) -> dict:
    "Validation sums over the global batch: loss sum, count, t-bin sums/counts; attention entropy (depth, heads)."
    keys = example_keys(key, 0, batch['moments'].shape[0], axis_name)
    _, (per_example, t, inter) = loss_fn(params, model, batch, keys, mc, tc, latent_scale, train=False, intermediates=True)
    bin_sums, bin_counts = flow.t_bin_stats(per_example, t)
    out = _psum(dict(loss_sum=per_example.sum(), count=jnp.float32(per_example.shape[0]),
                     bin_sums=bin_sums, bin_counts=bin_counts), axis_name)
    return {**out, 'attn_entropy': _pmean(inter['attn_entropy'], axis_name)}


@functools.lru_cache(maxsize=8)
def make_eval_step(mc: ModelConfig, tc: TrainConfig, latent_scale: float) -> Callable:
    "The data-parallel eval step: (replicated params, sharded batch, replicated key) -> summed metrics."
    return data_parallel(partial(eval_step, model=DiT(mc), mc=mc, tc=tc, latent_scale=latent_scale), donate=False)


# %% [markdown]
# On the host, the sums of every validation batch add up; the bin means come from `flow.bin_means`
# (NaN for an empty bin), and the entropy is logged for an early, a middle and the last layer, and per
# head of the last layer.

# %%
#| export
def _nan_none(x) -> float | None: return None if not math.isfinite(x) else float(x)


def entropy_metrics(ent: np.ndarray, prefix: str = 'attn') -> dict:
    "Attention entropy (depth, heads): layers early/mid/late and every head of the last layer."
    depth = ent.shape[0]
    out = {f'{prefix}/entropy_{name}': float(ent[i].mean()) for name, i in (('early', 0), ('mid', depth // 2), ('late', depth - 1))}
    return {**out, **{f'{prefix}/entropy_last_head{h}': float(v) for h, v in enumerate(ent[-1])}}


def evaluate(eval_fn: Callable, params, val_batches: list, key, prefix: str) -> dict:
    "Loss, t-bin losses and attention entropy of replicated `params` over fixed sharded validation batches."
    tot = None
    for b in val_batches:
        out = unreplicate(eval_fn(params, b, key))
        tot = out if tot is None else jax.tree.map(np.add, tot, out)
    bins = np.asarray(flow.bin_means(tot['bin_sums'], tot['bin_counts']))
    out = {f'{prefix}/loss': float(tot['loss_sum'] / tot['count'])}
    out.update({f'{prefix}/loss_tbin_{i}': float(v) for i, v in enumerate(bins)})
    return {**out, **entropy_metrics(tot['attn_entropy'] / len(val_batches))}


# %%
eval_fn = make_eval_step(mc, tc, 0.18215)
vb = [shard(synthetic_batch(8, mc, seed=1), n_dev)]
vkey = replicate(jax.random.PRNGKey(1))
ev = evaluate(eval_fn, state.params, vb, vkey, 'val')
np.testing.assert_equal(ev, evaluate(eval_fn, state.params, vb, vkey, 'val'))  # fixed episodes and keys: same numbers
assert np.isfinite(ev['val/loss']) and {'attn/entropy_early', 'attn/entropy_late', 'attn/entropy_last_head1'} <= set(ev)


# %% [markdown]
# ## Data
#
# The trainer reads episodes through a small source object: `batches(position)` yields this process's
# share of each global batch together with the data position after it (`{'epoch', 'offset'}`, saved with
# every checkpoint), and `val_batches()` the fixed validation episodes. `fsdit.data.EpisodeSource` builds both from
# store arrays — the feature store's memory-mapped files or arrays in memory — with `fsdit.data`'s
# resumable stratified episodes. Each process gathers only its own rows.

# %% [markdown]
# For tests and this notebook, a source over a random store:

# %%
#| export
def synthetic_source(mc: ModelConfig, tc: TrainConfig, seed: int = 0, space: str = 'latent', **kw) -> EpisodeSource:
    "An `EpisodeSource` over a random store: the first two thirds of the classes train, the rest validate."
    embeds, moments, rows = synthetic_store(mc, seed=seed, space=space, **kw)
    k = len(rows) * 2 // 3
    return EpisodeSource(embeds, moments, rows[:k], rows[k:], tc, space)


# %%
src = synthetic_source(mc, tc)
it = src.batches()
(b1, p1), (b2, p2) = next(it), next(it)
test_eq(b1['moments'].shape, (tc.batch_size, 2, 2, 28, 28, 4)); test_eq(b1['support_embeds'].shape, (tc.batch_size, 5, 768))
b2_again, _ = next(src.batches(p1))  # restarting at a saved position gives the next batch
np.testing.assert_equal(b2_again, b2)
src.check()   # settings the classes cannot meet are refused before a run writes anything:
test_fail(lambda: synthetic_source(mc, train_config('test', shots=12)).check(), contains='shots 12 needs 13 images per class')


# %% [markdown]
# ## Metrics on the host
#
# Nothing leaves the device between log steps: each step's metrics are kept as device arrays and fetched
# together at the next log step. There the loss EMA (the seed's 0.99 per step), the interval means and the
# t-bin means of the whole interval (sums and counts over every step and device) are formed. The first
# non-finite step stops the run. Time per step is the wall time of the interval divided by its steps;
# the clock starts after the first step so that compilation is not counted.

# %%
#| export
class NonFiniteLoss(RuntimeError):
    "The training loss or gradient became NaN or Inf."


def check_finite(pending: list[dict], first_step: int):
    "Raise `NonFiniteLoss` naming the first step whose loss or gradient norm is not finite."
    flags = [bool(unreplicate(m['finite'])) for m in pending]
    if not all(flags):
        raise NonFiniteLoss(f"loss or gradient norm is NaN/Inf at step {first_step + flags.index(False)}")


def train_summary(pending: list[dict], loss_ema: float | None, alpha: float = 0.99) -> tuple[dict, float]:
    "Interval means, last-step norms, t-bin means and the updated per-step loss EMA of fetched step metrics."
    ms = [unreplicate(m) for m in pending]
    for m in ms: loss_ema = float(m['loss']) if loss_ema is None else alpha * loss_ema + (1 - alpha) * float(m['loss'])
    mean = lambda k: float(np.mean([m[k] for m in ms]))
    bins = np.asarray(flow.bin_means(sum(m['bin_sums'] for m in ms), sum(m['bin_counts'] for m in ms)))
    out = {'train/loss': mean('loss'), 'train/loss_ema': loss_ema, 'train/grad_norm': mean('grad_norm'),
           'train/grad_norm_clipped': mean('grad_norm_clipped'), 'train/param_norm': float(ms[-1]['param_norm']),
           'train/lr': float(ms[-1]['lr'])}
    return {**out, **{f'train/loss_tbin_{i}': float(v) for i, v in enumerate(bins)}}, loss_ema


# %% [markdown]
# ## Logging
#
# Process 0 writes every logged step as one JSON object to `RUN/metrics.jsonl` (NaN, e.g. an empty t-bin,
# is written as `null`) and, when enabled, to wandb. wandb is imported only when used; `online` without
# `WANDB_API_KEY` becomes `offline`, so a run never waits for a login.

# %%
#| export
def wandb_mode(requested: str, env=None) -> str:
    "The wandb mode to use: 'online' falls back to 'offline' when no API key is set."
    env = os.environ if env is None else env
    return 'offline' if requested == 'online' and not env.get('WANDB_API_KEY') else requested


def _jsonable(v):
    if v is None or isinstance(v, (str, Path)): return None if v is None else str(v)
    return _nan_none(float(v))


class RunLog:
    "Metrics to `RUN/metrics.jsonl` and to wandb; inactive on processes other than 0."
    def __init__(self, out_dir, config: dict, tc: TrainConfig, active: bool = True):
        self.path, self.active, self.run = Path(out_dir) / 'metrics.jsonl', active, None
        mode = wandb_mode(tc.wandb_mode)
        if active and mode != 'disabled':
            import wandb
            os.environ['WANDB_MODE'] = mode
            self.run = wandb.init(project=tc.wandb_project, name=tc.wandb_name, config=config, dir=str(out_dir), mode=mode,
                                  id=_run_id(out_dir), resume='allow', settings=wandb.Settings(init_timeout=90, silent=True))

    def log(self, step: int, metrics: dict, images: dict | None = None):
        "Append one record; images (name -> PNG path) go to wandb as images and to the record as paths."
        if not self.active: return
        rec = {'step': step, **{k: _jsonable(v) for k, v in {**metrics, **(images or {})}.items()}}
        with open(self.path, 'a') as f: f.write(json.dumps(rec) + '\n')
        if self.run is not None:
            import wandb
            self.run.log({**{k: v for k, v in rec.items() if isinstance(v, float)},
                          **{k: wandb.Image(str(p)) for k, p in (images or {}).items()}}, step=step)

    def truncate(self, step: int, warn: Callable[[str], None] | None = None):
        "Drop records after `step` (a resumed run rewrites them), and a last line cut off by a crash."
        if not self.active or not self.path.exists(): return
        keep = [l for l, r in read_records(self.path, warn) if r['step'] <= step]
        _write_atomic(self.path, ''.join(l + '\n' for l in keep))

    def close(self):
        if self.run is not None: self.run.finish()


def read_records(path, warn: Callable[[str], None] | None = None) -> list[tuple[str, dict]]:
    "(line, record) of a metrics.jsonl; a last line cut off (a crash, a full disk) is dropped and `warn`ed, any other bad line refused."
    lines, out = Path(path).read_text().splitlines(), []
    for i, line in enumerate(lines):
        if not line.strip(): continue
        try: rec = json.loads(line)
        except ValueError: rec = None
        if isinstance(rec, dict) and isinstance(rec.get('step'), int): out.append((line, rec)); continue
        if any(l.strip() for l in lines[i + 1:]):
            raise ValueError(f"{path}, line {i + 1}, is not a metrics record: delete that line (or the file) and run again")
        if warn: warn(f"{path}: its last line was cut off (a crash or a full disk); dropped, the resumed run writes it again")
    return out


def _write_atomic(path: Path, text: str):
    "Replace `path` by `text` in one rename: a kill leaves the old file or the new one, never half of one."
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text); os.replace(tmp, path)


def _run_id(out_dir) -> str:
    "The wandb run id stored in the run directory (made on first use), so a resumed run continues it."
    p = Path(out_dir) / 'wandb_id'
    if not p.exists(): p.write_text(f"fsdit-{os.urandom(6).hex()}")
    return p.read_text().strip()


# %%
test_eq(wandb_mode('online', {}), 'offline'); test_eq(wandb_mode('online', {'WANDB_API_KEY': 'x'}), 'online')
with tempfile.TemporaryDirectory() as d:
    log = RunLog(d, {}, train_config('test'))
    log.log(5, {'train/loss': 1.5, 'train/loss_tbin_0': float('nan')}); log.log(10, {'train/loss': 1.0})
    log.truncate(5)
    recs = [json.loads(l) for l in open(Path(d) / 'metrics.jsonl')]
    with open(Path(d) / 'metrics.jsonl', 'a') as f: f.write('{"step": 10, "train/lo')      # a crash cut this line
    said = []; log.truncate(10, said.append)
    test_eq([r for _, r in read_records(Path(d) / 'metrics.jsonl')], recs); assert 'cut off' in said[0]
test_eq(recs, [{'step': 5, 'train/loss': 1.5, 'train/loss_tbin_0': None}])


# %% [markdown]
# ## Sample grids
#
# Every `sample_every` steps process 0 draws a grid from the EMA parameters on the first validation
# episodes: the K support images, the target, and samples at CFG 0 (unconditional) and at `cfg_scale`, each
# from the same fixed noise so that grids of successive steps are comparable. `decode` maps posterior-space
# latents (N, h, w, c) to images in [-1, 1] (the VAE decoder; the identity in pixel mode).

# %%
#| export
def to_uint8(images: np.ndarray) -> np.ndarray:
    "Images (N, H, W, C) in [-1, 1] -> uint8 RGB; other channel counts show their first 3, min-max scaled."
    x = np.asarray(images, np.float32)
    if x.shape[-1] not in (1, 3):
        x = x[..., :3]; lo, hi = x.min((1, 2, 3), keepdims=True), x.max((1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-6) * 2 - 1
    x = np.repeat(x, 3, -1) if x.shape[-1] == 1 else x
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def image_grid(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    "Rows of uint8 images [(N, H, W, 3), ...] -> one (R*(H+gap), N*(W+gap), 3) picture."
    padded = [np.pad(r, ((0, 0), (0, gap), (0, gap), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate([np.concatenate(list(r), 1) for r in padded], 0)


def sample_grid(mc: ModelConfig, tc: TrainConfig, params, batch: dict, decode: Callable, latent_scale: float,
                n: int = 8) -> np.ndarray:
    "Supports, target, and samples at CFG 0 and `cfg_scale` for the first n episodes of a host batch."
    b = {k: v[:n] for k, v in batch.items()}
    cond, model = condition(b, mc, latent_scale), DiT(mc)
    noise = jax.random.normal(jax.random.PRNGKey(tc.seed + 2), b['moments'].shape[:1] + b['moments'].shape[-3:])
    gen = [sample(model.apply, params, noise, cond, steps=tc.sample_steps, cfg_scale=s) for s in (0.0, tc.cfg_scale)]
    show = lambda z: to_uint8(decode(jnp.asarray(z, jnp.float32)))
    rows = [show(b['support_latents'][:, k]) for k in range(b['support_latents'].shape[1])]
    return image_grid(rows + [show(b['moments'][:, 0, 0])] + [show(np.asarray(g) / latent_scale) for g in gen])


def save_png(image: np.ndarray, path) -> Path:
    "Write a uint8 image to `path` (parents made)."
    from PIL import Image
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# %% [markdown]
# ## Checkpoints
#
# orbax-checkpoint writes each checkpoint to a temporary directory and renames it when complete, and keeps
# the last `keep`. A checkpoint holds only what a resume needs: parameters, EMA, optimizer state, step and
# key (as host arrays of the first device's copy), and as JSON the data position and the loss EMA —
# orbax needs about 3x the checkpoint in host RAM while saving, so nothing else goes in. Every process calls
# save and restore (orbax synchronises them; the primary process writes).

# %%
#| export
import orbax.checkpoint as ocp


def checkpoint_manager(out_dir, keep: int) -> ocp.CheckpointManager:
    "Checkpoints in `out_dir/checkpoints`, the last `keep` kept, written synchronously and atomically."
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(out_dir).absolute() / 'checkpoints', options=opts)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, meta: dict):
    "Save a replicated state (first device's copy) and JSON `meta` under the state's step."
    host = flax.serialization.to_state_dict(unreplicate(state))
    with quiet_orbax():
        mngr.save(int(host['step']), args=ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()


@contextlib.contextmanager
def quiet_orbax():
    "Silence orbax's log while it writes: a failed write (a full disk) is logged with a traceback by each of its threads."
    # the error still reaches the caller, which reports it once, in one line
    log = logging.getLogger('absl'); level = log.level
    log.setLevel(logging.CRITICAL)
    try: yield
    finally: log.setLevel(level)


def ignore_closed_loops(hook=None):
    "An unraisable-exception hook that drops the 'Event loop is closed' errors orbax's futures raise at exit after a failed write."
    hook = hook or sys.unraisablehook
    if getattr(hook, 'drops_closed_loops', False): return hook      # installed already
    def drop(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == 'Event loop is closed'): hook(u)
    drop.drops_closed_loops = True
    return drop


def restore_checkpoint(mngr: ocp.CheckpointManager, template: TrainState, step: int | None = None) -> tuple[TrainState, dict] | None:
    "The (host) state and meta at `step` (default: the latest), shaped like `template`; None when there is no checkpoint."
    step = mngr.latest_step() if step is None else step
    if step is None: return None
    if step not in mngr.all_steps(): raise ValueError(f"no checkpoint of step {step}; kept: {sorted(mngr.all_steps())}")
    target = jax.tree.map(np.asarray, flax.serialization.to_state_dict(template))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return flax.serialization.from_state_dict(template, got['state']), dict(got['meta'])


# %% [markdown]
# A checkpoint can be damaged after it was committed — a file cut short or deleted, its folder emptied by
# hand. `restore_latest` then falls back to the newest checkpoint that restores and reports the damaged ones
# (step -> the first line of the reason; tensorstore's own messages run to thousands of characters); when
# none restores it refuses naming them, rather than start again from step 0.

# %%
#| export
class CheckpointError(ValueError):
    "Checkpoints exist but none can be restored."


def error_line(e: BaseException, limit: int = 200) -> str:
    "The first line of an error, without tensorstore's spec dump, at most `limit` characters."
    msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).split('\n')[0].split(' [tensorstore_spec=')[0]
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def os_reason(e: BaseException) -> str:
    "The operating system's reason inside an error (tensorstore writes it as os_error_code), else its first line."
    m = re.search(r"os_error_code='(\d+)'", str(e))
    return os.strerror(int(m[1])) if m else e.strerror if isinstance(e, OSError) and e.strerror else error_line(e)


def restore_latest(mngr: ocp.CheckpointManager, template: TrainState) -> tuple[TrainState, dict, dict[int, str]] | None:
    "The newest checkpoint that restores: (state, meta, {damaged newer step: reason}); None when there is none."
    damaged = {}
    for step in sorted(mngr.all_steps(), reverse=True):
        try: state, meta = restore_checkpoint(mngr, template, step)
        except Exception as e:   # orbax and tensorstore raise KeyError, ValueError, OSError, ... for damaged files
            damaged[step] = error_line(e); continue
        return state, meta, damaged
    if damaged:
        s = max(damaged)
        raise CheckpointError(f"no checkpoint in {mngr.directory} can be read: steps {sorted(damaged)} are damaged (step {s}: "
                              f"{damaged[s]}); move them away to start from step 0, or put back a good copy")
    return None


# %%
with tempfile.TemporaryDirectory() as d:
    mngr = checkpoint_manager(d, keep=2)
    for _ in range(3):
        state, _ = step_fn(state, shard(b1, n_dev))
        save_checkpoint(mngr, state, {'data': {'epoch': 0, 'offset': 8}})
    test_eq(mngr.all_steps(), [3, 4])  # keep-last-2
    back, meta = restore_checkpoint(mngr, create_state(mc, tc))
    for a, b_ in zip(jax.tree.leaves(back), jax.tree.leaves(unreplicate(state))): test_eq(np.asarray(a), b_)
    test_eq(meta['data'], {'epoch': 0, 'offset': 8})
    shutil.rmtree(Path(d) / 'checkpoints' / '4' / 'state')                 # the newest checkpoint loses its state
    back, meta, damaged = restore_latest(mngr, create_state(mc, tc))
    test_eq((int(back.step), list(damaged)), (3, [4])); assert 'state' in damaged[4]
    shutil.rmtree(Path(d) / 'checkpoints' / '3' / 'meta')
    try: restore_latest(mngr, create_state(mc, tc)); raise AssertionError('restored')
    except CheckpointError as e: assert 'steps [3, 4] are damaged' in str(e)
    mngr.close()

# %%
#| hide
import types
test_eq(os_reason(ValueError("Failed to write 512 bytes to file 17: ... [os_error_code='28']")), os.strerror(28))
test_eq(error_line(KeyError('Item "state" was not found\nmore')), 'KeyError: Item "state" was not found')
seen = []
hook = ignore_closed_loops(seen.append)
for e in (RuntimeError('Event loop is closed'), ValueError('kept')): hook(types.SimpleNamespace(exc_value=e))
test_eq([str(u.exc_value) for u in seen], ['kept']); assert ignore_closed_loops(hook) is hook


# %% [markdown]
# ## Stopping cleanly
#
# SIGTERM (a Kaggle session ending, a pod preempted) and Ctrl-C only set a flag; the loop saves and stops at
# the next step boundary. A second Ctrl-C stops at once.
#
# With several processes (a TPU pod) the signal may reach only some of them, and a process that stopped alone
# would leave the others waiting in the next collective. So there the processes agree: at every log step they
# all-gather their flags and all stop if any was set (a log step fetches metrics anyway, so this adds no host
# sync to the other steps). A stop then waits for the next log step: keep `log_every` × step time below the
# grace period of the preemption (Kaggle's and TPU VMs' are 30 s or more).

# %%
#| export
class StopSignal:
    "Context manager: SIGTERM / SIGINT set `requested`; the train loop checks it between steps."
    def __enter__(self):
        self.requested, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT): self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT: raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items(): signal.signal(s, h)


# %%
with StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)
    assert stop.requested


# %% [markdown]
# ## The run
#
# `Trainer` holds one run: the replicated state, the data stream and its position, the checkpoints and the
# log. A new `Trainer` on a run directory with checkpoints continues from the newest readable one — parameters, EMA,
# optimizer state, step, key, data position and loss EMA — so the losses after a resume are those of an
# uninterrupted run. The run directory also keeps the configs as `config.json`; resuming with a different
# model is refused.
#
# Nothing is written before every setting has been checked against the data (shots per class, episodes per
# batch, batch per device), so a refused command leaves no `config.json` for the corrected one to trip over.
# A step's record goes to `metrics.jsonl` before its checkpoint: a run killed between the two resumes from
# the checkpoint before and writes the record again, equal to the lost one.

# %%
#| export
def write_run_config(out_dir, mc: ModelConfig, tc: TrainConfig, space: str, extra: dict | None = None):
    "Write `RUN/config.json` (model, train, space, `extra` such as the store path); refuse a model that differs from a saved one."
    p = Path(out_dir) / 'config.json'
    if p.exists():
        old = config_from_dict(ModelConfig, run_json(out_dir)['model'])
        if old != mc:
            diff = {k: (v, getattr(mc, k)) for k, v in config_to_dict(old).items() if v != getattr(mc, k)}
            raise ValueError(f"{out_dir} holds a run of another model (saved, given): {diff}; use a new --out")
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(p, json.dumps({'model': config_to_dict(mc), 'train': config_to_dict(tc), 'space': space, **(extra or {})}, indent=1))


def run_json(out_dir) -> dict:
    "`RUN/config.json` as saved ({} when there is none); `ValueError` naming the file when it cannot be read."
    p = Path(out_dir) / 'config.json'
    if not p.exists(): return {}
    try:
        d = json.loads(p.read_text())
        if isinstance(d, dict) and isinstance(d.get('model'), dict) and isinstance(d.get('train'), dict): return d
        why = 'no model and train configs'
    except ValueError as e: why = error_line(e)
    raise ValueError(f"{p} cannot be read ({why}): put back a good copy, or use a new --out")


def read_run_config(out_dir) -> tuple[ModelConfig, TrainConfig] | None:
    "The configs saved in a run directory, or None."
    d = run_json(out_dir)
    if not d: return None
    return config_from_dict(ModelConfig, d['model']), config_from_dict(TrainConfig, d['train'])


# %% [markdown]
# One run directory, one trainer: `RunLock` holds an exclusive `flock` on `RUN/train.lock` for the life of
# the run, so a second `fsdit train` into the same `--out` is refused instead of interleaving checkpoints and
# log lines. The operating system drops the lock when the process ends, however it ends (SIGKILL included),
# so a lock left by a killed run never blocks the next one.

# %%
#| export
class RunInUse(RuntimeError):
    "Another process is training in this run directory."


class RunLock:
    "An exclusive lock on a run directory (`RUN/train.lock`, `fcntl.flock`), released when the process ends."
    def __init__(self, out_dir):
        self.path = Path(out_dir) / 'train.lock'
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, 'a+')
        try:
            import fcntl                                     # POSIX; elsewhere runs are not locked
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError: pass
        except OSError:
            self.file.seek(0); holder = self.file.read().strip() or 'unknown'; self.file.close()
            raise RunInUse(f"{out_dir} is in use by another `fsdit train` (process {holder}): "
                           "wait for it to end or stop it; two runs cannot share one --out") from None
        self.file.seek(0); self.file.truncate(); self.file.write(f"{os.getpid()}\n"); self.file.flush()

    def release(self):
        "Let the next run in (closing the file drops the lock)."
        self.file.close()


# %%
with tempfile.TemporaryDirectory() as d:
    lock = RunLock(d)
    try: RunLock(d); raise AssertionError('locked twice')
    except RunInUse as e: assert f"process {os.getpid()}" in str(e)
    lock.release(); RunLock(d).release()                   # free again once released


# %%
#| export
class Trainer:
    "One run in `out_dir`: state on the local devices, data stream, checkpoints, metrics; resumes if it can."
    def __init__(self, mc: ModelConfig, tc: TrainConfig, source, out_dir, decode: Callable | None = None,
                 extra: dict | None = None, embed: Callable | None = None, judge=None):
        check_batch(tc.batch_size, jax.device_count(), jax.process_count())
        self.mc, self.tc, self.source, self.out = mc, tc, source, Path(out_dir)
        self.main, self.n_dev = jax.process_index() == 0, jax.local_device_count()
        self.scale = 1.0 if source.space == 'pixel' else tc.latent_scale
        self.decode, self.embed, self.fewshot_set, self.fewshot_real = decode or (lambda z: z), embed, None, None
        self.judge = judge
        if hasattr(source, 'check'): source.check()       # settings the data cannot meet: refused before any write
        self.val_host = source.val_batches()
        self.lock, self.ckpt, self.log = RunLock(self.out) if self.main else None, None, None
        try: self.open_run(extra)
        except BaseException: self.close(); raise

    def open_run(self, extra: dict | None):
        "Save the configs, restore the newest readable checkpoint (or start), open the log."
        mc, tc = self.mc, self.tc
        if self.main: write_run_config(self.out, mc, tc, self.source.space, extra)
        self.step_fn, self.eval_fn = make_train_step(mc, tc, self.scale), make_eval_step(mc, tc, self.scale)
        self.ckpt = checkpoint_manager(self.out, tc.keep)
        state, meta = self.restore()
        self.step, self.position, self.loss_ema = int(state.step), meta.get('data'), meta.get('loss_ema')
        self.start_step, self.state, self.pending, self.clock = self.step, replicate(state), [], None
        self.val = [shard(b, self.n_dev) for b in self.val_host]
        self.val_key = replicate(jax.random.PRNGKey(tc.seed + 1))
        self.log = RunLog(self.out, {'model': config_to_dict(mc), 'train': config_to_dict(tc)}, tc, active=self.main)
        self.log.truncate(self.step, self.warn)
        self.last: dict = {}

    def warn(self, msg: str):
        if self.main: print(f"fsdit train: {msg}", file=sys.stderr)

    def restore(self) -> tuple[TrainState, dict]:
        "The newest readable checkpoint; damaged newer ones are moved to RUN/checkpoints_damaged/. A fresh state if none."
        fresh = create_state(self.mc, self.tc)
        got = restore_latest(self.ckpt, fresh)
        if got is None: return fresh, {}
        state, meta, damaged = got
        for step, why in sorted(damaged.items(), reverse=True):
            dst = self.out / 'checkpoints_damaged' / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            if self.main: dst.parent.mkdir(exist_ok=True); shutil.move(self.out / 'checkpoints' / str(step), dst)
            self.warn(f"checkpoint {step} is damaged ({why}); moved to {dst}, resuming from step {int(state.step)}")
        if damaged:   # a manager that has not seen the move would count the damaged steps as kept
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices('fsdit: damaged checkpoints moved')
            self.ckpt.close(); self.ckpt = checkpoint_manager(self.out, self.tc.keep)
        return state, meta

    def run(self, stop: StopSignal | None = None) -> dict:
        "Train until `max_steps` or a stop request, then save; returns the last logged metrics."
        batches = self.source.batches(self.position)
        while self.step < self.tc.max_steps and not self.stop_requested(stop):
            batch, self.position = next(batches)
            self.state, m = self.step_fn(self.state, shard(batch, self.n_dev))
            self.pending.append(m); self.step += 1
            self.after_step()
        if self.pending: self.log.log(self.step, self.train_metrics())  # stopped between log steps
        self.save()
        return self.last

    def stop_requested(self, stop: StopSignal | None) -> bool:
        "Whether to stop now; several processes decide together at log steps (any one asked: all stop)."
        if stop is None: return False
        if jax.process_count() == 1: return stop.requested
        if self.step % self.tc.log_every: return False
        from jax.experimental import multihost_utils
        return bool(np.asarray(multihost_utils.process_allgather(np.int32(stop.requested))).any())

    def after_step(self):
        "Log, evaluate, draw samples and save when their intervals come round."
        s, tc, last = self.step, self.tc, self.step == self.tc.max_steps
        if s == self.start_step + 1: self.restart_clock(self.pending[-1])  # compilation is not timed
        rec, images = {}, {}
        if s % tc.log_every == 0 or last: rec.update(self.train_metrics())
        if s % tc.eval_every == 0 or last: rec.update(self.eval_metrics(rec.get('train/loss')))
        if (s % tc.sample_every == 0 or last) and self.main: images = self.samples()
        if tc.fewshot_every and (s % tc.fewshot_every == 0 or last) and self.main and self.embed: rec.update(self.fewshot())
        if rec or images: self.log.log(s, rec, images); self.last = {'step': s, **rec, **images}
        if s % tc.save_every == 0: self.save()   # after the step's record: a kill between the two loses nothing
        if rec or images: self.restart_clock(None)

    def restart_clock(self, wait_for):
        if wait_for is not None: jax.block_until_ready(wait_for)
        self.clock = (time.perf_counter(), self.step)

    def train_metrics(self) -> dict:
        "Fetch the interval's step metrics (the NaN check happens here) and time the interval."
        check_finite(self.pending, self.step - len(self.pending) + 1)
        out, self.loss_ema = train_summary(self.pending, self.loss_ema)
        self.pending = []
        (t0, s0), n = self.clock, self.step - self.clock[1]
        if n > 0:
            dt = time.perf_counter() - t0
            out.update({'train/step_time': dt / n, 'train/samples_per_s': n * self.tc.batch_size / dt})
        return out

    def eval_metrics(self, train_loss: float | None) -> dict:
        "Validation loss and t-bins for the live and the EMA parameters, the train-val gap, attention entropy."
        live = evaluate(self.eval_fn, self.state.params, self.val, self.val_key, 'val')
        ema = evaluate(self.eval_fn, self.state.ema_params, self.val, self.val_key, 'val_ema')
        ema = {k: v for k, v in ema.items() if k.startswith('val_ema/')}  # attention entropy: live model only
        gap = {} if train_loss is None else {'val/train_val_gap': live['val/loss'] - train_loss}
        return {**live, **ema, **gap}

    def samples(self) -> dict:
        "A sample grid from the EMA parameters, saved as RUN/samples/step_NNNNNNN.png."
        grid = sample_grid(self.mc, self.tc, unreplicate(self.state.ema_params), self.val_host[0], self.decode, self.scale)
        return {'samples/grid': str(save_png(grid, self.out / 'samples' / f'step_{self.step:07d}.png'))}

    def fewshot(self) -> dict:
        "Few-shot metrics of the EMA parameters on val classes (`fsdit.eval.quick_eval`); {} once they cannot run."
        from fsdit.eval import quick_eval, class_set_from_arrays, images_of, Pipeline
        tc, rows = self.tc, self.source.val_rows
        try:
            if self.fewshot_set is None:   # the same classes and real images every time
                r = np.random.default_rng(tc.seed)
                classes = np.sort(r.choice(len(rows), min(tc.fewshot_classes, len(rows)), replace=False))
                self.fewshot_set = class_set_from_arrays(self.source.embeds, self.source.moments, rows, self.source.names.get('val'),
                                                         max_per_class=2 * tc.fewshot_n + tc.shots, classes=classes, seed=tc.seed)
                cs = self.fewshot_set   # their decoded images and embeddings do not change either: computed once
                self.fewshot_real = images_of(cs.latents, cs.labels, Pipeline(self.decode, self.embed, judge=self.judge))
            return quick_eval(unreplicate(self.state.ema_params), self.mc, self.fewshot_set, self.decode, self.embed,
                              latent_scale=self.scale, n_per_class=tc.fewshot_n, shots=tc.shots, cfg_scale=tc.cfg_scale,
                              steps=tc.sample_steps, seed=tc.seed, real=self.fewshot_real, judge=self.judge)
        except (OSError, ValueError) as e:  # an encoder that cannot load (offline hub) must not end the run
            print(f"fsdit train: few-shot metrics are off for this run: {e}", file=sys.stderr)
            self.embed = None
            return {}

    def save(self):
        "Checkpoint the current step, unless it is saved already; a non-finite state is never saved."
        check_finite(self.pending, self.step - len(self.pending) + 1)
        before = self.ckpt.latest_step()
        if before == self.step: return
        try: save_checkpoint(self.ckpt, self.state, {'data': self.position, 'loss_ema': self.loss_ema})
        except Exception as e:   # a full disk: orbax keeps the earlier checkpoints, its half-written one is not taken
            raise CheckpointError(f"checkpoint {self.step} could not be written ({os_reason(e)}); the earlier ones are intact: "
                                  f"make room and run the same command again (it resumes from step {before or 0})") from e

    def close(self):
        "Close the checkpoints and the log, and release the run directory."
        for part in (self.ckpt, self.log):
            if part is not None: part.close()
        if self.lock is not None: self.lock.release(); self.lock = None


# %% [markdown]
# `train` is the whole run. A NaN or Inf loss raises `NonFiniteLoss` at the next log or save step, before
# anything is written: the checkpoints on disk are all from before the failure.

# %%
#| export
def train(mc: ModelConfig, tc: TrainConfig, source, out_dir, decode: Callable | None = None, extra: dict | None = None,
          embed: Callable | None = None, judge=None) -> dict:
    """Train (or resume) the run in `out_dir` until `tc.max_steps`; returns the last logged metrics.
    `decode` turns latents into images in [-1, 1] (sample grids); `embed` maps uint8 images to support
    embeddings and, with `decode`, turns on the few-shot metrics every `tc.fewshot_every` steps (with a glyph
    `judge`, `fsdit.judge.GlyphJudge`, they include its class consistency and glyph-FD)."""
    trainer = Trainer(mc, tc, source, out_dir, decode, extra, embed, judge)
    try:
        with StopSignal() as stop: return trainer.run(stop)
    finally: trainer.close()


# %% [markdown]
# A short run on the synthetic store: the loss falls, every metric lands in `metrics.jsonl` (empty t-bins as
# `null`), a sample grid is written, and the last `keep` checkpoints are on disk.

# %%
with tempfile.TemporaryDirectory() as run_dir:
    last = train(mc, tc, synthetic_source(mc, tc), run_dir)
    recs = [json.loads(l) for l in open(Path(run_dir) / 'metrics.jsonl')]
    grid_ok = Path(last['samples/grid']).exists()
    ckpts = sorted(p.name for p in (Path(run_dir) / 'checkpoints').iterdir())
test_eq([r['step'] for r in recs], [5, 10]); test_eq(ckpts, ['10']); assert grid_ok
assert recs[1]['train/loss'] < recs[0]['train/loss'] and recs[1]['train/samples_per_s'] > 0
assert {'val/loss', 'val_ema/loss', 'val/train_val_gap', 'attn/entropy_late', 'train/loss_tbin_9'} <= set(recs[1])

# %% [markdown]
# ### Few-shot metrics during training
#
# Given an `embed` (the store's support encoder), every `fewshot_every` steps the trainer draws
# `fewshot_n` images for each of `fewshot_classes` validation classes from the EMA model, each from its own
# random `shots`-shot support set, and logs `fsdit.eval.quick_eval`'s cheap metrics under `val_fs/`: class
# consistency (nearest-prototype accuracy among those classes, beside the same for real images and chance),
# Fréchet distance and diversity in embedding space, and the distance to the nearest support. The classes
# and their real images (`2 fewshot_n + shots` per class) are drawn once, so the numbers are comparable along a run.
# `fsdit train` passes the store's encoder (SigLIP2 loads at the first evaluation; if it cannot, the run goes
# on without these metrics and says why). Here the stand-in pixel encoder plays that part:

# %%
from fsdit.codecs import PixelEncoder
src = synthetic_source(mc, tc, space='pixel', n_classes=9)   # 6 train, 3 val classes
tc_fs = train_config('test', max_steps=4, log_every=2, eval_every=4, sample_every=4, save_every=4, sample_steps=2,
                     fewshot_every=2, fewshot_classes=3, fewshot_n=2)
with tempfile.TemporaryDirectory() as run_dir:
    train(mc, tc_fs, src, run_dir, embed=PixelEncoder(dim=mc.support_dim, grid=4).embed)
    recs = [json.loads(l) for l in open(Path(run_dir) / 'metrics.jsonl')]
test_eq([r['step'] for r in recs], [2, 4])
for r in recs:
    test_eq(r['val_fs/chance'], 1 / 3)
    assert 0 <= r['val_fs/proto_acc'] <= 1 and 0 <= r['val_fs/real_proto_acc'] <= 1 and r['val_fs/fd_embed'] >= 0


# %% [markdown]
# An encoder that cannot load switches the metrics off with a message instead of ending the run:

# %%
def offline(images): raise OSError("google/siglip2-base-patch16-224: not on disk and the hub cannot be reached")
with tempfile.TemporaryDirectory() as run_dir:
    tr = Trainer(mc, tc_fs, src, run_dir, embed=offline)
    test_eq(tr.fewshot(), {}); assert tr.embed is None
    tr.close()

# %% [markdown]
# ## Command line
#
# `fsdit train --feats FEATS --out RUN` trains on a feature store. Every `TrainConfig` field is a flag
# (`--batch-size` or the seed's `--batch_size`; `--wandb.name`, `--log_interval` and the seed's other
# names also work), every `ModelConfig` field is `--model.<field>`, and `--model` / `--preset` pick the
# presets. The store decides the model's input shape and embedding width. Running the same command again
# resumes: when `RUN/config.json` exists its configs are the base and only the flags given override them.
# `--distributed` calls `jax.distributed.initialize()` first (TPU pods, several hosts).

# %%
#| export
SEED_ALIASES = {'log_every': ['--log_interval'], 'eval_every': ['--eval_interval'], 'save_every': ['--save_interval'],
                'sample_every': ['--sample_interval'], 'wandb_name': ['--wandb.name'], 'wandb_project': ['--wandb.project'],
                'wandb_mode': ['--wandb.mode'], 'lr': ['--model.lr'], 'warmup': ['--model.warmup_steps']}


def _flag_type(f: dataclasses.Field):
    if isinstance(f.default, bool): return lambda v: v.lower() in ('1', 'true', 'yes')
    return str if f.default is None else type(f.default)


def train_parser() -> argparse.ArgumentParser:
    "The parser of `fsdit train` (flags default to None: only given flags override)."
    from fsdit.cli import Parser, positive_int
    p = Parser(prog='fsdit train', description='Train (or resume) a few-shot DiT on a feature store.')
    p.add_argument('--feats', '--data_dir', help='feature store (output of `fsdit precompute`); default: the one the run used')
    p.add_argument('--out', '--save_dir', required=True, help='run directory; an existing run resumes from its latest checkpoint')
    p.add_argument('--model', help="model preset (default B/2): " + ', '.join(MODEL_PRESETS))
    p.add_argument('--preset', help="training preset (default seed): " + ', '.join(TRAIN_PRESETS))
    p.add_argument('--vae', help='VAE for decoding sample grids (default: the store\'s)')
    p.add_argument('--val-batches', type=positive_int, help='fixed validation batches per evaluation (default 4)')
    p.add_argument('--distributed', action='store_true', help='call jax.distributed.initialize() (multi-host)')
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", f"--{f.name}", *SEED_ALIASES.get(f.name, []), dest=f"train.{f.name}",
                       type=_flag_type(f), metavar=f.name.upper(), help=f"TrainConfig.{f.name} (preset default {f.default})")
    for f in dataclasses.fields(ModelConfig):
        p.add_argument(f"--model.{f.name}", dest=f"model.{f.name}", type=_flag_type(f), metavar=f.name.upper(), help=argparse.SUPPRESS)
    return p


def resolve_configs(args, store_meta: dict | None) -> tuple[ModelConfig, TrainConfig]:
    "Configs from the saved run (if any) or the presets, then the given flags, then the store's shapes."
    given = {k: v for k, v in vars(args).items() if v is not None}
    pick = lambda prefix: {k.split('.', 1)[1]: v for k, v in given.items() if k.startswith(prefix + '.')}
    saved = read_run_config(args.out)
    mc0 = config_to_dict(saved[0]) if saved and not args.model else config_to_dict(model_config(args.model or 'B/2'))
    tc0 = config_to_dict(saved[1]) if saved and not args.preset else config_to_dict(train_config(args.preset or 'seed'))
    m = store_meta or {}
    shape = {} if 'latent_shape' not in m else dict(input_size=m['latent_shape'][0], in_channels=m['latent_shape'][2])
    dim = {'support_dim': m['embed_dim']} if 'embed_dim' in m else {}
    mc = config_from_dict(ModelConfig, {**mc0, **shape, **dim, **pick('model')})
    return mc, config_from_dict(TrainConfig, {**tc0, **pick('train')})


# %%
#| export
def lazy_call(load: Callable[[], Any], method: str) -> Callable:
    "A callable running `load().<method>(...)`; `load` runs at the first call only (nothing loads if it is never called)."
    obj = []
    def call(*args, **kwargs):
        if not obj: obj.append(load())
        return getattr(obj[0], method)(*args, **kwargs)
    return call


def lazy_vae_decode(name: str) -> Callable:
    "A decode callable that loads the SD-VAE `name` at its first call (only when a sample grid is drawn)."
    def load():
        from fsdit.vae import SDVAE
        return SDVAE.from_pretrained(name)
    return lazy_call(load, 'decode')


def store_embed(meta: dict) -> Callable | None:
    "The store's support encoder as images -> embeddings, loaded at its first call; None for an unknown stand-in."
    name = meta.get('encoder')
    if not name or (meta.get('space') == 'pixel' and not str(name).startswith('stand-in/')): return None
    def load():
        from fsdit.codecs import load_encoder
        return load_encoder(name)
    return lazy_call(load, 'embed')


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    "`fsdit train`'s flags; an unknown `--model.<field>` is refused naming the fields there are."
    p = train_parser()
    args, rest = p.parse_known_args(argv)
    bad = [a.split('=')[0] for a in rest if a.startswith('--model.')]
    if bad: p.error(f"unknown model field(s) {bad}: fields are {[f.name for f in dataclasses.fields(ModelConfig)]}")
    if rest: p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def train_cli(argv: list[str]) -> int:
    "`fsdit train`: check every setting, open the store, train or resume; 1 with a one-line message when refused."
    from fsdit.cli import CLIError, check_out_dir, fail
    args = parse_train_args(argv)
    sys.unraisablehook = ignore_closed_loops()
    try:
        if args.distributed: jax.distributed.initialize()
        check_out_dir(args.out)
        run = run_json(args.out)
        feats, n_val = args.feats or run.get('feats'), args.val_batches or run.get('val_batches', 4)
        if feats is None: raise CLIError("--feats is required for a new run: the folder `fsdit precompute` wrote")
        from fsdit.features import open_store
        store = open_store(feats)
        mc, tc = resolve_configs(args, store.meta)
        source = store_source(store, tc, n_val)
        decode = lazy_vae_decode(args.vae or store.meta.get('vae')) if source.space == 'latent' else None
        train(mc, tc, source, args.out, decode, extra={'feats': str(Path(feats).absolute()), 'val_batches': n_val},
              embed=store_embed(store.meta))
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:   # NonFiniteLoss, RunInUse: RuntimeError
        return fail('train', e)
    return 0


# %% [markdown]
# The store names its encoder: a stand-in is rebuilt from its name, SigLIP2 loads at the first use, and a name
# that is neither (a hand-made store) leaves the few-shot metrics off.

# %%
e = store_embed({'encoder': PixelEncoder(dim=32, grid=4).name, 'space': 'pixel'})
test_eq(e(np.zeros((3, 16, 16, 3), np.uint8)).shape, (3, 32))
test_eq(store_embed({'encoder': 'hand-made', 'space': 'pixel'}), None)
assert callable(store_embed({'encoder': 'google/siglip2-base-patch16-224', 'space': 'latent'}))   # nothing loaded yet

# %% [markdown]
# The flags: seed names and new names reach the same field, a preset is the base, flags win:

# %%
a = train_parser().parse_args(['--out', '/nonexistent/run', '--model', 'mu', '--preset', 'test', '--batch_size', '16',
                               '--wandb.name', 'r1', '--ema-decay', '0.5', '--model.remat', 'true'])
m_, t_ = resolve_configs(a, {'latent_shape': [16, 16, 3], 'embed_dim': 64})
test_eq((t_.batch_size, t_.wandb_name, t_.ema_decay, t_.warmup), (16, 'r1', 0.5, 2))
test_eq((m_.hidden, m_.input_size, m_.in_channels, m_.support_dim, m_.remat), (32, 16, 3, 64, True))


# %% [markdown]
# ## Memory: B/2 at 16 per core on a 16 GB TPU v5e
#
# `memory_estimate` counts the state a device holds — float32 parameters, EMA, the two Adam moments and the
# gradients — and reads XLA's own figures for the compiled step (`memory_analysis()` of the jitted
# single-device step at the given per-device batch): its arguments and its temporaries (activations
# kept for the backward pass, gradients, optimizer intermediates).
#
# **B/2 at 16 per core, bfloat16 compute** (`memory_estimate(model_config('B/2', dtype='bfloat16'), 16)`,
# compiled for the CPU of a 2-core machine, about 2.5 minutes): parameters 0.49 GiB (131.8 M float32),
# EMA 0.49 GiB, Adam moments 0.98 GiB, gradients 0.49 GiB; XLA's figures: arguments 1.97 GiB (state and
# batch), temporaries 4.15 GiB, outputs 1.97 GiB, all aliased to the donated inputs, so the peak is about
# **6.1 GiB of the 16 GiB** of a v5e core. The TPU compiler fuses and lays out differently (and pads the
# 196 tokens to its tiles), so read it as "fits with more than 2x to spare", not as an exact figure;
# `remat=True` should cut the activation share on the TPU if a larger batch per core is wanted. This CPU plan
# cannot show that: the CPU compiler expands the recomputation's optimization barriers before it schedules
# (`BENCHMARKS.md` §4).

# %%
#| export
def memory_estimate(mc: ModelConfig, per_device_batch: int, tc: TrainConfig | None = None) -> dict:
    "Bytes per device of the train step: state by count, and XLA's compiled argument/temporary sizes."
    tc = tc or train_config('seed')
    state = jax.eval_shape(lambda: create_state(mc, tc))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in synthetic_batch(per_device_batch, mc, tc.shots).items()}
    step = jax.jit(partial(train_step, model=DiT(mc), tx=make_optimizer(tc), mc=mc, tc=tc,
                           latent_scale=tc.latent_scale, axis_name=None), donate_argnums=0)
    ma = step.lower(state, batch).compile().memory_analysis()
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    p = nbytes(state.params)
    return dict(params=p, ema=p, adam=nbytes(state.opt_state), grads=p, arguments=ma.argument_size_in_bytes,
                temporaries=ma.temp_size_in_bytes, outputs=ma.output_size_in_bytes, aliased=ma.alias_size_in_bytes,
                peak=ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
