"""Faults and bad input, end to end through the `fsdit` entry point: every command either succeeds or stops with
one line on stderr naming what was wrong, and leaves nothing a corrected rerun would trip over; a killed or
damaged run resumes exactly.

One small data set serves every test: the tiny glyph set under a folder whose name holds a space, its class
folders renamed into non-Latin scripts (with spaces) before `fsdit prepare`, its store, and one uninterrupted
4-step run. Refusals run
in-process through `fsdit.cli.main` (the console script's function); kills and a second concurrent trainer
run in subprocesses."""
import json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ['--model', 'mu', '--model.patch', '4', '--preset', 'test', '--batch-size', '8', '--max-steps', '4',
         '--log-every', '2', '--eval-every', '4', '--sample-every', '4', '--save-every', '2', '--keep', '2',
         '--sample-steps', '2', '--val-batches', '1']
TIMING = ('train/step_time', 'train/samples_per_s', 'train/tflops_per_device', 'train/mfu', 'samples/grid')
SCRIPTS = ['ёж', 'κλάση', '猫', 'قط']   # every class folder is renamed '<word> <glyph name>'


def _env(cache: Path | None = None):
    "Subprocess environment; `cache`: a persistent compilation cache, so later trainers skip the first one's compiling."
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'WANDB_MODE': 'disabled'}
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    return env


def fsdit(capsys, *args) -> tuple[int, str, str]:
    "Run `fsdit ARGS` as the console script does (in this process): exit status, stdout, stderr."
    from fsdit.cli import main
    capsys.readouterr()
    try: rc = main([str(a) for a in args])
    except SystemExit as e: rc = e.code
    o = capsys.readouterr()
    return rc, o.out, o.err


def refused(result, cmd: str, *needles: str) -> str:
    "Assert a refusal: exit status != 0, one line `fsdit CMD: ...` on stderr holding every needle, no traceback."
    rc, _, err = result
    lines = [l for l in err.splitlines() if l.startswith('fsdit ')]
    assert rc not in (0, None) and 'Traceback' not in err and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f'fsdit {cmd}: '), err
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


def records(run: Path) -> dict:
    "metrics.jsonl as {step: record without timings}, parsed strictly."
    recs = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: {k: v for k, v in r.items() if k not in TIMING} for r in recs}


def final_state(run: Path):
    from fsdit.run import read_run_config, checkpoint_manager, restore_checkpoint
    from fsdit.state import create_state
    mc, tc = read_run_config(run)
    m = checkpoint_manager(run, tc.keep)
    try: return restore_checkpoint(m, create_state(mc, tc))
    finally: m.close()


def assert_same_run(a: Path, b: Path):
    "Same parameters, EMA, optimizer state, step, key, data position and records (timings aside)."
    import jax
    (sa, ma), (sb, mb) = final_state(a), final_state(b)
    assert int(sb.step) == 4 and ma == mb
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)): np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert records(a) == records(b)


# The trainer of the concurrent run: it stops at the start of step 4's record -- after the old trainer had already
# saved step 4's checkpoint, before the new one saves it -- and waits there to be killed.
_WAIT_AT_RECORD = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import fsdit.train as T
    marker, argv = Path(sys.argv[1]), sys.argv[2:]
    log = T.RunLog.log
    def wait_at_record(self, step, metrics, images=None):
        if step == 4: marker.write_text('waiting'); time.sleep(600)
        return log(self, step, metrics, images)
    T.RunLog.log = wait_at_record
    from fsdit.cli import main
    sys.exit(main(argv))
''')


@pytest.fixture(scope='module')
def faults(tmp_path_factory):
    """DIR/'with space': split (class folders in other scripts), feats, run (4 steps, uninterrupted), and a second
    trainer into run_killed, still running and waiting at step 4's record."""
    from fsdit.cli import main
    from fsdit.glyph.data import make_offline_dataset
    root = tmp_path_factory.mktemp('faults') / 'with space'
    make_offline_dataset(root / 'glyphs', per_class=6, size=16, chars='0123456789ABCDEFGHIJKLMN')
    for i, c in enumerate(sorted(p for p in (root / 'glyphs').iterdir() if p.is_dir())):
        c.rename(c.with_name(f"{SCRIPTS[i % len(SCRIPTS)]} {c.name}"))
    assert main(['prepare', '--src', str(root / 'glyphs'), '--dst', str(root / 'split'), '--train', '18', '--val', '2',
                 '--test', '4']) == 0
    assert main(['precompute', '--data', str(root / 'split'), '--out', str(root / 'feats'), '--stand-in', '--image-size', '16',
                 '--embed-dim', '16']) == 0
    marker = root / 'waiting'
    proc = subprocess.Popen([sys.executable, '-c', _WAIT_AT_RECORD, str(marker), 'train', '--feats', str(root / 'feats'),
                             '--out', str(root / 'run_killed'), *FLAGS], env=_env(root.parent / 'jax cache'), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert main(['train', '--feats', str(root / 'feats'), '--out', str(root / 'run'), *FLAGS]) == 0
    yield root, proc, marker
    if proc.poll() is None: proc.kill(); proc.wait()


@pytest.fixture
def root(faults): return faults[0]


def held_out_class(root: Path, i: int = 0) -> Path:
    "The i-th class folder of the test split (held out from training)."
    return sorted((root / 'split' / 'test').iterdir())[i]


# ---------------------------------------------------------------- train: a second trainer, SIGKILL, resume

def test_second_trainer_refused_then_sigkill_resumes_exactly(faults, capsys):
    """A second `fsdit train` into a run in use is refused (and changes nothing); the first is then killed with
    SIGKILL after step 4's checkpoint would have been saved by a trainer that saves before logging; the same
    command again is not blocked by the dead run's lock and ends equal to the uninterrupted run."""
    root, proc, marker = faults
    run, cmd = root / 'run_killed', ['train', '--feats', root / 'feats', '--out', root / 'run_killed', *FLAGS]
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 500; time.sleep(0.2)
    before = (run / 'metrics.jsonl').read_text()
    refused(fsdit(capsys, *cmd), 'train', 'in use by another `fsdit train`', f'process {proc.pid}', str(run))
    assert (run / 'metrics.jsonl').read_text() == before
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert fsdit(capsys, *cmd)[0] == 0
    assert_same_run(root / 'run', run)


_KILL_WHILE_SAVING = textwrap.dedent('''
    import os, signal, sys
    try: from orbax.checkpoint._src.path import atomicity
    except ImportError: sys.exit(3)
    finalize = getattr(atomicity.AtomicRenameTemporaryPath, 'finalize', None)
    if finalize is None: sys.exit(3)
    async def kill_at_4(self, *a, **kw):   # step 4 written in full, not yet renamed into place
        if self._final_path.name == '4': os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *a, **kw)
    atomicity.AtomicRenameTemporaryPath.finalize = kill_at_4
    from fsdit.cli import main
    sys.exit(main(sys.argv[1:]))
''')

_DISK_FULL = textwrap.dedent('''
    import resource, signal, sys
    import fsdit.train as T
    save = T.save_checkpoint
    def full_at_4(mngr, state, meta):   # no room left for step 4 (a file-size limit: the write fails as on a full disk)
        if int(state.step) == 4:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
        return save(mngr, state, meta)
    T.save_checkpoint = full_at_4
    from fsdit.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_sigkill_while_checkpoint_is_written_resumes_exactly(faults, tmp_path, capsys):
    root, run = faults[0], tmp_path / 'run'
    cmd = ['train', '--feats', str(root / 'feats'), '--out', str(run), *FLAGS]
    r = subprocess.run([sys.executable, '-c', _KILL_WHILE_SAVING, *cmd], env=_env(root.parent / 'jax cache'),
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3: pytest.skip('this orbax has no AtomicRenameTemporaryPath.finalize to stop at')
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(p.name for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == ['2']
    assert fsdit(capsys, *cmd)[0] == 0
    assert_same_run(root / 'run', run)


def test_disk_full_while_checkpoint_is_written(faults, tmp_path, capsys):
    "One line naming the reason, the earlier checkpoint intact, and the same command finishes once there is room."
    root, run = faults[0], tmp_path / 'run'
    cmd = ['train', '--feats', str(root / 'feats'), '--out', str(run), *FLAGS]
    r = subprocess.run([sys.executable, '-c', _DISK_FULL, *cmd], env=_env(root.parent / 'jax cache'),
                       capture_output=True, text=True, timeout=600)
    refused((r.returncode, r.stdout, r.stderr), 'train', 'checkpoint 4 could not be written (File too large)',
            'resumes from step 2')
    assert 'Traceback' not in r.stderr
    assert final_state(run)[0].step == 2
    assert fsdit(capsys, *cmd)[0] == 0
    assert_same_run(root / 'run', run)


# ---------------------------------------------------------------- train: impossible settings write nothing

@pytest.mark.parametrize('flags, cmd_needles', [
    (['--shots', '10'], ['shots 10 needs 11 images per class', '--shots 5']),
    (['--model.widht', '3'], ["unknown model field(s) ['--model.widht']", "'hidden'"]),
    (['--lr', '-0.1'], ['lr must be positive']),
    (['--model.patch', '3'], ['patch 3 does not divide the input size 16']),
    (['--model', 'C/2'], ["unknown model preset 'C/2'", 'S/2']),
    (['--preset', 'fast'], ["unknown train preset 'fast'", 'short']),
    (['--val-batches', '0'], ['--val-batches', 'must be 1 or more']),
])
def test_train_impossible_settings_write_nothing(root, tmp_path, capsys, flags, cmd_needles):
    out = tmp_path / 'new run'
    refused(fsdit(capsys, 'train', '--feats', root / 'feats', '--out', out, *FLAGS, *flags), 'train', *cmd_needles)
    assert not out.exists()


def test_train_batch_not_divisible_by_devices(root, tmp_path, capsys, monkeypatch):
    "8 devices (the count simulated: this process has one) and a batch of 12: refused, nothing written."
    import jax
    monkeypatch.setattr(jax, 'device_count', lambda *a: 8)
    out = tmp_path / 'run'
    refused(fsdit(capsys, 'train', '--feats', root / 'feats', '--out', out, *FLAGS, '--batch-size', '12'),
            'train', 'batch size 12 is not divisible by the 8 devices')
    assert not out.exists()


def test_train_refused_setting_leaves_no_config_in_existing_folder(root, tmp_path, capsys):
    "The reported case: `--shots 10` on classes of 6 wrote RUN/config.json, which the corrected command then read."
    out = tmp_path / 'run'; out.mkdir()
    refused(fsdit(capsys, 'train', '--feats', root / 'feats', '--out', out, *FLAGS, '--shots', '10'), 'train', '--shots')
    assert list(out.iterdir()) == []


def _read_only_folder(tmp_path: Path) -> Path:
    "A folder this process cannot write in: chmod 0555, or where that does not bind (root), a folder of /sys."
    d = tmp_path / 'ro'; d.mkdir(); d.chmod(0o555)
    try: (d / 'probe').touch()
    except OSError: return d
    (d / 'probe').unlink()
    if Path('/sys/kernel').is_dir(): return Path('/sys/kernel')
    pytest.skip('no read-only folder available here')


def test_out_paths_refused_naming_them(root, tmp_path, capsys):
    "An output that is a file, lies under a file, or is in a read-only folder: every command refuses, naming it."
    f = tmp_path / 'a file'; f.write_text('x')
    ro = _read_only_folder(tmp_path)
    run = root / 'run'
    refused(fsdit(capsys, 'train', '--feats', root / 'feats', '--out', f, *FLAGS), 'train', str(f), 'is a file')
    refused(fsdit(capsys, 'train', '--feats', root / 'feats', '--out', ro / 'run', *FLAGS), 'train', str(ro), 'cannot write')
    refused(fsdit(capsys, 'precompute', '--data', root / 'split', '--out', f / 'feats', '--stand-in'), 'precompute', str(f))
    refused(fsdit(capsys, 'precompute', '--data', root / 'split', '--out', ro / 'feats', '--stand-in'), 'precompute', str(ro))
    refused(fsdit(capsys, 'eval', '--run', run, '--out', f / 'eval'), 'eval', str(f), 'lies under the file')
    refused(fsdit(capsys, 'eval', '--run', run, '--out', ro / 'eval'), 'eval', str(ro), 'cannot write')
    sup = sorted(held_out_class(root).iterdir())[:2]
    refused(fsdit(capsys, 'sample', '--run', run, '--support', *sup, '--out', f / 'grid.png'), 'sample', str(f))
    refused(fsdit(capsys, 'sample', '--run', run, '--support', *sup, '--out', ro / 'grid.png'), 'sample', str(ro))
    refused(fsdit(capsys, 'sample', '--run', run, '--support', *sup, '--out', tmp_path), 'sample', 'is a folder')
    assert f.read_text() == 'x' and not list(tmp_path.glob('*.png'))


# ---------------------------------------------------------------- train: a damaged run directory

def _copy_run(root: Path, tmp_path: Path) -> Path:
    d = tmp_path / 'run'; shutil.copytree(root / 'run', d); return d


def _damage(step_dir: Path, how: str):
    if how == 'truncated':   # the largest data file cut in half
        f = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
        os.truncate(f, f.stat().st_size // 2)
    elif how == 'manifest': (step_dir / 'state' / 'manifest.ocdbt').unlink()
    elif how == 'state': shutil.rmtree(step_dir / 'state')
    elif how == 'emptied':
        for p in step_dir.iterdir(): shutil.rmtree(p) if p.is_dir() else p.unlink()


# A truncated shard fails inside orbax's read, which abandons its other reads' coroutines; their garbage collection
# is reported as an unraisable exception. The test asserts on the fallback itself.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['truncated', 'manifest', 'state', 'emptied'])
def test_damaged_newest_checkpoint_falls_back(root, tmp_path, capsys, how):
    """The newest checkpoint damaged: `fsdit train` says so in one line, sets it aside, resumes from the one
    before and ends equal to the uninterrupted run; `fsdit sample` uses the one before, saying so."""
    run = _copy_run(root, tmp_path)
    _damage(run / 'checkpoints' / '4', how)
    if how == 'state':
        sup = sorted(held_out_class(root).iterdir())[:3]
        rc, out, err = fsdit(capsys, 'sample', '--run', run, '--support', *sup, '--n', '2', '--steps', '2', '--out', tmp_path / 'g.png')
        assert rc == 0 and 'step 2' in out and 'checkpoint 4' in err and 'damaged' in err, err
    rc, _, err = fsdit(capsys, 'train', '--out', run)
    assert rc == 0, err
    said = [l for l in err.splitlines() if 'damaged' in l]
    assert len(said) == 1 and said[0].startswith('fsdit train: checkpoint 4 is damaged') and 'resuming from step 2' in said[0]
    assert len(said[0]) < 600 and 'tensorstore_spec' not in said[0]
    assert [p.name.split('-')[0] for p in (run / 'checkpoints_damaged').iterdir()] == ['4']
    assert_same_run(root / 'run', run)


def test_every_checkpoint_damaged_is_refused_not_restarted(root, tmp_path, capsys):
    run = _copy_run(root, tmp_path)
    for s in ('2', '4'): _damage(run / 'checkpoints' / s, 'state')
    log = (run / 'metrics.jsonl').read_text()
    refused(fsdit(capsys, 'train', '--out', run), 'train', 'no checkpoint in', 'steps [2, 4] are damaged')
    assert (run / 'metrics.jsonl').read_text() == log and sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['2', '4']
    refused(fsdit(capsys, 'sample', '--run', run, '--class-dir', held_out_class(root), '--out', tmp_path / 'g.png'),
            'sample', 'steps [2, 4] are damaged')
    assert not (tmp_path / 'g.png').exists()


def test_metrics_last_line_cut_resumes(root, tmp_path, capsys):
    """A crash while step 4's record was written (so before its checkpoint): the line is cut. The rerun drops it,
    says so, resumes from step 2 and writes the record again."""
    run = _copy_run(root, tmp_path)
    shutil.rmtree(run / 'checkpoints' / '4')
    text = (run / 'metrics.jsonl').read_text()
    (run / 'metrics.jsonl').write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])
    rc, _, err = fsdit(capsys, 'train', '--out', run)
    assert rc == 0, err
    assert 'metrics.jsonl: its last line was cut off' in err
    assert_same_run(root / 'run', run)


def test_metrics_bad_middle_line_refused(root, tmp_path, capsys):
    run = _copy_run(root, tmp_path)
    lines = (run / 'metrics.jsonl').read_text().splitlines()
    (run / 'metrics.jsonl').write_text('\n'.join([lines[0][:20]] + lines[1:]) + '\n')
    refused(fsdit(capsys, 'train', '--out', run), 'train', str(run / 'metrics.jsonl'), 'line 1')


def test_run_config_damaged_refused(root, tmp_path, capsys):
    run = _copy_run(root, tmp_path)
    (run / 'config.json').write_text('{"model": {"hid')
    refused(fsdit(capsys, 'train', '--out', run), 'train', str(run / 'config.json'), 'cannot be read')


# ---------------------------------------------------------------- sample

def test_sample_any_number_of_supports(root, tmp_path, capsys):
    "1, 3, 4 and 6 supports, and --class-dir; outputs in folders that do not exist yet; a negative --cfg."
    files = sorted(held_out_class(root, 1).iterdir())
    assert len(files) == 6
    for k in (1, 3, 4, 6):
        out, npz = tmp_path / f'new {k}' / 'grid.png', tmp_path / f'npz {k}' / 's.npz'
        rc, o, err = fsdit(capsys, 'sample', '--run', root / 'run', '--support', *files[:k], '--n', '2', '--steps', '2',
                           '--out', out, '--npz', npz)
        assert rc == 0, err
        assert f'from {k} supports' in o and out.exists() and np.load(npz)['supports'].shape[0] == k
    rc, o, err = fsdit(capsys, 'sample', '--run', root / 'run', '--class-dir', held_out_class(root, 1),
                       '--shots', '4', '--n', '2', '--steps', '2', '--cfg', '-1.5', '--out', tmp_path / 'cd' / 'g.png')
    assert rc == 0 and 'from 4 supports' in o and 'cfg -1.5' in o, err


def test_sample_bad_input_refused_and_nothing_written(root, tmp_path, capsys):
    cls = held_out_class(root)
    good = sorted(cls.iterdir())[:2]
    trunc = tmp_path / 'cut.png'; data = good[0].read_bytes(); trunc.write_bytes(data[:len(data) // 2])
    text = tmp_path / 'notes.png'; text.write_text('not an image')
    few = tmp_path / 'few'; few.mkdir(); shutil.copy(good[0], few / 'a.png'); shutil.copy(good[1], few / 'b.png')
    bare = tmp_path / 'bare run'; bare.mkdir(); shutil.copy(root / 'run' / 'config.json', bare / 'config.json')
    out, npz = tmp_path / 'o' / 'grid.png', tmp_path / 'o' / 's.npz'
    base = lambda run=root / 'run': ['sample', '--run', run, '--out', out, '--npz', npz, '--n', '2', '--steps', '2']
    cases = [
        (base(bare) + ['--support', *good], ['no checkpoint yet']),
        (base() + ['--support', good[0], tmp_path / 'missing.png'], ['missing.png (no such file)']),
        (base() + ['--support', good[0], trunc], ['cut.png']),
        (base() + ['--support', text, good[0]], ['notes.png']),
        (base() + ['--class-dir', tmp_path / 'nowhere'], ['nowhere is not a folder']),
        (base() + ['--class-dir', few, '--shots', '3'], ['holds 2 images', '--shots 2']),
        (base() + ['--class-dir', few], ['holds 2 images; 5 supports']),
        (base() + ['--support', *good, '--steps', '0'], ['--steps', 'must be 1 or more']),
        (base() + ['--support', *good, '--steps', '-3'], ['--steps', 'must be 1 or more']),
        (base() + ['--support', *good, '--n', '0'], ['--n', 'must be 1 or more']),
        (base() + ['--class-dir', cls, '--shots', '0'], ['--shots', 'must be 1 or more']),
        (base() + ['--support', *good, '--npz', tmp_path / 'notes.png' / 's.npz'], ['--npz', 'lies under the file']),
    ]
    for argv, needles in cases:
        refused(fsdit(capsys, *argv), 'sample', *needles)
        assert not (tmp_path / 'o').exists(), argv


# ---------------------------------------------------------------- the store

def test_damaged_store_refused_by_train_eval_sample(root, tmp_path, capsys):
    for name, cut in (('embeds.npy', lambda f: os.truncate(f, f.stat().st_size // 2)),
                      ('moments.npy', lambda f: f.write_bytes(b'')),
                      ('index.json', lambda f: f.write_text('')),
                      ('metadata.json', lambda f: f.write_text(f.read_text()[:40]))):
        store = tmp_path / name / 'feats'; shutil.copytree(root / 'feats', store)
        cut(store / name)
        need = [f'feature store {store} is damaged: {name}'] if name != 'metadata.json' else [str(store), name]
        out = tmp_path / name / 'run'
        refused(fsdit(capsys, 'train', '--feats', store, '--out', out, *FLAGS), 'train', *need)
        assert not out.exists()
        refused(fsdit(capsys, 'eval', '--run', root / 'run', '--feats', store, '--out', tmp_path / name / 'eval'), 'eval', *need)
        if name == 'metadata.json':   # sampling reads only the store's metadata
            refused(fsdit(capsys, 'sample', '--run', root / 'run', '--feats', store, '--class-dir',
                          held_out_class(root), '--out', tmp_path / 'g.png'), 'sample', *need)


_KILL_WHILE_ASSEMBLING = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    made = []
    open_memmap = np.lib.format.open_memmap
    def killing(*a, **kw):   # the store's second array: the first is written, the store is half assembled
        made.append(a)
        if len(made) == 2: os.kill(os.getpid(), signal.SIGKILL)
        return open_memmap(*a, **kw)
    np.lib.format.open_memmap = killing
    from fsdit.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_precompute_killed_while_assembling(root, tmp_path, capsys):
    """SIGKILL while the store is assembled, then the same command: the store equals the uninterrupted one byte
    for byte, and no hidden partial copy is left; folders have the usual permissions, not mkdtemp's 0700."""
    out = tmp_path / 'feats'
    cmd = ['precompute', '--data', root / 'split', '--out', out, '--stand-in', '--image-size', '16', '--embed-dim', '16']
    r = subprocess.run([sys.executable, '-c', _KILL_WHILE_ASSEMBLING, *map(str, cmd)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith('.')]   # left half-assembled
    assert fsdit(capsys, *cmd)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['feats']
    for f in ('embeds.npy', 'moments.npy', 'index.json', 'metadata.json'):
        assert (out / f).read_bytes() == (root / 'feats' / f).read_bytes(), f
    umask = os.umask(0); os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask) == ((root / 'feats').stat().st_mode & 0o777)


_KILL_AFTER_CHUNKS = textwrap.dedent('''
    import os, signal, sys
    import fsdit.features as F
    save, saved = F._save_chunk, []
    def save_then_kill(d, i, arrays):   # SIGKILL once two chunks are on disk
        save(d, i, arrays); saved.append(i)
        if len(saved) == 2: os.kill(os.getpid(), signal.SIGKILL)
    F._save_chunk = save_then_kill
    from fsdit.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_precompute_sigkill_after_chunks(root, tmp_path, capsys):
    "SIGKILL after 2 of 3 chunks, then the same command: the chunks on disk are kept and the store is the same."
    out = tmp_path / 'feats'
    cmd = ['precompute', '--data', root / 'split', '--out', out, '--stand-in', '--image-size', '16', '--embed-dim', '16',
           '--chunk-size', '50']
    r = subprocess.run([sys.executable, '-c', _KILL_AFTER_CHUNKS, *map(str, cmd)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / 'feats.partial').glob('chunk_*')) == ['chunk_000000.npz', 'chunk_000001.npz']
    assert fsdit(capsys, *cmd)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['feats']
    for f in ('embeds.npy', 'moments.npy', 'index.json'):
        assert (out / f).read_bytes() == (root / 'feats' / f).read_bytes(), f
    meta, whole = (json.loads((d / 'metadata.json').read_text()) for d in (out, root / 'feats'))
    assert meta == {**whole, 'chunk_size': 50}


def test_precompute_bad_numbers_refused(root, tmp_path, capsys):
    for flag in ('--chunk-size', '--batch-size', '--image-size'):
        refused(fsdit(capsys, 'precompute', '--data', root / 'split', '--out', tmp_path / 'f', '--stand-in', flag, '0'),
                'precompute', flag, 'must be 1 or more')
    refused(fsdit(capsys, 'precompute', '--data', tmp_path / 'nowhere', '--out', tmp_path / 'f', '--stand-in'),
            'precompute', 'no images under')
    assert not (tmp_path / 'f').exists()


# ---------------------------------------------------------------- eval

def test_eval_bad_numbers_refused(root, tmp_path, capsys):
    for flags, needle in ((['--shots', '0'], '--shots'), (['--shots', '5', '0'], '--shots'), (['--steps', '0'], '--steps'),
                          (['--n', '0'], '--n'), (['--max-real', '-1'], '--max-real')):
        refused(fsdit(capsys, 'eval', '--run', root / 'run', '--out', tmp_path / 'e', *flags), 'eval', needle)
    assert not (tmp_path / 'e').exists()


def test_eval_names_classes_as_their_folders(root, tmp_path, capsys):
    "Spaces in every path and class folders in other scripts, end to end: the eval's JSON names them as the folders do."
    out = tmp_path / 'eval out'
    rc, _, err = fsdit(capsys, 'eval', '--run', root / 'run', '--shots', '3', '--cfg', '3', '--n', '2', '--steps', '2',
                       '--max-real', '6', '--no-seen', '--out', out)
    assert rc == 0, err
    classes = json.loads((out / 'eval.json').read_text())['classes']['test']
    assert sorted(classes) == sorted(p.name for p in (root / 'split' / 'test').iterdir())
    assert all(' ' in c and not c.isascii() for c in classes)
