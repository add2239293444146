# %% [markdown]
# # Train and eval steps
#
# > The pure per-device train and validation steps, and the one wrapper that spreads them over the devices (`jax.pmap` along a data axis): gradients and metrics reduced across devices, metrics fetched on the host only at log steps.

# %%
#| default_exp steps

# %%
#| export
from __future__ import annotations
import functools
from functools import partial
from typing import Callable
import numpy as np
import jax, jax.numpy as jnp
import optax

from fsdit.config import ModelConfig, TrainConfig
from fsdit.dit import DiT
from fsdit.flow import example_keys, loss_fn, t_bin_stats, bin_means
from fsdit.state import TrainState, make_optimizer, lr_schedule, ema_update

# %%
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config
from fsdit.state import create_state
from fsdit.testing import synthetic_batch

mc = model_config('mu')
tc = train_config('test', max_steps=10, eval_every=10, sample_every=10, save_every=5, keep=1, sample_steps=2)

# %% [markdown]
# ## The step
#
# The loss is `fsdit.flow.loss_fn`, the flow-matching MSE of the model's velocity on a device batch. Each device computes the loss and gradient
# of its share; `pmean` over the data axis makes them the global batch's (all shares are the same size).
# The per-example losses also go into 10 t-bins as sums and counts, reduced with `psum`: a bin's mean is
# sum / count over all devices (NaN when empty) — the seed averaged per-device bin means with empty bins
# counted as 0, which reads the edge bins too low.

# %%
#| export
AXIS = 'batch'  # the data-parallel axis name


def _pmean(x, axis_name): return x if axis_name is None else jax.lax.pmean(x, axis_name)
def global_norm(tree) -> jax.Array: return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
def _psum(x, axis_name): return x if axis_name is None else jax.lax.psum(x, axis_name)


def compute_grads(state, batch, *, model, mc, tc, latent_scale, axis_name=AXIS):
    "Global-batch loss and gradients (pmean over the data axis), and this device's per-example losses and t."
    keys = example_keys(state.key, state.step, batch['moments'].shape[0], axis_name)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, batch, keys, mc, tc, latent_scale)
    return _pmean(loss, axis_name), _pmean(grads, axis_name), aux['loss'], aux['t']


def train_step(state: TrainState, batch: dict, *, model, tx, mc, tc, latent_scale, axis_name=AXIS):
    "One optimizer step on this device's share of the global batch; returns the new state and metrics."
    loss, grads, per_example, t = compute_grads(state, batch, model=model, mc=mc, tc=tc,
                                                latent_scale=latent_scale, axis_name=axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    bin_sums, bin_counts = _psum(t_bin_stats(per_example, t), axis_name)
    metrics = dict(loss=loss, grad_norm=grad_norm, grad_norm_clipped=jnp.minimum(grad_norm, tc.grad_clip),
                   param_norm=global_norm(params), lr=lr_schedule(tc)(state.step),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm), bin_sums=bin_sums, bin_counts=bin_counts)
    return state.replace(params=params, ema_params=ema_update(state.ema_params, params, tc.ema_decay),
                         opt_state=opt_state, step=state.step + 1), metrics


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
    "Split a host batch (B, ...) into (n_devices, B / n_devices, ...); `ValueError` unless B divides evenly."
    B = len(next(iter(batch.values())))
    if B % n_devices: raise ValueError(f"a batch of {B} cannot be split evenly over {n_devices} devices")
    return {k: v.reshape(n_devices, v.shape[0] // n_devices, *v.shape[1:]) for k, v in batch.items()}


# %% [markdown]
# The step itself is a pure function of (state, device batch): no host sync, no Python side effects.
# Its metrics stay on the device until a log step fetches them; `finite` is the NaN/Inf check. The grad
# norm is reported before clipping and after it ($\min(\|g\|, c)$ is exactly the norm clipping leaves).

# %% [markdown]
# `data_parallel` is the one place that knows how the step is spread over devices: `jax.pmap` over the
# local devices with the named axis. Moving to `jax.shard_map` means changing this wrapper only.
#
# On accelerators the state's buffers are donated: the step updates them in place and the peak holds two
# parameter-sized buffers fewer. On the CPU backend they are not: there XLA, given the donated state, keeps the
# gradients and the updates in two parameter-sized temporaries of their own (1.25 GB more at B/2), and the step
# was slower in every interleaved round at B/2 (`BENCHMARKS.md`). The state is replicated with `jax.device_put` and a `NamedSharding`
# (`device_put_replicated` is gone from current JAX).

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
test_fail(lambda: shard(synthetic_batch(3, mc), 2), contains='cannot be split evenly')
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
    _, aux = loss_fn(params, model, batch, keys, mc, tc, latent_scale, train=False, intermediates=True)
    per_example = aux['loss']
    bin_sums, bin_counts = t_bin_stats(per_example, aux['t'])
    out = _psum(dict(loss_sum=per_example.sum(), count=jnp.float32(per_example.shape[0]),
                     bin_sums=bin_sums, bin_counts=bin_counts), axis_name)
    return {**out, 'attn_entropy': _pmean(aux['intermediates']['attn_entropy'], axis_name)}


@functools.lru_cache(maxsize=8)
def make_eval_step(mc: ModelConfig, tc: TrainConfig, latent_scale: float) -> Callable:
    "The data-parallel eval step: (replicated params, sharded batch, replicated key) -> summed metrics."
    return data_parallel(partial(eval_step, model=DiT(mc), mc=mc, tc=tc, latent_scale=latent_scale), donate=False)


def entropy_metrics(ent: np.ndarray, prefix: str = 'attn') -> dict:
    "Attention entropy (depth, heads): layers early/mid/late and every head of the last layer."
    depth = ent.shape[0]
    out = {f'{prefix}/entropy_{name}': float(ent[i].mean()) for name, i in (('early', 0), ('mid', depth // 2), ('late', depth - 1))}
    return {**out, **{f'{prefix}/entropy_last_head{h}': float(v) for h, v in enumerate(ent[-1])}}


def validate(eval_fn: Callable, params, val_batches: list, key, prefix: str) -> dict:
    "Loss, t-bin losses and attention entropy of replicated `params` over fixed sharded validation batches."
    tot = None
    for b in val_batches:
        out = unreplicate(eval_fn(params, b, key))
        tot = out if tot is None else jax.tree.map(np.add, tot, out)
    bins = np.asarray(bin_means(tot['bin_sums'], tot['bin_counts']))
    out = {f'{prefix}/loss': float(tot['loss_sum'] / tot['count'])}
    out.update({f'{prefix}/loss_tbin_{i}': float(v) for i, v in enumerate(bins)})
    return {**out, **entropy_metrics(tot['attn_entropy'] / len(val_batches))}


# %% [markdown]
# On the host, the sums of every validation batch add up; the bin means come from `flow.bin_means`
# (NaN for an empty bin), and the entropy is logged for an early, a middle and the last layer, and per
# head of the last layer.

# %%
eval_fn = make_eval_step(mc, tc, 0.18215)
vb = [shard(synthetic_batch(8, mc, seed=1), n_dev)]
vkey = replicate(jax.random.PRNGKey(1))
ev = validate(eval_fn, state.params, vb, vkey, 'val')
np.testing.assert_equal(ev, validate(eval_fn, state.params, vb, vkey, 'val'))  # fixed episodes and keys: same numbers
assert np.isfinite(ev['val/loss']) and {'attn/entropy_early', 'attn/entropy_late', 'attn/entropy_last_head1'} <= set(ev)


# %% [markdown]
# ## Metrics on the host
#
# Nothing leaves the device between log steps: each step's metrics are kept as device arrays and fetched
# together at the next log step. There a loss EMA over the interval's step losses (decay 0.99 per step: ours, not the seed's), the interval means and the
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
    "Interval means, last-step norms, t-bin means and the updated loss EMA (0.99 per step) of fetched step metrics."
    ms = [unreplicate(m) for m in pending]
    for m in ms: loss_ema = float(m['loss']) if loss_ema is None else alpha * loss_ema + (1 - alpha) * float(m['loss'])
    mean = lambda k: float(np.mean([m[k] for m in ms]))
    bins = np.asarray(bin_means(sum(m['bin_sums'] for m in ms), sum(m['bin_counts'] for m in ms)))
    out = {'train/loss': mean('loss'), 'train/loss_ema': loss_ema, 'train/grad_norm': mean('grad_norm'),
           'train/grad_norm_clipped': mean('grad_norm_clipped'), 'train/param_norm': float(ms[-1]['param_norm']),
           'train/lr': float(ms[-1]['lr'])}
    return {**out, **{f'train/loss_tbin_{i}': float(v) for i, v in enumerate(bins)}}, loss_ema


# %% [markdown]
# Two fetched steps (replicated, as the step returns them) summarise to their means and the last step's norms;
# a non-finite one is named by its step.

# %%
def _m(loss, finite=True):
    return replicate(dict(loss=np.float32(loss), grad_norm=np.float32(2.0), grad_norm_clipped=np.float32(1.0),
                          param_norm=np.float32(3.0), lr=np.float32(1e-3), finite=np.bool_(finite),
                          bin_sums=np.ones(10, np.float32), bin_counts=np.ones(10, np.float32)))
out, ema = train_summary([_m(1.0), _m(3.0)], None)
test_eq((out['train/loss'], out['train/param_norm']), (2.0, 3.0)); test_close(ema, 0.99 * 1.0 + 0.01 * 3.0)
check_finite([_m(1.0)], 5)
test_fail(lambda: check_finite([_m(1.0), _m(np.nan, finite=False)], 5), contains='at step 6')
