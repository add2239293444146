# %% [markdown]
# # Run directory
#
# > Everything a run keeps on disk, with one owner: `config.json` (configs, space, the latent scale, the store), orbax checkpoints that resume exactly, `metrics.jsonl` and wandb, the lock that keeps a second trainer out, and `load_run` for everything that reads a trained run.

# %%
#| default_exp run

# %%
#| export
from __future__ import annotations
import contextlib, json, logging, math, os, re, shutil, sys, time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import jax
import flax

from fsdit.config import ModelConfig, TrainConfig, config_to_dict, config_from_dict
from fsdit.files import write_atomic, flat_params, unflat_params
from fsdit.state import TrainState, create_state
from fsdit.utils import LatentScaling

# %%
import tempfile, shutil
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config
from fsdit.testing import perturb

mc = model_config('mu')
tc = train_config('test', max_steps=10, eval_every=10, sample_every=10, save_every=5, keep=1, sample_steps=2)


# %% [markdown]
# ## Logging
#
# Process 0 writes every logged step as one JSON object to `RUN/metrics.jsonl` (NaN, e.g. an empty t-bin,
# is written as `null`) and, when enabled, to wandb. `read_records` is the one parser of that file (the trainer
# resuming, `run_records` below for everything else): a last line cut off by a crash is dropped (the resumed run
# writes it again), a bad line before the last is refused, naming it.

# %%
#| export
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


# %%
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / 'metrics.jsonl'
    p.write_text('{"step": 5, "train/loss": 1.5}\n\n{"step": 10, "train/lo')
    said = []; test_eq([r for _, r in read_records(p, said.append)], [{'step': 5, 'train/loss': 1.5}]); assert 'cut off' in said[0]
    p.write_text('{"step": 5, "tr\n{"step": 10}\n')
    test_fail(lambda: read_records(p), contains='line 1, is not a metrics record')


# %% [markdown]
# `RunLog` appends the records. wandb is imported only when used; `online` without `WANDB_API_KEY` becomes
# `offline`, so a run never waits for a login. A resumed run first cuts the log back to its checkpoint's step.

# %%
#| export
def wandb_mode(requested: str, env=None) -> str:
    "The wandb mode to use: 'online' falls back to 'offline' when no API key is set."
    env = os.environ if env is None else env
    return 'offline' if requested == 'online' and not env.get('WANDB_API_KEY') else requested


def _nan_none(x) -> float | None: return None if not math.isfinite(x) else float(x)


def _jsonable(v):
    if v is None or isinstance(v, (str, Path)): return None if v is None else str(v)
    return _nan_none(float(v))


class RunLog:
    "Metrics to `RUN/metrics.jsonl` and to wandb; inactive on processes other than 0."
    def __init__(self, out_dir, config: dict, tc: TrainConfig, active: bool = True):
        self.path, self.active, self.wandb = Path(out_dir) / 'metrics.jsonl', active, None
        mode = wandb_mode(tc.wandb_mode)
        if active and mode != 'disabled':
            import wandb
            os.environ['WANDB_MODE'] = mode
            self.wandb = wandb.init(project=tc.wandb_project, name=tc.wandb_name, config=config, dir=str(out_dir), mode=mode,
                                  id=_run_id(out_dir), resume='allow', settings=wandb.Settings(init_timeout=90, silent=True))

    def log(self, step: int, metrics: dict, images: dict | None = None):
        "Append one record; images (name -> PNG path) go to wandb as images and to the record as paths."
        if not self.active: return
        rec = {'step': step, **{k: _jsonable(v) for k, v in {**metrics, **(images or {})}.items()}}
        with open(self.path, 'a') as f: f.write(json.dumps(rec) + '\n')
        if self.wandb is not None:
            import wandb
            self.wandb.log({**{k: v for k, v in rec.items() if isinstance(v, float)},
                          **{k: wandb.Image(str(p)) for k, p in (images or {}).items()}}, step=step)

    def truncate(self, step: int, warn: Callable[[str], None] | None = None):
        "Drop records after `step` (a resumed run rewrites them), and a last line cut off by a crash."
        if not self.active or not self.path.exists(): return
        keep = [l for l, r in read_records(self.path, warn) if r['step'] <= step]
        write_atomic(self.path, ''.join(l + '\n' for l in keep))

    def close(self):
        if self.wandb is not None: self.wandb.finish()


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
# ## Checkpoints
#
# orbax-checkpoint writes each checkpoint to a temporary directory and renames it when complete, and keeps
# the last `keep`. A checkpoint holds only what a resume needs: parameters, EMA, optimizer state, step and
# key, and as JSON the data position and the loss EMA — nothing else goes in. The arrays are saved as they lie
# on the devices: a replicated array once, a sharded one (FSDP) shard by shard, each process writing the shards
# it holds, so no host ever gathers the whole state. Every process calls save and restore (orbax synchronises
# them); a restore reads each array straight into the sharding the template's array has.

# %%
#| export
import orbax.checkpoint as ocp


def checkpoint_manager(out_dir, keep: int) -> ocp.CheckpointManager:
    "Checkpoints in `out_dir/checkpoints`, the last `keep` kept, written synchronously and atomically."
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(out_dir).absolute() / 'checkpoints', options=opts)


def _leaf(x): return x if isinstance(x, jax.Array) else np.asarray(x)
def _host_int(x) -> int: return int(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x))


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, meta: dict):
    "Save a state and JSON `meta` under the state's step: device arrays as they lie (each process writes its shards), host arrays as given."
    tree = jax.tree.map(_leaf, flax.serialization.to_state_dict(state))
    with quiet_orbax():
        mngr.save(_host_int(tree['step']), args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()


@contextlib.contextmanager
def quiet_orbax():
    "Silence orbax's log while it writes: a failed write (a full disk) is logged with a traceback by each of its threads."
    # the error still reaches the caller, which reports it once, in one line. After a failed write the loggers stay
    # quiet: a write thread that fails after the one that raised logs through absl later, and the abandoned write tasks
    # print their tracebacks through asyncio at exit
    log = logging.getLogger('absl'); level = log.level
    log.setLevel(logging.CRITICAL)
    try: yield
    except BaseException:
        logging.getLogger('asyncio').setLevel(logging.CRITICAL)
        raise
    log.setLevel(level)


def ignore_closed_loops(hook=None):
    "An unraisable-exception hook that drops the 'Event loop is closed' errors orbax's futures raise at exit after a failed write."
    hook = hook or sys.unraisablehook
    if getattr(hook, 'drops_closed_loops', False): return hook      # installed already
    def drop(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == 'Event loop is closed'): hook(u)
    drop.drops_closed_loops = True
    return drop


def restore_checkpoint(mngr: ocp.CheckpointManager, template: TrainState, step: int | None = None) -> tuple[TrainState, dict] | None:
    """The state and meta at `step` (default: the latest), shaped like `template`; None when there is no checkpoint.
    Device-array leaves of `template` come back in their shardings (each process reads only its shards), host ones as numpy."""
    step = mngr.latest_step() if step is None else step
    if step is None: return None
    if step not in mngr.all_steps(): raise ValueError(f"no checkpoint of step {step}; kept: {sorted(mngr.all_steps())}")
    target = jax.tree.map(_leaf, flax.serialization.to_state_dict(template))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return flax.serialization.from_state_dict(template, got['state']), dict(got['meta'])



# %%
with tempfile.TemporaryDirectory() as d:
    mngr = checkpoint_manager(d, keep=1)
    with quiet_orbax(): save_checkpoint(mngr, create_state(mc, tc), {'data': None})
    test_eq(mngr.all_steps(), [0]); assert (Path(d) / 'checkpoints' / '0').is_dir()
    back, meta = restore_checkpoint(mngr, create_state(mc, tc))          # device template: device arrays
    host, _ = restore_checkpoint(mngr, jax.tree.map(np.asarray, create_state(mc, tc))); mngr.close()  # host template: numpy
test_eq((int(back.step), meta), (0, {'data': None}))
assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(back))
assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))


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
state = create_state(mc, tc)
with tempfile.TemporaryDirectory() as d:
    mngr = checkpoint_manager(d, keep=2)
    for i in range(3):
        state = state.replace(params=perturb(state.params, seed=i), step=state.step + 1)
        save_checkpoint(mngr, state, {'data': {'epoch': 0, 'offset': 8}})
    test_eq(mngr.all_steps(), [2, 3])  # keep-last-2
    back, meta = restore_checkpoint(mngr, create_state(mc, tc))
    for a, b_ in zip(jax.tree.leaves(back), jax.tree.leaves(state)): test_eq(np.asarray(a), np.asarray(b_))
    test_eq(meta['data'], {'epoch': 0, 'offset': 8})
    shutil.rmtree(Path(d) / 'checkpoints' / '3' / 'state')                 # the newest checkpoint loses its state
    back, meta, damaged = restore_latest(mngr, create_state(mc, tc))
    test_eq((int(back.step), list(damaged)), (2, [3])); assert 'state' in damaged[3]
    shutil.rmtree(Path(d) / 'checkpoints' / '2' / 'meta')
    try: restore_latest(mngr, create_state(mc, tc)); raise AssertionError('restored')
    except CheckpointError as e: assert 'steps [2, 3] are damaged' in str(e)
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
# ## Configs and the latent scale
#
# `RUN/config.json` holds the model and train configs, the space (`'latent'` or `'pixel'`), the latent scale
# and whatever the trainer adds (the feature store's path, the validation batches). The **latent scale** is the
# VAE's `scaling_factor` as the feature store recorded it (0.18215 for the SD-VAE, 0.13025 for the SDXL VAE, 1 in
# pixel space): the trainer takes it from the store, writes it here, and everything that samples a run reads it
# back from here, so a run trains and samples at the scale of the VAE that made its latents. (The original reads
# the factor from the VAE's config; runs written before the scale was recorded kept it in the train config, and
# are read with that value.) A saved model that differs from the one given is refused.

# %%
#| export
def write_run_config(out_dir, mc: ModelConfig, tc: TrainConfig, space: str, extra: dict | None = None,
                     scaling: LatentScaling | None = None):
    "Write `RUN/config.json` (model, train, space, `extra` such as the store path, the scaling's factor); refuse a model that differs from a saved one."
    p = Path(out_dir) / 'config.json'
    if p.exists():
        old = config_from_dict(ModelConfig, run_json(out_dir)['model'])
        if old != mc:
            diff = {k: (v, getattr(mc, k)) for k, v in config_to_dict(old).items() if v != getattr(mc, k)}
            raise ValueError(f"{out_dir} holds a run of another model (saved, given): {diff}; use a new --out")
    p.parent.mkdir(parents=True, exist_ok=True)
    scale = {} if scaling is None else {'latent_scale': scaling.scale}
    write_atomic(p, json.dumps({'model': config_to_dict(mc), 'train': config_to_dict(tc), 'space': space, **(extra or {}), **scale},
                               indent=1))


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
    train = {k: v for k, v in d['train'].items() if k != 'latent_scale'}   # older runs kept the scale here
    return config_from_dict(ModelConfig, d['model']), config_from_dict(TrainConfig, train)


def run_latent_scale(d: dict) -> float:
    "The latent scale of a run's config.json: as recorded; older runs: 1 in pixel space, else their train config's."
    if 'latent_scale' in d: return float(d['latent_scale'])
    return 1.0 if d.get('space') == 'pixel' else float(d['train'].get('latent_scale', 0.18215))



# %%
with tempfile.TemporaryDirectory() as d:
    write_run_config(d, mc, tc, 'latent', {'latent_scale': 0.13025, 'feats': '/data/feats'})
    test_eq(read_run_config(d), (mc, tc)); test_eq(run_latent_scale(run_json(d)), 0.13025)
    write_run_config(d, mc, tc, 'latent', {'feats': '/data/feats'}, LatentScaling(0.13025))   # as the trainer writes it
    test_eq(read_run_config(d), (mc, tc))
    test_eq({k: v for k, v in run_json(d).items() if k not in ('model', 'train')},
            {'space': 'latent', 'feats': '/data/feats', 'latent_scale': 0.13025})
    test_fail(lambda: write_run_config(d, model_config('mu', depth=3), tc, 'latent'), contains='another model')
    old = run_json(d); old.pop('latent_scale'); old['train']['latent_scale'] = 0.18215     # a run from before
    (Path(d) / 'config.json').write_text(json.dumps(old))
    test_eq(read_run_config(d), (mc, tc)); test_eq(run_latent_scale(run_json(d)), 0.18215)
    (Path(d) / 'config.json').write_text('{"model": ')
    test_fail(lambda: run_json(d), contains='cannot be read')
test_eq(run_latent_scale({'space': 'pixel', 'train': {}}), 1.0)


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


# %% [markdown]
# ## Reading a run folder
#
# What the rest of the package wants to know about a run folder it asks here, so that the folder's layout has
# one owner: the steps of the checkpoints on disk, the logged records, the last logged step, whether a folder is
# a run at all, and, for a checkpoint found damaged, moving it aside to `RUN/checkpoints_damaged/STEP-TIME`
# (kept for a post-mortem, out of the way of the checkpoint manager and of the next resume).

# %%
#| export
def saved_steps(run_dir) -> list[int]:
    "The steps of the checkpoints in `RUN/checkpoints`, ascending ([] when none); orbax's unfinished temporary folders are not counted."
    d = Path(run_dir) / 'checkpoints'
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def run_records(run_dir, warn: Callable[[str], None] | None = None) -> list[dict]:
    "The records of `RUN/metrics.jsonl` in order ([] when there is none); a last line cut off by a crash is dropped."
    p = Path(run_dir) / 'metrics.jsonl'
    return [r for _, r in read_records(p, warn)] if p.exists() else []


def last_logged_step(run_dir) -> int:
    "The step of the last record in `RUN/metrics.jsonl` (0 when none)."
    recs = run_records(run_dir)
    return int(recs[-1]['step']) if recs else 0


def is_run_dir(path) -> bool:
    "Whether `path` is a run directory of `fsdit train`: its `config.json` beside a `checkpoints/` folder."
    p = Path(path)
    return (p / 'config.json').is_file() and (p / 'checkpoints').is_dir()


def quarantine_checkpoint(run_dir, step: int) -> Path:
    "Move the damaged checkpoint `step` to `RUN/checkpoints_damaged/STEP-YYYYmmdd-HHMMSS`; returns where it went."
    dst = Path(run_dir) / 'checkpoints_damaged' / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    dst.parent.mkdir(exist_ok=True)
    shutil.move(Path(run_dir) / 'checkpoints' / str(step), dst)
    return dst


# %%
with tempfile.TemporaryDirectory() as d:
    test_eq((saved_steps(d), run_records(d), last_logged_step(d), is_run_dir(d)), ([], [], 0, False))
    for s_ in ('2', '4', '6.orbax-checkpoint-tmp-1'): (Path(d) / 'checkpoints' / s_).mkdir(parents=True)
    write_run_config(d, mc, tc, 'pixel')
    log = RunLog(d, {}, tc); log.log(2, {'train/loss': 1.0}); log.log(4, {'train/loss': 0.5})
    test_eq((saved_steps(d), last_logged_step(d), is_run_dir(d)), ([2, 4], 4, True))
    test_eq(run_records(d), [{'step': 2, 'train/loss': 1.0}, {'step': 4, 'train/loss': 0.5}])
    dst = quarantine_checkpoint(d, 4)
    test_eq((saved_steps(d), dst.parent.name, dst.name.split('-')[0]), ([2], 'checkpoints_damaged', '4')); assert dst.is_dir()


# %% [markdown]
# What an export (`fsdit.export`) takes from a run folder: the log, copied as it is, and the figures `fsdit eval`
# wrote to `RUN/eval/eval.json` — a file that is there but cannot be read, or holds no records, is refused naming it.

# %%
#| export
def copy_run_log(run_dir, dst) -> bool:
    "Copy `RUN/metrics.jsonl` as it is to the file `dst`; whether the run had one."
    p = Path(run_dir) / 'metrics.jsonl'
    if not p.is_file(): return False
    shutil.copyfile(p, dst)
    return True


def run_eval(run_dir) -> dict | None:
    "The figures of `fsdit eval` in `RUN/eval/eval.json` (None when there are none); `ValueError` naming the file when it cannot be read."
    p = Path(run_dir) / 'eval' / 'eval.json'
    if not p.is_file(): return None
    try: data = json.loads(p.read_text())
    except ValueError as e: raise ValueError(f"{p} cannot be read ({type(e).__name__}: {e})") from None
    if not (isinstance(data, dict) and isinstance(data.get('records'), list)): raise ValueError(f"{p} cannot be read (no figures in it)")
    return data


# %%
with tempfile.TemporaryDirectory() as d:
    test_eq((copy_run_log(d, Path(d) / 'copy.jsonl'), run_eval(d)), (False, None))
    RunLog(d, {}, tc).log(2, {'train/loss': 1.0}); (Path(d) / 'eval').mkdir()
    assert copy_run_log(d, Path(d) / 'copy.jsonl'); test_eq((Path(d) / 'copy.jsonl').read_text(), (Path(d) / 'metrics.jsonl').read_text())
    (Path(d) / 'eval' / 'eval.json').write_text('{"step": 2, "records": []}'); test_eq(run_eval(d), {'step': 2, 'records': []})
    (Path(d) / 'eval' / 'eval.json').write_text('{"step": 2}'); test_fail(lambda: run_eval(d), contains='eval.json cannot be read (no figures')
    (Path(d) / 'eval' / 'eval.json').write_text('{"st'); test_fail(lambda: run_eval(d), contains='cannot be read (JSONDecodeError')


# %% [markdown]
# ## Loading a run
#
# A run directory (written by `fsdit train`) holds `config.json` (model and train configs, the space) and
# orbax checkpoints under `checkpoints/`. Sampling uses the EMA parameters of the latest checkpoint,
# restored through the same `restore_latest` the trainer resumes with, so there is one reader of the format: a damaged newest
# checkpoint gives way to the one before it, with a message, and a run whose checkpoints are all damaged is refused.
#
# `load_run` also reads a run exported by `fsdit export` (`fsdit.export`), from its folder or from its hub id
# (`user/name`): see *Exported runs* below.

# %%
#| export
class RunError(ValueError):
    "A run directory that cannot be sampled from: missing configs or checkpoint."


@dataclass
class Run:
    "A trained run: its configs, the space ('latent' | 'pixel'), EMA parameters and step."
    path: Path
    mc: ModelConfig
    tc: TrainConfig
    space: str
    params: Any
    step: int
    config: dict = field(default_factory=dict)   # config.json as saved (may name the feature store)

    @property
    def latent_scale(self) -> float:
        "Scale between posterior-space latents and the model's space: the store's VAE scaling factor (1 in pixel mode)."
        return run_latent_scale(self.config)

    @property
    def scaling(self) -> LatentScaling:
        "The `LatentScaling` the run trained at: what sampling it applies."
        return LatentScaling(self.latent_scale)

    def space_record(self) -> dict:
        "The run's space and latent scale as its config.json records them, for the files that carry them on (an export)."
        return {'space': self.space, 'latent_scale': self.latent_scale}


# %% [markdown]
# ### Exported runs
#
# `fsdit export RUN OUT` (`fsdit.export`) writes a run as a folder to share: `config.json` — the run's configs,
# marked `"format": "fsdit-export"`, with its step and the codecs it was trained with — and its EMA weights as
# `model.safetensors`, one tensor per parameter named by its path (`block_0/attn/q/kernel`), no pickle.
# `load_run` reads such a folder, or the hub id (`user/name`) of one uploaded to the Hugging Face hub, resolved
# as the encoders are (`fsdit.hub.resolve_checkpoint`: the local cache first with no network, a download when
# the hub can be reached, else a one-line refusal at once). A name is taken for a hub id only when it cannot
# be a path: it does not exist, is not absolute and has exactly one slash. A codec folder the export carries
# (`encoder/`, `vae/`) is named relative to it in `config.json` and comes back as the path of that copy. An
# export holds the EMA weights only, so `ema=False` is refused; weights that do not fit the model its
# `config.json` describes are refused too, rather than sampled from.

# %%
#| export
EXPORT_FORMAT = 'fsdit-export'
EXPORT_PATTERNS = ('config.json', 'model.safetensors', 'encoder/*', 'vae/*', 'metrics.jsonl')   # what load_run reads


def is_export(path) -> bool:
    "Whether `path` is a folder written by `fsdit export` (its config.json says so)."
    try: return json.loads((Path(path) / 'config.json').read_text()).get('format') == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError): return False


def looks_like_hub_id(name) -> bool:
    "Whether `name` can only be a hub id `owner/name`: no such path, not absolute, not ./ or ~/, exactly one slash."
    s, p = str(name), Path(name)
    return not p.exists() and not p.is_absolute() and not s.startswith(('.', '~')) and s.count('/') == 1 and all(s.split('/'))


def run_folder(run) -> Path:
    "The local folder of `run`: itself, or for a hub id the snapshot (cached, else downloaded) of the exported run."
    if not looks_like_hub_id(run): return Path(run).expanduser()
    from fsdit.hub import resolve_checkpoint
    return resolve_checkpoint(str(run), EXPORT_PATTERNS, 'an exported fsdit run', 'load_run')


def load_export(d, ema: bool = True) -> Run:
    "The run exported to the folder `d`: its configs, its codecs (folders it carries as their paths) and its EMA weights."
    from safetensors.numpy import load_file
    d = Path(d); f = d / 'model.safetensors'
    if not ema: raise RunError(f"{d} is an exported run: it holds the EMA weights only (drop --raw)")
    mc, tc = read_run_config(d); cfg = run_json(d)
    if not f.is_file(): raise RunError(f"{d} is an exported run without its weights (no model.safetensors): export the run again")
    try: flat = load_file(str(f))
    except Exception as e: raise RunError(f"{f} cannot be read ({error_line(e)}): export the run again") from None
    want = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in flat_params(jax.eval_shape(lambda: create_state(mc, tc).ema_params)).items()}
    bad = sorted(set(want) ^ set(flat)) or [k for k in want if (flat[k].shape, flat[k].dtype) != want[k]]
    if bad: raise RunError(f"{f} does not fit the model of {d / 'config.json'} ({len(bad)} tensors differ, e.g. {bad[0]}): export the run again")
    codecs = dict(cfg.get('codecs') or {})
    for k in ('encoder', 'vae'):
        name = codecs.get(k)
        if isinstance(name, str) and not Path(name).is_absolute() and (d / name / 'config.json').is_file(): codecs[k] = str(d / name)
    return Run(d, mc, tc, cfg.get('space', 'latent'), unflat_params(flat), int(cfg.get('step', 0)), {**cfg, 'codecs': codecs})


# %%
#| export
def load_run(run_dir, ema: bool = True, warn: Callable[[str], None] | None = None) -> Run:
    """Configs and (EMA) parameters of a run: a run directory (its newest readable checkpoint; damaged newer ones are
    `warn`ed), a folder of `fsdit export`, or the hub id (`user/name`) of one."""
    d = run_folder(run_dir)
    if is_export(d): return load_export(d, ema)
    if d != Path(run_dir).expanduser():
        raise RunError(f"the hub repo {str(run_dir)!r} holds no exported fsdit run (its config.json was not written by `fsdit export`)")
    if not (d / 'config.json').exists():
        raise RunError(f"{d} is not a run directory (no config.json): pass the --out folder of `fsdit train` "
                       "or a folder of `fsdit export`")
    mc, tc = read_run_config(d)
    cfg = run_json(d)
    if not (d / 'checkpoints').is_dir() or not any((d / 'checkpoints').iterdir()):
        raise RunError(f"{d} has no checkpoint yet (no {d / 'checkpoints'}): train it for at least `save_every` steps")
    # the template only gives shapes: zeros of the state's abstract shapes, no initialisation is run
    template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(lambda: create_state(mc, tc)))
    mngr = checkpoint_manager(d, keep=max(tc.keep, 1))
    try:
        got = restore_latest(mngr, template)
    finally:
        mngr.close()
    if got is None: raise RunError(f"{d / 'checkpoints'} holds no complete checkpoint: train the run for at least `save_every` steps")
    state, _, damaged = got
    for step, why in sorted(damaged.items(), reverse=True):
        if warn: warn(f"checkpoint {step} of {d} is damaged ({why}); using step {int(state.step)}")
    params = state.ema_params if ema else state.params
    return Run(d, mc, tc, cfg.get('space', 'latent'), params, int(state.step), cfg)


# %% [markdown]
# A run saved the way the trainer saves it — here a freshly initialised pixel-space `mu` model on 8x8
# images with the stand-in encoder's shape — loads back with its EMA parameters; directories that are not
# runs, or have no checkpoint yet, are refused with the reason.

# %%

def save_fresh_run(d, mc, tc, space='pixel'):
    "A run directory holding a freshly initialised model, written as `fsdit train` writes one."
    write_run_config(d, mc, tc, space)
    mngr = checkpoint_manager(d, keep=1); save_checkpoint(mngr, create_state(mc, tc), {}); mngr.close()
    return Path(d)

tmp = Path(tempfile.mkdtemp())
mc = model_config('mu', input_size=8, in_channels=3, support_dim=16, patch=4)
tc = train_config('test', shots=3)
run_dir = save_fresh_run(tmp / 'run', mc, tc)
run = load_run(run_dir)
test_eq((run.mc, run.tc, run.space, run.latent_scale, run.scaling), (mc, tc, 'pixel', 1.0, LatentScaling(1.0)))
test_eq(run.space_record(), {'space': 'pixel', 'latent_scale': 1.0})
test_eq(jax.tree.structure(run.params), jax.tree.structure(create_state(mc, tc).ema_params))
test_fail(lambda: load_run(tmp / 'nothing'), contains='not a run directory')
write_run_config(tmp / 'empty', mc, tc, 'pixel')
test_fail(lambda: load_run(tmp / 'empty'), contains='no checkpoint')

# %% [markdown]
# ### Exported runs, by example
#
# A folder laid out by hand as `fsdit export` lays one out (the writer, with the model card, is `fsdit.export`)
# loads back with the run's weights, to the bit; a codec folder it carries comes back as its path; a damaged
# or mismatched weights file, and `ema=False`, are refused:

# %%
from safetensors.numpy import save_file
test_eq(unflat_params(flat_params(run.params)).keys(), run.params.keys())
assert 'block_0/attn/q/kernel' in flat_params(run.params)
ex = tmp / 'export'; (ex / 'encoder').mkdir(parents=True); (ex / 'encoder' / 'config.json').write_text('{}')
(ex / 'config.json').write_text(json.dumps({**run_json(run_dir), 'format': EXPORT_FORMAT, 'step': 7,
                                            'codecs': {'encoder': 'encoder', 'vae': 'pixel-8x3'}}))
save_file({k: np.asarray(v) for k, v in flat_params(run.params).items()}, str(ex / 'model.safetensors'))
assert is_export(ex) and not is_export(run_dir)
back = load_run(ex)
test_eq((back.mc, back.tc, back.space, back.step, back.latent_scale), (mc, tc, 'pixel', 7, 1.0))
for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(run.params)): test_eq(a, b)
test_eq(jax.tree.structure(back.params), jax.tree.structure(run.params))
test_eq(back.config['codecs'], {'encoder': str(ex / 'encoder'), 'vae': 'pixel-8x3'})
test_fail(lambda: load_run(ex, ema=False), contains='EMA weights only')
_bad = tmp / 'bad'; shutil.copytree(ex, _bad)
(_bad / 'model.safetensors').write_bytes((ex / 'model.safetensors').read_bytes()[:100])
test_fail(lambda: load_run(_bad), contains='cannot be read')
save_file({'x': np.zeros(3, np.float32)}, str(_bad / 'model.safetensors'))
test_fail(lambda: load_run(_bad), contains='does not fit the model')

# %% [markdown]
# What is a hub id: a name that can only be one. A path is never sent to the hub; an id that is neither
# cached nor reachable is refused at once, saying how to get the folder:

# %%
assert looks_like_hub_id('user/name') and not looks_like_hub_id(ex) and not looks_like_hub_id('runs/a/b')
assert not looks_like_hub_id('./user/name') and not looks_like_hub_id('/user/name') and not looks_like_hub_id('user/')
test_eq(run_folder(ex), ex); test_eq(run_folder(tmp / 'nothing'), tmp / 'nothing')
from huggingface_hub import constants as _hc
from fsdit.hub import HubUnavailableError
_saved = _hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE
_hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE = True, str(tmp / 'hub')
try: test_fail(lambda: load_run('someone/some-run'), contains="cannot get an exported fsdit run 'someone/some-run'")
finally: _hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE = _saved
