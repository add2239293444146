"""The trainer: 1 vs 8 simulated devices, 2 processes vs 1, exact resume through the CLI after SIGTERM,
NaN stop with the last good checkpoint intact, keep-last-K, weight-decay mask, LR schedule, metrics.jsonl."""
import json, math, os, signal, socket, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ['--model', 'mu', '--preset', 'test', '--batch-size', '8', '--max-steps', '8', '--log-every', '2',
         '--eval-every', '4', '--sample-every', '8', '--save-every', '2', '--keep', '2', '--sample-steps', '2',
         '--val-batches', '1']


def _env(**kw):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **kw}
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    return env


def _write_store(d: Path, n_classes=6, per_class=12, side=16, ch=4, dim=32, seed=0):
    "A complete feature store on disk (pixel space, random arrays) in the layout `fsdit.features` writes."
    from fsdit.features import FORMAT_VERSION
    from fsdit.config import model_config
    from fsdit.testing import synthetic_store
    embeds, moments, rows = synthetic_store(model_config('mu', input_size=side, in_channels=ch, support_dim=dim),
                                            n_classes, per_class, seed, space='pixel')
    split = ['train'] * (4 * per_class) + ['val'] * ((n_classes - 4) * per_class)
    label = [i // per_class if i < 4 * per_class else (i - 4 * per_class) // per_class for i in range(len(split))]
    index = {'split': split, 'class': [f"c{i // per_class}" for i in range(len(split))], 'label': label,
             'path': [f"{s}/c{i // per_class}/{i}.png" for i, s in enumerate(split)]}
    d.mkdir(parents=True)
    np.save(d / 'embeds.npy', embeds); np.save(d / 'moments.npy', moments)
    (d / 'index.json').write_text(json.dumps(index))
    meta = dict(format_version=FORMAT_VERSION, encoder='test', vae='test', image_size=side, space='pixel',
                latent_shape=[side, side, ch], embed_dim=dim, complete=True)
    (d / 'metadata.json').write_text(json.dumps(meta))
    return d


def _records(run: Path) -> dict:
    "metrics.jsonl as {step: record}, parsed strictly (NaN or Infinity in the file fails)."
    def bad(c): raise ValueError(f"non-JSON constant {c}")
    return {r['step']: r for r in (json.loads(l, parse_constant=bad) for l in (run / 'metrics.jsonl').read_text().splitlines())}


def _final_params(run: Path, step: int | None = None):
    "The run's state and meta at `step` (default: its latest checkpoint)."
    from fsdit.run import read_run_config, checkpoint_manager, restore_checkpoint
    from fsdit.state import create_state
    mc, tc = read_run_config(run)
    m = checkpoint_manager(run, tc.keep)
    state, meta = restore_checkpoint(m, create_state(mc, tc), step); m.close()
    return state, meta


@pytest.fixture(scope='module')
def train_store(tmp_path_factory):
    return _write_store(tmp_path_factory.mktemp('train') / 'feats')


@pytest.fixture(scope='module')
def train_run(train_store):
    "An uninterrupted 8-step CLI run (1 process, 1 device)."
    from fsdit.commands.train import train_cli
    run = train_store.parent / 'run_a'
    assert train_cli(['--feats', str(train_store), '--out', str(run), *FLAGS]) == 0
    return run


@pytest.mark.oldjax
def test_schedule_and_mask():
    import jax, jax.numpy as jnp
    from fsdit.config import model_config, train_config
    from fsdit.state import lr_schedule, decay_mask
    from fsdit.dit import init_params
    s = lr_schedule(train_config('seed'))
    assert [float(s(i)) for i in (0, 1000, 5000)] == pytest.approx([0.0, 2e-5, 1e-4], rel=1e-5)
    assert float(s(102_500)) == pytest.approx((1e-4 + 1e-6) / 2, rel=1e-4) and float(s(200_000)) == pytest.approx(1e-6, rel=1e-4)
    s = lr_schedule(train_config('test', warmup=20, max_steps=20))   # warmup == max_steps does not crash
    assert float(s(20)) == pytest.approx(1e-3)
    for cond in ('support', 'class', 'context'):
        mc = model_config('mu', cond=cond, num_classes=3 if cond == 'class' else 0)
        params = jax.eval_shape(lambda: init_params(mc, jax.random.PRNGKey(0)))
        flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
        name = lambda path: '/'.join(str(getattr(k, 'key', k)) for k in path)
        decayed = {name(p) for p, m in flat if m}
        assert decayed and all(n.endswith('kernel') for n in decayed)
        assert not any(('bias' in n or 'scale' in n or 'embedding' in n or 'pos' in n) for n in decayed)


@pytest.mark.oldjax
def test_resume_after_sigterm_is_bitwise(train_store, train_run, monkeypatch):
    "SIGTERM at step 3 (between log steps), then the same command again: identical to the uninterrupted run."
    import fsdit.commands.train as T
    orig = T.store_source

    def killing_source(*a, **kw):
        src = orig(*a, **kw); batches = src.batches
        def gen(position=None):
            for i, item in enumerate(batches(position)):
                if position is None and i == 2: os.kill(os.getpid(), signal.SIGTERM)  # handled at the step boundary
                yield item
        src.batches = gen
        return src
    run = train_store.parent / 'run_b'
    monkeypatch.setattr(T, 'store_source', killing_source)
    assert T.train_cli(['--feats', str(train_store), '--out', str(run), *FLAGS]) == 0
    assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 3]
    monkeypatch.setattr(T, 'store_source', orig)
    assert T.train_cli(['--out', str(run)]) == 0   # resumes: configs and store from RUN/config.json
    (a, ma), (b, mb) = _final_params(train_run), _final_params(run)
    assert int(b.step) == 8 and ma == mb   # data position and loss EMA
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)): np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ra, rb = _records(train_run), _records(run)
    assert sorted(rb) == [2, 3, 4, 6, 8] and sorted(ra) == [2, 4, 6, 8]
    skip = ('train/step_time', 'train/samples_per_s', 'train/tflops_per_device', 'train/mfu', 'samples/grid')
    for s in (6, 8):   # whole log intervals after the resume: every metric bitwise equal
        assert {k: v for k, v in ra[s].items() if k not in skip} == {k: v for k, v in rb[s].items() if k not in skip}


@pytest.mark.oldjax
def test_keep_last_and_metrics(train_run):
    assert sorted(p.name for p in (train_run / 'checkpoints').iterdir() if p.name.isdigit()) == ['6', '8']
    recs = _records(train_run)   # strict JSON: empty t-bins are null, never NaN
    assert sorted(recs) == [2, 4, 6, 8]
    r = recs[8]
    for k in ('train/loss', 'train/loss_ema', 'train/grad_norm', 'train/grad_norm_clipped', 'train/param_norm', 'train/lr',
              'train/samples_per_s', 'train/tflops_per_device', 'train/mfu', 'val/loss', 'val_ema/loss', 'val/train_val_gap', 'attn/entropy_early',
              'attn/entropy_mid', 'attn/entropy_late', 'attn/entropy_last_head0', 'samples/grid'):
        assert k in r, k
    bins = [r[f'train/loss_tbin_{i}'] for i in range(10)]
    assert all(v is None or math.isfinite(v) for v in bins) and any(v is not None for v in bins)
    assert r['train/grad_norm_clipped'] <= min(r['train/grad_norm'], 1.0) + 1e-6
    assert Path(r['samples/grid']).exists() and json.loads((train_run / 'config.json').read_text())['feats']


@pytest.mark.oldjax
def test_nan_stops_and_keeps_last_good_checkpoint(train_store, train_run, tmp_path):
    "NaN targets at step 5: the run stops at the log step 6 naming step 5; checkpoints 2 and 4 stay, 6 is never written."
    import jax
    from fsdit.train import train
    from fsdit.features import store_source
    from fsdit.steps import NonFiniteLoss
    from fsdit.run import checkpoint_manager, restore_checkpoint, read_run_config
    from fsdit.state import create_state
    mc, tc = read_run_config(train_run)   # the same configs as the CLI run: no new compilation
    src = store_source(train_store, tc, 1); batches = src.batches
    def poisoned(position=None):
        for i, (b, p) in enumerate(batches(position)):
            if i == 4: b = {**b, 'moments': np.full_like(b['moments'], np.nan)}   # step 5
            yield b, p
    src.batches = poisoned
    run = tmp_path / 'run'
    with pytest.raises(NonFiniteLoss, match='step 5'):
        train(mc, tc, src, run)
    m = checkpoint_manager(run, tc.keep)
    assert m.all_steps() == [2, 4]
    state, _ = restore_checkpoint(m, create_state(mc, tc)); m.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert max(_records(run)) == 4


_DEVICES = textwrap.dedent('''
    import sys, numpy as np, jax
    from fsdit.config import model_config, train_config
    from fsdit import steps as T, testing
    from fsdit.utils import LatentScaling
    assert jax.local_device_count() == 8
    mc = model_config('mu', input_size=16, support_dim=32)
    out = {}
    for name, n, fsdp in (('one', 1, False), ('dp8', 8, False), ('fsdp8', 8, True)):
        tc = train_config('test', batch_size=16, lr=1e-2, warmup=1, fsdp=fsdp, fsdp_min_size=256)
        lay = T.layout_for(tc, jax.devices()[:n])
        step = T.make_train_step(mc, tc, LatentScaling(0.18215), lay)
        state = lay.create(mc, tc)
        specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.params))]
        out[f'{name}_sharded'] = np.array(sum(any(a is not None for a in sp) for sp in specs))
        out[f'{name}_leaves'] = np.array(len(specs))
        for i, x in enumerate(jax.tree.leaves(lay.fetch(state.params))): out[f'{name}_p0_{i}'] = x
        losses, norms = [], []
        for s in range(3):
            state, m = step(state, lay.put_batch(testing.synthetic_batch(16, mc, seed=s)))
            m = T.to_host(m); losses.append(m['loss']); norms.append(m['grad_norm'])
        out[f'{name}_losses'], out[f'{name}_norms'] = np.array(losses), np.array(norms)
        for i, x in enumerate(jax.tree.leaves(lay.fetch(state))): out[f'{name}_s_{i}'] = x
        if n == 8:   # a batch this process cannot split evenly is refused with the fix
            try: lay.put_batch(testing.synthetic_batch(12, mc)); out[f'{name}_refused'] = np.array('')
            except ValueError as e: out[f'{name}_refused'] = np.array(str(e))
    np.savez(sys.argv[1], **out)
''')


@pytest.mark.oldjax
def test_one_vs_eight_devices(tmp_path):
    "1 device == 8 devices data-parallel == 8 devices FSDP: same initial state, losses, gradient norms and final state."
    f = tmp_path / 'out.npz'
    r = subprocess.run([sys.executable, '-c', _DEVICES, str(f)], capture_output=True, text=True, timeout=600,
                       env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
    assert r.returncode == 0, r.stderr[-3000:]
    o = np.load(f)
    assert int(o['one_sharded']) == 0 and int(o['dp8_sharded']) == 0
    assert 0 < int(o['fsdp8_sharded']) < int(o['fsdp8_leaves'])     # big tensors split, small ones replicated
    for other in ('dp8', 'fsdp8'):
        assert 'multiple of 8' in str(o[f'{other}_refused'])
        np.testing.assert_allclose(o['one_losses'], o[f'{other}_losses'], rtol=1e-5)
        np.testing.assert_allclose(o['one_norms'], o[f'{other}_norms'], rtol=1e-4)
        for k in o.files:
            if k.startswith('one_p0_'): np.testing.assert_array_equal(o[k], o[other + k[3:]])   # same init, any layout
            if k.startswith('one_s_'): np.testing.assert_allclose(o[k], o[other + k[3:]], rtol=1e-4, atol=1e-6)


_PROCESS = textwrap.dedent('''
    import os, signal, sys, jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    port, pid, feats, out, term_after = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 2
    import fsdit.train as T
    if pid == 1 and term_after:   # a preemption notice that reaches process 1 only, after step `term_after`
        after_step = T.Trainer.after_step
        def after_then_term(self):
            after_step(self)
            if self.step == term_after: os.kill(os.getpid(), signal.SIGTERM)
        T.Trainer.after_step = after_then_term
    from fsdit.commands.train import train_cli
    sys.exit(train_cli(['--feats', feats, '--out', out, *sys.argv[6:]]))
''')


@pytest.mark.parametrize('fsdp', [False, True], ids=['replicated', 'fsdp'])
def test_two_processes_match_one(train_store, train_run, tmp_path, fsdp):
    """Two JAX processes on loopback CPU (1 device each, half the batch each) give the one-process run, with the
    state replicated or sharded over the two (FSDP: each process holds and checkpoints half of every big tensor).
    SIGTERM reaches process 1 only, after step 5: both processes stop together at the next log step (6), save
    it and exit cleanly (a process stopping alone would leave the other waiting in a collective)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    run = tmp_path / 'run_2p'
    extra = ['--fsdp', 'true', '--fsdp-min-size', '256'] if fsdp else []
    procs = [subprocess.Popen([sys.executable, '-c', _PROCESS, str(port), str(i), str(train_store), str(run), '5', *FLAGS, *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], '\n'.join(o[-3000:] for o in outs)
    ra, rb = _records(train_run), _records(run)
    assert sorted(rb) == [2, 4, 6] and sorted(ra) == [2, 4, 6, 8]
    for s in rb:
        for k in ('train/loss', 'train/grad_norm', 'val/loss', 'val_ema/loss'):
            if k in ra[s]: assert rb[s][k] == pytest.approx(ra[s][k], rel=1e-4), (s, k)
    import jax
    (a, _), (b, meta) = _final_params(train_run, 6), _final_params(run)
    assert int(b.step) == 6 and meta['data'] == _final_params(train_run, 6)[1]['data']
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)): np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # each process wrote its own part of the checkpoint; none gathered the whole state to write it alone
    parts = [sum(f.stat().st_size for f in (run / 'checkpoints' / '6' / 'state' / f'ocdbt.process_{i}').rglob('*') if f.is_file())
             for i in range(2)]
    assert min(parts) > 0.3 * sum(parts), parts


def test_train_memory_counts_the_state():
    from fsdit.bench import train_memory
    est = train_memory('mu', 2, input_size=16, support_dim=32)
    assert 2 * est['params'] <= est['adam'] < 2 * est['params'] + 1024   # two moments (+ step counters)
    assert est['argument'] >= 2 * est['params'] + est['adam']
    assert 0 < est['temp'] and est['peak'] >= est['argument'] - est['alias']


def test_wandb_online_without_key_goes_offline(tmp_path, monkeypatch):
    "No API key: 'online' runs offline (no login prompt); records still go to metrics.jsonl, paths as strings."
    from fsdit.config import train_config
    from fsdit.run import RunLog
    from fsdit.images import save_png
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    log = RunLog(tmp_path, {'x': 1}, train_config('test', wandb_mode='online'))
    png = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / 'g.png')
    log.log(1, {'train/loss': 1.0, 'train/loss_tbin_0': float('nan')}, {'samples/grid': png})
    log.close()
    assert _records(tmp_path)[1] == {'step': 1, 'train/loss': 1.0, 'train/loss_tbin_0': None, 'samples/grid': str(png)}
    assert any(p.name.startswith('offline-run') for p in (tmp_path / 'wandb').iterdir())
