# %% [markdown]
# # Train and eval steps
#
# > The pure train and validation steps on the global batch, and the one place that lays the run out over the devices: `jax.jit` over a device `Mesh` with `NamedSharding` — the batch split along the data axis, the state replicated or (FSDP) sharded — with metrics fetched on the host only at log steps.

# %%
#| default_exp steps

# %%
#| export
from __future__ import annotations
import functools
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable
import numpy as np
import jax, jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fsdit.config import ModelConfig, TrainConfig
from fsdit.dit import DiT
from fsdit.flow import example_keys, loss_fn, t_bin_stats, bin_means
from fsdit.state import TrainState, init_state, make_optimizer, lr_schedule, ema_update
from fsdit.perf import compiled
from fsdit.utils import data_mesh, DATA_AXIS, LatentScaling

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
# The loss is `fsdit.flow.loss_fn`, the flow-matching MSE of the model's velocity, and the step is written
# for the whole global batch: one optimizer step, no host sync, no Python side effects. How the batch and the
# state are spread over devices is not the step's business — `jax.jit` with shardings (below) partitions it,
# and XLA inserts the reductions a data-parallel step needs. Each example's noise and time come from its
# global index (`fsdit.flow.example_keys`), so the step draws the same numbers on one device or on many.
#
# The per-example losses go into 10 t-bins as sums and counts: a bin's mean is sum / count over the whole
# batch (NaN when empty) — the seed averaged per-device bin means with empty bins counted as 0, which reads
# the edge bins too low. Metrics stay on the device until a log step fetches them; `finite` is the NaN/Inf
# check. The grad norm is reported before clipping and after it ($\min(\|g\|, c)$ is exactly the norm
# clipping leaves).

# %%
#| export
AXIS = DATA_AXIS  # the mesh axis: the batch is split along it, and under FSDP the state too


def global_norm(tree) -> jax.Array: return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def compute_grads(state, batch, *, model, mc, tc, scaling):
    "The objective of the global batch, its gradients, and `loss_fn`'s aux: per-example flow losses, t (and `align`)."
    keys = example_keys(state.key, state.step, batch['moments'].shape[0])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, batch, keys, mc, tc, scaling)
    return loss, grads, aux


def train_step(state: TrainState, batch: dict, *, model, tx, mc, tc, scaling, grad_sharding=None):
    "One optimizer step on the batch; returns the new state and metrics. `grad_sharding`: where gradients live (FSDP)."
    objective, grads, aux = compute_grads(state, batch, model=model, mc=mc, tc=tc, scaling=scaling)
    if grad_sharding is not None: grads = jax.lax.with_sharding_constraint(grads, grad_sharding)  # reduce-scatter
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    bin_sums, bin_counts = t_bin_stats(aux['loss'], aux['t'])
    metrics = dict(loss=aux['loss'].mean(), grad_norm=grad_norm, grad_norm_clipped=jnp.minimum(grad_norm, tc.grad_clip),
                   param_norm=global_norm(params), lr=lr_schedule(tc)(state.step),
                   finite=jnp.isfinite(objective) & jnp.isfinite(grad_norm), bin_sums=bin_sums, bin_counts=bin_counts)
    if 'align' in aux: metrics['align'] = aux['align']   # the representation loss, 1 - cos (fsdit.flow.align_loss)
    return state.replace(params=params, ema_params=ema_update(state.ema_params, params, tc.ema_decay),
                         opt_state=opt_state, step=state.step + 1), metrics


# %% [markdown]
# ## The layout: a mesh, and where each array lives
#
# `Layout` is the one place that knows how a run sits on its devices. Its mesh (`fsdit.utils.data_mesh`) is one
# axis, `AXIS`, over every device of every process. The batch is always split along it (each process feeds its
# own rows, as the data stream gives them). The state is either
#
# - **replicated** (data parallel, the default): every device holds all of it, as `pmap` did; or
# - **FSDP** (`TrainConfig.fsdp`, ZeRO-3): parameters, EMA and both Adam moments split over the devices, so
#   each holds $1/n$ of them. XLA gathers a layer's weights where the layer needs them and reduce-scatters
#   the gradients back to the shards.
#
# The sharding rule is per tensor: a tensor of at least `min_shard` elements is split along its largest
# dimension that the device count divides; smaller ones (biases, norms, the step counter, the key) stay
# replicated — splitting them saves nothing and costs a collective each.
#
# Host data goes onto the mesh with `put` (a state: every process holds the same host copy) and
# `put_batch` (this process's rows of the global batch); `fetch` brings arrays back, gathering sharded
# ones first — with several processes every process must call it together, as with any collective.

# %%
#| export
def make_mesh(devices=None) -> Mesh:
    "A one-axis mesh (`AXIS`) over `devices` (default: every device of every process)."
    return data_mesh(jax.devices() if devices is None else devices)


@functools.lru_cache(maxsize=16)
def _gather_fn(sharding: NamedSharding) -> Callable:
    return jax.jit(lambda tree: tree, out_shardings=sharding)


@functools.lru_cache(maxsize=8)
def _init_fn(layout: 'Layout', mc: ModelConfig, tc: TrainConfig) -> Callable:
    "`init_state` under jit with the layout's output shardings (cached: one compilation per model, recipe and layout)."
    return jax.jit(lambda: init_state(mc, tc), out_shardings=layout.shardings(jax.eval_shape(lambda: init_state(mc, tc))))


# %%
_m = make_mesh()
test_eq((_m.axis_names, _m.size), ((AXIS,), jax.device_count()))


# %% [markdown]
# `Layout` holds the mesh and the sharding rule:

# %%
#| export
@dataclass(frozen=True)
class Layout:
    "Where a run's arrays live: the batch split along `AXIS`; the state replicated, or sharded when `fsdp`."
    mesh: Mesh
    fsdp: bool = False
    min_shard: int = 16384       # FSDP: tensors with fewer elements stay replicated

    @property
    def n(self) -> int: return self.mesh.size
    @property
    def replicated(self) -> NamedSharding: return NamedSharding(self.mesh, P())
    @property
    def batch(self) -> NamedSharding: return NamedSharding(self.mesh, P(AXIS))

    def spec(self, shape) -> P:
        "The rule for one tensor: split its largest dimension the device count divides, if it is big enough and `fsdp`."
        shape = tuple(shape)
        if not self.fsdp or self.n == 1 or int(np.prod(shape, dtype=np.int64)) < self.min_shard: return P()
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % self.n == 0: return P(*[AXIS if i == d else None for i in range(len(shape))])
        return P()

    def shardings(self, tree) -> Any:
        "A `NamedSharding` for every leaf of `tree` (arrays or shape structs)."
        return jax.tree.map(lambda x: NamedSharding(self.mesh, self.spec(np.shape(x))), tree)

    def create(self, mc: ModelConfig, tc: TrainConfig) -> TrainState:
        "A fresh state made directly in its shardings (never whole on one device)."
        return _init_fn(self, mc, tc)()

    def put(self, tree) -> Any:
        "Host arrays, the same on every process, onto the mesh in their shardings."
        def one(x, s):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        return jax.tree.map(one, tree, self.shardings(tree))

    def put_batch(self, batch: dict) -> dict:
        "This process's rows of the global batch as global arrays split along `AXIS`."
        n_local = len(self.mesh.local_devices)
        B = len(next(iter(batch.values())))
        if B % n_local:
            raise ValueError(f"a batch of {B} rows cannot be split evenly over this process's {n_local} devices; "
                             f"make the batch size a multiple of {n_local * jax.process_count()}")
        return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v)) for k, v in batch.items()}

    def fetch(self, tree) -> Any:
        "Whole host copies of device arrays; sharded ones are gathered first (with several processes: call on all)."
        if any(isinstance(x, jax.Array) and not x.is_fully_replicated for x in jax.tree.leaves(tree)):
            tree = _gather_fn(self.replicated)(tree)
        return to_host(tree)


# %% [markdown]
# On the `mu` model with FSDP over one device nothing is split (there is nothing to split over). With a
# layout that pretends to have 4 devices the rule shows itself: a `(128, 512)` kernel is split along its 512
# outputs, a bias of 512 stays whole, and a tensor no dimension of which the device count divides stays whole.

# %%
class _FakeMesh:   # only `size` is read by `spec`
    size = 4
lay4 = Layout(_FakeMesh(), fsdp=True, min_shard=1024)
test_eq(lay4.spec((128, 512)), P(None, AXIS)); test_eq(lay4.spec((512,)), P())
test_eq(lay4.spec((3, 5, 7, 9)), P()); test_eq(lay4.spec((2, 2, 4, 1024)), P(None, None, None, AXIS))
test_eq(Layout(_FakeMesh(), fsdp=False).spec((128, 512)), P())


# %% [markdown]
# `to_host` copies replicated arrays back; `layout_for` is the layout a run uses:

# %%
#| export
def to_host(tree) -> Any:
    "Host numpy copies of arrays every device holds whole (replicated metrics and state, fetched trees)."
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated: raise ValueError("this array is split over processes: gather it with Layout.fetch")
            x = x.addressable_data(0)
        return np.asarray(x)
    return jax.tree.map(one, tree)


def layout_for(tc: TrainConfig, devices=None) -> Layout:
    "The layout a run of `tc` uses: every device; FSDP when `tc.fsdp`, for tensors of at least `tc.fsdp_min_size` elements."
    return Layout(make_mesh(devices), fsdp=tc.fsdp, min_shard=tc.fsdp_min_size)


# %%
lay = layout_for(tc)
st = lay.create(mc, tc)
for a, b_ in zip(jax.tree.leaves(st), jax.tree.leaves(create_state(mc, tc))): np.testing.assert_array_equal(a, b_)
test_eq(lay.fetch(lay.put({'w': np.arange(6.0)}))['w'], np.arange(6.0))
test_eq(to_host({'a': jnp.arange(3)})['a'], np.arange(3))


# %% [markdown]
# ## The compiled steps
#
# `make_train_step` is the step under `jax.jit` with the layout's shardings on the way in and out: the state
# keeps its shardings from step to step, the batch comes split along `AXIS`, and the metrics come out
# replicated, so every process can read them without a collective. Under FSDP the gradients are pinned to
# the parameters' shardings, which makes XLA reduce-scatter them instead of all-reducing whole gradients.
#
# On accelerators the state's buffers are donated: the step updates them in place and the peak holds two
# parameter-sized buffers fewer. On the CPU backend they are not: there XLA, given the donated state, keeps the
# gradients and the updates in two parameter-sized temporaries of their own (1.25 GB more at B/2), and the step
# was slower in every interleaved round at B/2 (`BENCHMARKS.md`).

# %%
#| export
def donate_state() -> bool:
    "Whether the train step donates the state by default: on accelerators yes, on the CPU backend no."
    return jax.default_backend() != 'cpu'


def state_shardings(layout: Layout, mc: ModelConfig, tc: TrainConfig) -> TrainState:
    "The shardings of a `TrainState` of `mc` and `tc` in `layout`."
    return layout.shardings(jax.eval_shape(lambda: init_state(mc, tc)))


@functools.lru_cache(maxsize=8)
def make_train_step(mc: ModelConfig, tc: TrainConfig, scaling: LatentScaling, layout: Layout,
                    donate: bool | None = None) -> Callable:
    "The train step over `layout`: (state, batch split along `AXIS`) -> (state, replicated metrics)."
    donate = donate_state() if donate is None else donate
    sh = state_shardings(layout, mc, tc)
    fn = partial(train_step, model=DiT(mc), tx=make_optimizer(tc), mc=mc, tc=tc, scaling=scaling,
                 grad_sharding=sh.params if layout.fsdp else None)
    return jax.jit(fn, in_shardings=(sh, layout.batch), out_shardings=(sh, layout.replicated),
                   donate_argnums=(0,) if donate else ())


_EXES: dict = {}


def compiled_step(step_fn: Callable, *args):
    """`step_fn` (a jit function) compiled ahead of time for arguments like `args` — same shapes, dtypes and
    shardings — so that XLA's cost analysis of the very executable that runs can be read. Cached per process:
    a second run of the same model and layout (a resume, another trainer) reuses it."""
    leaves, tree = jax.tree.flatten(args)
    key = (step_fn, tree, tuple((np.shape(x), str(x.dtype), getattr(x, 'sharding', None)) for x in leaves))
    if key not in _EXES:
        if len(_EXES) >= 8: _EXES.pop(next(iter(_EXES)))
        _EXES[key] = compiled(step_fn, *args)
    return _EXES[key]


# %% [markdown]
# The trainer calls the step through `compiled_step`: compiled ahead of time, so that XLA's cost analysis of the
# executable that runs gives the step's FLOPs (for MFU), and cached, so that a resumed run or a second trainer
# of the same model and layout in one process does not compile again.
#
# One step on the `mu` model: the loss is finite, the step counter moves, clipping caps the norm, and the
# EMA moved by exactly $1 - d$ of the update.

# %%
step_fn = make_train_step(mc, tc, LatentScaling(0.18215), lay)
state = lay.create(mc, tc)
p0 = lay.fetch(state.params)
batch = lay.put_batch(synthetic_batch(tc.batch_size, mc))
exe = compiled_step(step_fn, state, batch)
assert compiled_step(step_fn, state, batch) is exe      # one compilation per shapes and layout
state, m = exe(state, batch)
m = to_host(m)
assert m['finite'] and np.isfinite(m['loss']) and m['grad_norm_clipped'] <= tc.grad_clip
test_eq(int(to_host(state.step)), 1); test_eq(float(m['lr']), 0.0)  # the first warmup step has lr 0
test_eq(m['bin_counts'].sum(), tc.batch_size)
ema, p1 = lay.fetch(state.ema_params), lay.fetch(state.params)
for e, a, b_ in zip(jax.tree.leaves(ema), jax.tree.leaves(p0), jax.tree.leaves(p1)): test_close(e, tc.ema_decay * a + (1 - tc.ema_decay) * b_, eps=1e-6)

# %% [markdown]
# With the representation loss on (`align_weight`, a model with `align_depth`), the step also returns it as `align`
# (traced here, not run: `fsdit.flow` checks the values). `loss` stays the flow loss, so its curve reads the same with
# and without, and `train_summary` (below) logs `train/align`.

# %%
amc, atc = model_config('mu', align_depth=1), train_config('test', batch_size=tc.batch_size, align_weight=0.5)
astep = partial(train_step, model=DiT(amc), tx=make_optimizer(atc), mc=amc, tc=atc, scaling=LatentScaling(0.18215))
_, am_shapes = jax.eval_shape(astep, lay.create(amc, atc), batch)      # traced, not compiled: the metrics it returns
test_eq((am_shapes['align'].shape, am_shapes['loss'].shape), ((), ()))
assert 'align' not in jax.eval_shape(partial(train_step, model=DiT(mc), tx=make_optimizer(tc), mc=mc, tc=tc,
                                             scaling=LatentScaling(0.18215)), state, batch)[1]
am = {**m, 'align': np.float32(0.75)}                                  # a step's fetched metrics with the loss on


# %% [markdown]
# ## Evaluation
#
# Validation uses fixed episodes and fixed keys (the run's seed + 1, step 0) and no CFG drop, so two
# evaluations differ only through the parameters. It runs for the live and the EMA parameters and also
# returns the attention entropy per layer and head, which the DiT reports through `return_intermediates`.

# %%
#| export
def eval_step(params, batch: dict, key: jax.Array, *, model, mc, tc, scaling) -> dict:
    "Validation sums over the batch: loss sum, count, t-bin sums/counts; attention entropy (depth, heads)."
    keys = example_keys(key, 0, batch['moments'].shape[0])
    _, aux = loss_fn(params, model, batch, keys, mc, tc, scaling, train=False, intermediates=True)
    per_example = aux['loss']
    bin_sums, bin_counts = t_bin_stats(per_example, aux['t'])
    return dict(loss_sum=per_example.sum(), count=jnp.float32(per_example.shape[0]), bin_sums=bin_sums,
                bin_counts=bin_counts, attn_entropy=aux['intermediates']['attn_entropy'])


@functools.lru_cache(maxsize=8)
def make_eval_step(mc: ModelConfig, tc: TrainConfig, scaling: LatentScaling, layout: Layout) -> Callable:
    "The eval step over `layout`: (params as the state holds them, split batch, replicated key) -> replicated sums."
    sh = state_shardings(layout, mc, tc).params
    return jax.jit(partial(eval_step, model=DiT(mc), mc=mc, tc=tc, scaling=scaling),
                   in_shardings=(sh, layout.batch, layout.replicated), out_shardings=layout.replicated)


def entropy_metrics(ent: np.ndarray, prefix: str = 'attn') -> dict:
    "Attention entropy (depth, heads): layers early/mid/late and every head of the last layer."
    depth = ent.shape[0]
    out = {f'{prefix}/entropy_{name}': float(ent[i].mean()) for name, i in (('early', 0), ('mid', depth // 2), ('late', depth - 1))}
    return {**out, **{f'{prefix}/entropy_last_head{h}': float(v) for h, v in enumerate(ent[-1])}}


def validate(eval_fn: Callable, params, val_batches: list, key, prefix: str) -> dict:
    "Loss, t-bin losses and attention entropy of `params` over fixed validation batches (on the mesh)."
    tot = None
    for b in val_batches:
        out = to_host(eval_fn(params, b, key))
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
eval_fn = make_eval_step(mc, tc, LatentScaling(0.18215), lay)
vb = [lay.put_batch(synthetic_batch(8, mc, seed=1))]
vkey = lay.put(jax.random.PRNGKey(1))
ev = validate(eval_fn, state.params, vb, vkey, 'val')
np.testing.assert_equal(ev, validate(eval_fn, state.params, vb, vkey, 'val'))  # fixed episodes and keys: same numbers
assert np.isfinite(ev['val/loss']) and {'attn/entropy_early', 'attn/entropy_late', 'attn/entropy_last_head1'} <= set(ev)


# %% [markdown]
# ## Metrics on the host
#
# Nothing leaves the device between log steps: each step's metrics are kept as device arrays and fetched
# together at the next log step. There a loss EMA over the interval's step losses (decay 0.99 per step: ours, not the seed's), the interval means and the
# t-bin means of the whole interval (sums and counts over every step) are formed. The first
# non-finite step stops the run. Time per step is the wall time of the interval divided by its steps;
# the clock starts after the first step so that compilation is not counted.

# %%
#| export
class NonFiniteLoss(RuntimeError):
    "The training loss or gradient became NaN or Inf."


def check_finite(pending: list[dict], first_step: int):
    "Raise `NonFiniteLoss` naming the first step whose loss or gradient norm is not finite."
    flags = [bool(to_host(m['finite'])) for m in pending]
    if not all(flags):
        raise NonFiniteLoss(f"loss or gradient norm is NaN/Inf at step {first_step + flags.index(False)}")


def train_summary(pending: list[dict], loss_ema: float | None, alpha: float = 0.99) -> tuple[dict, float]:
    "Interval means, last-step norms, t-bin means and the updated loss EMA (0.99 per step) of fetched step metrics."
    ms = [to_host(m) for m in pending]
    for m in ms: loss_ema = float(m['loss']) if loss_ema is None else alpha * loss_ema + (1 - alpha) * float(m['loss'])
    mean = lambda k: float(np.mean([m[k] for m in ms]))
    bins = np.asarray(bin_means(sum(m['bin_sums'] for m in ms), sum(m['bin_counts'] for m in ms)))
    out = {'train/loss': mean('loss'), 'train/loss_ema': loss_ema, 'train/grad_norm': mean('grad_norm'),
           'train/grad_norm_clipped': mean('grad_norm_clipped'), 'train/param_norm': float(ms[-1]['param_norm']),
           'train/lr': float(ms[-1]['lr'])}
    if 'align' in ms[0]: out['train/align'] = mean('align')
    return {**out, **{f'train/loss_tbin_{i}': float(v) for i, v in enumerate(bins)}}, loss_ema


# %% [markdown]
# Two fetched steps (replicated, as the step returns them) summarise to their means and the last step's norms;
# a non-finite one is named by its step.

# %%
def _m(loss, finite=True):
    return lay.put(dict(loss=np.float32(loss), grad_norm=np.float32(2.0), grad_norm_clipped=np.float32(1.0),
                        param_norm=np.float32(3.0), lr=np.float32(1e-3), finite=np.bool_(finite),
                        bin_sums=np.ones(10, np.float32), bin_counts=np.ones(10, np.float32)))
out, ema = train_summary([_m(1.0), _m(3.0)], None)
test_eq((out['train/loss'], out['train/param_norm']), (2.0, 3.0)); test_close(ema, 0.99 * 1.0 + 0.01 * 3.0)
test_close(train_summary([am], None)[0]['train/align'], float(am['align']), eps=1e-6)   # the aligned step above
assert 'train/align' not in out
check_finite([_m(1.0)], 5)
test_fail(lambda: check_finite([_m(1.0), _m(np.nan, finite=False)], 5), contains='at step 6')
