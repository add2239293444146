# %% [markdown]
# # Train
#
# > The training loop: a `Trainer` that holds one run — the state on the device mesh (replicated or FSDP-sharded), the data stream and its position, checkpoints, metrics, sample grids and evaluation hooks — and resumes exactly; `train` runs it to the end or to a stop signal.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import signal, sys, threading, time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import jax, jax.numpy as jnp

from fsdit.config import ModelConfig, TrainConfig, check_batch, check_align, config_to_dict, interval_text
from fsdit.data import latents_at
from fsdit.dit import DiT
from fsdit.flow import condition
from fsdit.images import to_uint8, image_grid, label_rows, save_png
from fsdit.run import (RunLog, RunLock, CheckpointError, write_run_config, checkpoint_manager, save_checkpoint,
                       restore_latest, quarantine_checkpoint, os_reason)
from fsdit.sampler import sample
from fsdit.state import TrainState
from fsdit.perf import cost, device_peak, mfu
from fsdit.steps import (make_train_step, make_eval_step, compiled_step, layout_for, to_host, validate, check_finite,
                         train_summary)
from fsdit.utils import patch_to, LatentScaling

# %%
import os, shutil, tempfile, types
from fastcore.test import test_eq, test_close
from fsdit.config import model_config, train_config
from fsdit.run import (RunInUse, read_run_config, run_json, run_records, saved_steps, last_logged_step,
                       restore_checkpoint)
from fsdit.state import create_state
from fsdit.steps import NonFiniteLoss
from fsdit.testing import synthetic_source, raises

mc = model_config('mu')
tc = train_config('test', max_steps=10, eval_every=10, sample_every=10, save_every=5, keep=1, sample_steps=2)


# %% [markdown]
# ## Sample grids
#
# Every `sample_every` steps process 0 draws a grid from the EMA parameters on the first validation
# episodes: the K support images, the target, the plain conditional sample (guidance off, CFG scale 1: the row that
# shows whether the condition was learned) and the guided one at `cfg_scale` (over `cfg_interval`), each from the same fixed noise,
# every row labelled, so that grids of successive steps are comparable. `decode` maps posterior-space
# latents (N, h, w, c) to images in [-1, 1] (the VAE decoder; the identity in pixel mode).

# %%
#| export
def sample_grid(mc: ModelConfig, tc: TrainConfig, params, batch: dict, decode: Callable, scaling: LatentScaling,
                n: int = 8) -> np.ndarray:
    "Labelled rows for the first n episodes of a host batch: supports, target, conditional and guided samples."
    b = {k: v[:n] for k, v in batch.items()}
    cond, model = condition(b, mc, scaling), DiT(mc)
    noise = jax.random.normal(jax.random.PRNGKey(tc.seed + 2), b['moments'].shape[:1] + b['moments'].shape[-3:])
    gen = [sample(model.apply, params, noise, cond, steps=tc.sample_steps, cfg_scale=s, cfg_interval=tc.cfg_interval)
           for s in (None, tc.cfg_scale)]
    show = lambda z: to_uint8(decode(jnp.asarray(z, jnp.float32)), rgb=True)
    K = b['support_latents'].shape[1]
    rows = [show(b['support_latents'][:, k]) for k in range(K)] + [show(latents_at(b['moments']))]
    rows += [show(scaling.to_posterior(g)) for g in gen]
    labels = [f'support {k + 1}' for k in range(K)] + ['target', 'CFG 1', f'CFG {tc.cfg_scale:g}{interval_text(tc.cfg_interval)}']
    return label_rows(image_grid(rows), labels, rows[0].shape[1] + 2)


# %%
src = synthetic_source(mc, tc, space='pixel')
params = create_state(mc, tc).params
g = sample_grid(mc, tc, params, src.val_batches()[0], lambda z: z, LatentScaling(), n=3)
test_eq(g.shape[0], (5 + 3) * (28 + 2)); assert g.shape[1] > 3 * (28 + 2) and g.dtype == np.uint8


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
# `Trainer` holds one run: the state on the device mesh (`fsdit.steps.Layout`: replicated, or sharded with
# `TrainConfig.fsdp`), the data stream and its position, the checkpoints and the log. It is written over the
# next cells, one concern each: opening the run, restoring it, the loop, a step's record, and saving. The
# later cells add their methods to the class with `fsdit.utils.patch_to`.
#
# Nothing is written before every setting has been checked against the data (shots per class, episodes per
# batch, batch per device), so a refused command leaves no `config.json` for the corrected one to trip over.
# Then the run directory gets its configs as `config.json` (resuming with a different model is refused), the
# newest readable checkpoint, and its log.

# %%
#| export
class Trainer:
    "One run in `out_dir`: state on the device mesh, data stream, checkpoints, metrics; resumes if it can."
    def __init__(self, mc: ModelConfig, tc: TrainConfig, source, out_dir, decode: Callable | None = None,
                 extra: dict | None = None, hooks: Sequence[Callable[[Any, int], dict]] = ()):
        check_batch(tc.batch_size, jax.device_count(), jax.process_count()); check_align(mc, tc)
        self.mc, self.tc, self.source, self.out = mc, tc, source, Path(out_dir)
        self.main, self.layout = jax.process_index() == 0, layout_for(tc)
        self.scaling = source.scaling   # the store's VAE scaling factor (1 in pixel space)
        self.decode, self.hooks = decode or (lambda z: z), list(hooks)
        if hasattr(source, 'check'): source.check()       # settings the data cannot meet: refused before any write
        self.val_host = source.val_batches()
        self.lock, self.ckpt, self.log = RunLock(self.out) if self.main else None, None, None
        try: self.open_run(extra)
        except BaseException: self.close(); raise

    def open_run(self, extra: dict | None):
        "Save the configs, restore the newest readable checkpoint (or start), open the log."
        mc, tc = self.mc, self.tc
        if self.main: write_run_config(self.out, mc, tc, self.source.space, extra, self.scaling)
        self.step_fn, self.eval_fn = make_train_step(mc, tc, self.scaling, self.layout), make_eval_step(mc, tc, self.scaling, self.layout)
        self.exe, self.flops, self.peak = None, None, device_peak()[0]   # the compiled step, its FLOPs per device
        self.ckpt = checkpoint_manager(self.out, tc.keep)
        state, meta = self.restore()
        state = jax.device_put(state, self.layout.shardings(state))   # exactly the compiled step's layout (a no-op when it is)
        self.step, self.position, self.loss_ema = int(to_host(state.step)), meta.get('data'), meta.get('loss_ema')
        self.start_step, self.state, self.pending, self.clock = self.step, state, [], None
        self.val = [self.layout.put_batch(b) for b in self.val_host]
        self.val_key = self.layout.put(jax.random.PRNGKey(tc.seed + 1))
        self.log = RunLog(self.out, {'model': config_to_dict(mc), 'train': config_to_dict(tc)}, tc, active=self.main)
        self.log.truncate(self.step, self.warn)
        self.last: dict = {}

    def warn(self, msg: str):
        if self.main: print(f"fsdit train: {msg}", file=sys.stderr)

    def close(self):
        "Close the checkpoints and the log, and release the run directory."
        for part in (self.ckpt, self.log):
            if part is not None: part.close()
        if self.lock is not None: self.lock.release(); self.lock = None


# %%
tmp = Path(tempfile.mkdtemp())
tc12 = train_config('test', shots=12)
raises(lambda: Trainer(mc, tc12, synthetic_source(mc, tc12), tmp / 'refused'), 'shots 12 needs')
assert not (tmp / 'refused').exists()     # refused before anything was written


# %% [markdown]
# A new `Trainer` on a run directory with checkpoints continues from the newest readable one — parameters, EMA,
# optimizer state, step, key, data position and loss EMA — so the losses after a resume are those of an
# uninterrupted run (shown under *Exact resume* below). A checkpoint damaged after it was written is moved aside
# (`fsdit.run.quarantine_checkpoint`) and the one before it is taken, saying so.

# %%
#| export
@patch_to(Trainer)
def restore(self) -> tuple[TrainState, dict]:
    "The newest readable checkpoint, read into the layout's shardings; damaged newer ones are moved to RUN/checkpoints_damaged/. A fresh state if none."
    fresh = self.layout.create(self.mc, self.tc)
    got = restore_latest(self.ckpt, fresh)
    if got is None: return fresh, {}
    state, meta, damaged = got
    for step, why in sorted(damaged.items(), reverse=True):
        dst = quarantine_checkpoint(self.out, step) if self.main else None   # process 0 moves it, the others wait below
        self.warn(f"checkpoint {step} is damaged ({why}); moved to {dst}, resuming from step {int(to_host(state.step))}")
    if damaged:   # a manager that has not seen the move would count the damaged steps as kept
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('fsdit: damaged checkpoints moved')
        self.ckpt.close(); self.ckpt = checkpoint_manager(self.out, self.tc.keep)
    return state, meta


# %% [markdown]
# A new run starts at step 0 with nothing saved, its configs and the store's latent scale in `config.json`;
# the run directory is locked while the trainer is open:

# %%
tr = Trainer(mc, tc, synthetic_source(mc, tc), tmp / 'run')
test_eq((tr.step, tr.position, tr.loss_ema, saved_steps(tmp / 'run')), (0, None, None, []))
test_eq(read_run_config(tmp / 'run'), (mc, tc)); test_eq(run_json(tmp / 'run')['latent_scale'], tr.scaling.scale)
raises(lambda: Trainer(mc, tc, synthetic_source(mc, tc), tmp / 'run'), 'in use by another', RunInUse)


# %% [markdown]
# The loop. The step is compiled ahead of time on the first batch, and XLA's cost analysis of that executable
# gives the model FLOPs of one step per device. A stop request ends the loop at a step boundary, and the run
# is saved there.

# %%
#| export
@patch_to(Trainer)
def run(self, stop: StopSignal | None = None) -> dict:
    "Train until `max_steps` or a stop request, then save; returns the last logged metrics."
    batches = self.source.batches(self.position)
    while self.step < self.tc.max_steps and not self.stop_requested(stop):
        batch, self.position = next(batches)
        b = self.layout.put_batch(batch)
        if self.exe is None: self.compile(b)
        self.state, m = self.exe(self.state, b)
        self.pending.append(m); self.step += 1
        self.after_step()
    if self.pending: self.log.log(self.step, self.train_metrics())  # stopped between log steps
    self.save()
    return self.last


@patch_to(Trainer)
def compile(self, batch):
    "Compile the step ahead of time (once) and read its FLOPs per device from XLA's cost analysis."
    self.exe = compiled_step(self.step_fn, self.state, batch)
    self.flops = cost(self.exe)['flops'] or None


@patch_to(Trainer)
def stop_requested(self, stop: StopSignal | None) -> bool:
    "Whether to stop now; several processes decide together at log steps (any one asked: all stop)."
    if stop is None: return False
    if jax.process_count() == 1: return stop.requested
    if self.step % self.tc.log_every: return False
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(stop.requested))).any())


# %%
assert tr.exe is None                          # nothing is compiled before the first batch
assert not tr.stop_requested(None) and tr.stop_requested(types.SimpleNamespace(requested=True))


# %% [markdown]
# After each step its record: the step metrics every `log_every` steps, validation every `eval_every`, a sample
# grid every `sample_every`, the hooks every `fewshot_every`, a checkpoint every `save_every`. A step's record
# goes to `metrics.jsonl` before its checkpoint: a run killed between the two resumes from the checkpoint before
# and writes the record again, equal to the lost one.
#
# Each log step turns the FLOPs into `train/tflops_per_device` (FLOPs over the measured step time) and
# `train/mfu` (that over the device's peak: the bf16 datasheet figure of TPUs and GPUs, or on a CPU a matmul
# measured at start, `fsdit.perf.device_peak`).

# %%
#| export
@patch_to(Trainer)
def after_step(self):
    "Log, evaluate, draw samples and save when their intervals come round."
    s, tc, last = self.step, self.tc, self.step == self.tc.max_steps
    if s == self.start_step + 1: self.restart_clock(self.pending[-1])  # compilation is not timed
    rec, images = {}, {}
    if s % tc.log_every == 0 or last: rec.update(self.train_metrics())
    if s % tc.eval_every == 0 or last: rec.update(self.eval_metrics(rec.get('train/loss')))
    grid, hooks = s % tc.sample_every == 0 or last, bool(tc.fewshot_every) and (s % tc.fewshot_every == 0 or last)
    # every process fetches (under FSDP a gather is a collective); process 0 draws and evaluates
    ema = self.layout.fetch(self.state.ema_params) if grid or hooks else None
    if grid and self.main: images = self.samples(ema)
    if hooks and self.main: rec.update(self.run_hooks(ema))
    if rec or images: self.log.log(s, rec, images); self.last = {'step': s, **rec, **images}
    if s % tc.save_every == 0: self.save()   # after the step's record: a kill between the two loses nothing
    if rec or images: self.restart_clock(None)


@patch_to(Trainer)
def restart_clock(self, wait_for):
    if wait_for is not None: jax.block_until_ready(wait_for)
    self.clock = (time.perf_counter(), self.step)


@patch_to(Trainer)
def train_metrics(self) -> dict:
    "Fetch the interval's step metrics (the NaN check happens here) and time the interval."
    check_finite(self.pending, self.step - len(self.pending) + 1)
    out, self.loss_ema = train_summary(self.pending, self.loss_ema)
    self.pending = []
    t0, n = self.clock[0], self.step - self.clock[1]
    if n > 0:
        dt = time.perf_counter() - t0
        out.update({'train/step_time': dt / n, 'train/samples_per_s': n * self.tc.batch_size / dt})
        if self.flops: out.update({f'train/{k}': v for k, v in mfu(self.flops, dt / n, self.peak).items()})
    return out


@patch_to(Trainer)
def eval_metrics(self, train_loss: float | None) -> dict:
    "Validation loss and t-bins for the live and the EMA parameters, the train-val gap, attention entropy."
    live = validate(self.eval_fn, self.state.params, self.val, self.val_key, 'val')
    ema = validate(self.eval_fn, self.state.ema_params, self.val, self.val_key, 'val_ema')
    ema = {k: v for k, v in ema.items() if k.startswith('val_ema/')}  # attention entropy: live model only
    # val minus train: positive when the validation episodes are harder (the original logged the opposite sign)
    gap = {} if train_loss is None else {'val/train_val_gap': live['val/loss'] - train_loss}
    return {**live, **ema, **gap}


# %% [markdown]
# At the start the EMA parameters are the parameters, so the two validation losses agree; the gap is validation
# minus train:

# %%
ev = tr.eval_metrics(1.0)
test_eq(ev['val_ema/loss'], ev['val/loss']); test_close(ev['val/train_val_gap'], ev['val/loss'] - 1.0)
assert 'attn/entropy_late' in ev and 'val_ema/attn/entropy_late' not in ev


# %% [markdown]
# Sample grids and hooks see the EMA parameters; a checkpoint is written once per step, and never of a
# non-finite state.

# %%
#| export
@patch_to(Trainer)
def samples(self, ema) -> dict:
    "A sample grid from the (fetched) EMA parameters, saved as RUN/samples/step_NNNNNNN.png."
    grid = sample_grid(self.mc, self.tc, ema, self.val_host[0], self.decode, self.scaling)
    return {'samples/grid': str(save_png(grid, self.out / 'samples' / f'step_{self.step:07d}.png'))}


@patch_to(Trainer)
def run_hooks(self, ema) -> dict:
    "The evaluation hooks' metrics of the (fetched) EMA parameters (e.g. `fsdit.eval.FewShotHook`)."
    out = {}
    for hook in self.hooks: out.update(hook(ema, self.step))
    return out


@patch_to(Trainer)
def save(self):
    "Checkpoint the current step, unless it is saved already; a non-finite state is never saved."
    check_finite(self.pending, self.step - len(self.pending) + 1)
    before = self.ckpt.latest_step()
    if before == self.step: return
    try: save_checkpoint(self.ckpt, self.state, {'data': self.position, 'loss_ema': self.loss_ema})
    except Exception as e:   # a full disk: orbax keeps the earlier checkpoints, its half-written one is not taken
        raise CheckpointError(f"checkpoint {self.step} could not be written ({os_reason(e)}); the earlier ones are intact: "
                              f"make room and run the same command again (it resumes from step {before or 0})") from e


# %%
test_eq(tr.run_hooks(None), {})                # no hooks given
tr.save(); tr.save()                           # the second is a no-op: step 0 is saved already
test_eq(saved_steps(tmp / 'run'), [0])
tr.close(); RunLock(tmp / 'run').release()     # closed: the run directory is free again


# %% [markdown]
# `train` is the whole run. A NaN or Inf loss raises `NonFiniteLoss` at the next log or save step, before
# anything is written: the checkpoints on disk are all from before the failure.

# %%
#| export
def train(mc: ModelConfig, tc: TrainConfig, source, out_dir, decode: Callable | None = None, extra: dict | None = None,
          hooks: Sequence[Callable[[Any, int], dict]] = ()) -> dict:
    """Train (or resume) the run in `out_dir` until `tc.max_steps`; returns the last logged metrics.
    `decode` turns latents into images in [-1, 1] (sample grids); every `tc.fewshot_every` steps each of the
    `hooks` is called with the EMA parameters and the step and returns metrics to log (`fsdit.eval.FewShotHook`)."""
    trainer = Trainer(mc, tc, source, out_dir, decode, extra, hooks)
    try:
        with StopSignal() as stop: return trainer.run(stop)
    finally: trainer.close()


# %% [markdown]
# A short run on the synthetic store: the loss falls, every metric lands in `metrics.jsonl` (empty t-bins as
# `null`), a sample grid is written, and the last `keep` checkpoints are on disk. The run is kept as the
# reference of the resume below.

# %%
ref = tmp / 'ref'
last = train(mc, tc, synthetic_source(mc, tc), ref)
recs = run_records(ref)
test_eq([r['step'] for r in recs], [5, 10]); test_eq(saved_steps(ref), [10]); assert Path(last['samples/grid']).exists()
assert recs[1]['train/loss'] < recs[0]['train/loss'] and recs[1]['train/samples_per_s'] > 0
assert recs[1]['train/tflops_per_device'] > 0 and 0 < recs[1]['train/mfu'] < 2   # a measured CPU peak can be beaten a little
assert {'val/loss', 'val_ema/loss', 'val/train_val_gap', 'attn/entropy_late', 'train/loss_tbin_9'} <= set(recs[1])

# %% [markdown]
# ### Evaluation hooks
#
# The trainer imports no evaluation code. Like big_vision's evaluators, which receive a predict function,
# a hook receives what it needs — the EMA parameters (host arrays) and the step — every `fewshot_every` steps
# on process 0 and returns metrics to log. `fsdit.eval.FewShotHook` is the few-shot one (`fsdit train` and the
# demo pass it); any callable works:

# %%
seen = []
tc_h = train_config('test', max_steps=4, log_every=2, eval_every=4, sample_every=4, save_every=4, sample_steps=2, fewshot_every=2)
with tempfile.TemporaryDirectory() as run_dir:
    train(mc, tc_h, synthetic_source(mc, tc_h), run_dir, hooks=[lambda p, s: seen.append(s) or {'hook/n_leaves': len(jax.tree.leaves(p))}])
    recs = run_records(run_dir)
    test_eq(run_json(run_dir)['latent_scale'], 1.0)
test_eq(seen, [2, 4]); test_eq([r['hook/n_leaves'] for r in recs], [len(jax.tree.leaves(params))] * 2)


# %% [markdown]
# ### Exact resume
#
# A run stopped by SIGTERM (a Kaggle session ending, a pod preempted) while its third batch is drawn saves step 3
# and ends; the same call again resumes there and ends equal to the uninterrupted run above: every array of the
# state, the data position, the loss EMA, and the whole log interval after the resume (timings and the grid's
# path aside). `tests/test_train.py` checks the same through `fsdit train`, and `tests/test_faults.py` after a
# SIGKILL and with damaged checkpoints.

# %%
def stopping_at(src, i: int):
    "`src` with SIGTERM sent to this process while batch `i` of a fresh start is drawn, as a preempted run receives it."
    batches = src.batches
    def gen(position=None):
        for j, item in enumerate(batches(position)):
            if position is None and j == i: os.kill(os.getpid(), signal.SIGTERM)   # handled at the step boundary
            yield item
    src.batches = gen
    return src

def final_state(run_dir):
    "The state and meta of a run's newest checkpoint."
    m = checkpoint_manager(run_dir, tc.keep); got = restore_checkpoint(m, create_state(mc, tc)); m.close()
    return got

run_b = tmp / 'stopped'
train(mc, tc, stopping_at(synthetic_source(mc, tc), 2), run_b)
test_eq((saved_steps(run_b), last_logged_step(run_b)), ([3], 3))       # stopped and saved at step 3
train(mc, tc, synthetic_source(mc, tc), run_b)                          # the same call again: resumes from step 3
(a, ma), (b, mb) = final_state(ref), final_state(run_b)
test_eq((int(b.step), mb), (10, ma))                                    # data position and loss EMA
for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)): np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
skip = ('train/step_time', 'train/samples_per_s', 'train/tflops_per_device', 'train/mfu', 'samples/grid')
ra, rb = ({r['step']: {k: v for k, v in r.items() if k not in skip} for r in run_records(d)} for d in (ref, run_b))
test_eq(sorted(rb), [3, 5, 10]); test_eq(rb[10], ra[10])                # steps 6-10: the same record, bit for bit


# %% [markdown]
# ### Stopping on NaN
#
# A run whose loss becomes NaN — here the targets of step 7 are NaN — stops at the next log step with
# `NonFiniteLoss` naming the step; nothing after the failure is written: the last checkpoint and the last record
# are those of step 5, from before it, and the run can be resumed from there once the cause is fixed.

# %%
def poisoned_at(src, i: int):
    "`src` with NaN targets in batch `i`."
    batches = src.batches
    def gen(position=None):
        for j, (b, pos) in enumerate(batches(position)):
            yield ({**b, 'moments': np.full_like(b['moments'], np.nan)} if j == i else b), pos
    src.batches = gen
    return src

run_n = tmp / 'nan'
raises(lambda: train(mc, tc, poisoned_at(synthetic_source(mc, tc), 6), run_n), 'NaN/Inf at step 7', NonFiniteLoss)
test_eq((saved_steps(run_n), last_logged_step(run_n)), ([5], 5))
assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final_state(run_n)[0]))
shutil.rmtree(tmp)
