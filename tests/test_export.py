"""`fsdit export`: a trained run (the shared tiny demo's) as a folder to share, read back by `fsdit sample`, `fsdit eval`,
`load_run` and the explorer -- from the folder and, through a hub cache laid out by hand with the hub off, from its id --
giving the run's samples to the bit. Commands run in-process through `fsdit.cli.main`, as the console script runs them."""
import json, shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fsdit.run import flat_params, load_run


def fsdit(capsys, *args):
    "Run `fsdit ARGS` in this process: (exit status, stdout, stderr)."
    from fsdit.cli import main
    capsys.readouterr()
    try: rc = main([str(a) for a in args])
    except SystemExit as e: rc = e.code
    o = capsys.readouterr()
    return rc, o.out, o.err


def refused(result, *needles):
    "A refusal: exit status 1, one line `fsdit export|sample: ...` on stderr holding every needle, no traceback."
    rc, _, err = result
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 1 and 'Traceback' not in err and len(lines) == 1, (rc, err)
    assert lines[0].startswith(('fsdit export: ', 'fsdit sample: ')), err
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def shared(demo_tiny, tmp_path_factory):
    """The tiny demo's run copied beside a demo summary and held-out grid (the shared fixture stays untouched), and its
    export: (run, export)."""
    root = tmp_path_factory.mktemp('export')
    run = root / 'demo' / 'run'
    shutil.copytree(demo_tiny / 'demo' / 'run', run)
    summary = {'step': 30, 'cfg': 3.0, 'test': {'classes': 4, 'real': {'judge_acc': 0.75, 'glyph_fd': 20.0},
                                                'model': {'judge_acc': 0.4375, 'glyph_fd': 61.5},
                                                'vs_real': {'judge_acc': 0.583, 'glyph_fd': 3.07}}}
    (root / 'demo' / 'summary.json').write_text(json.dumps(summary))
    Image.new('RGB', (60, 36), 'white').save(root / 'demo' / 'samples_heldout.png')
    from fsdit.export import export_run
    export_run(run, root / 'shared')
    return run, root / 'shared'


@pytest.fixture(scope='module')
def supports(demo_tiny):
    return sorted((demo_tiny / 'demo' / 'split' / 'test').iterdir())[0]


def test_export_files_no_pickle_and_card(shared, capsys):
    run, ex = shared
    names = sorted(str(p.relative_to(ex)) for p in ex.rglob('*') if p.is_file())
    assert names == ['README.md', 'config.json', 'metrics.jsonl', 'model.safetensors', 'samples_heldout.png', 'summary.json']
    for p in ex.rglob('*'):                                     # nothing a loader would unpickle
        assert p.suffix not in ('.pkl', '.pickle', '.npz', '.npy', '.bin', '.pt', '.pth', '.ckpt', '.msgpack'), p
    from safetensors.numpy import load_file
    w, orig = load_file(str(ex / 'model.safetensors')), load_run(run)
    assert set(w) == set(flat_params(orig.params))
    for k, v in flat_params(orig.params).items(): np.testing.assert_array_equal(w[k], v)
    cfg = json.loads((ex / 'config.json').read_text())
    assert cfg['format'] == 'fsdit-export' and cfg['step'] == 30 and cfg['sampling']['cfg_interval'] == [0.5, 1.0]
    assert cfg['codecs']['encoder'].startswith('stand-in/') and cfg['codecs']['image_size'] == 16
    assert cfg['codecs']['space'] == 'pixel' and cfg['latent_scale'] == 1.0 and 'feats' not in cfg
    card = (ex / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: fsdit') and 'at step 30' in card
    assert '| held-out (test), 4 | model | 43.8% | 61.5 |' in card and '0.58x' in card
    assert '](samples_heldout.png)' in card and 'not SigLIP2' in card
    assert cfg['model'] == json.loads((run / 'config.json').read_text())['model']


def test_sample_from_export_is_the_runs(shared, supports, tmp_path, capsys):
    "`fsdit sample` on the export (no store) and on the run (its store): the same seed gives the same arrays."
    run, ex = shared
    got = {}
    for name, r in (('run', run), ('export', ex)):
        rc, out, err = fsdit(capsys, 'sample', '--run', r, '--class-dir', supports, '--n', 3, '--steps', 2, '--seed', 5,
                             '--out', tmp_path / f'{name}.png', '--npz', tmp_path / f'{name}.npz')
        assert rc == 0, err
        got[name] = np.load(tmp_path / f'{name}.npz')
    np.testing.assert_array_equal(got['export']['samples'], got['run']['samples'])
    np.testing.assert_array_equal(got['export']['supports'], got['run']['supports'])
    assert (tmp_path / 'export.png').read_bytes() == (tmp_path / 'run.png').read_bytes()
    refused(fsdit(capsys, 'sample', '--run', ex, '--class-dir', supports, '--raw', '--out', tmp_path / 'raw.png'),
            'EMA weights only')


def test_load_run_by_hub_id_offline(shared, supports, tmp_path, monkeypatch, capsys):
    "A hub cache laid out as huggingface_hub lays one out, the hub off: the id resolves to the snapshot, the run's weights."
    from huggingface_hub import constants
    run, ex = shared
    rev = '0123456789abcdef0123456789abcdef01234567'
    repo = tmp_path / 'hub' / 'models--user--tiny-glyphs'
    shutil.copytree(ex, repo / 'snapshots' / rev)
    (repo / 'refs').mkdir(); (repo / 'refs' / 'main').write_text(rev)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1'); monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True); monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.chdir(tmp_path)                                  # no folder 'user/tiny-glyphs' here
    hubbed, orig = load_run('user/tiny-glyphs'), load_run(run)
    assert hubbed.path == repo / 'snapshots' / rev and (hubbed.step, hubbed.mc, hubbed.tc) == (orig.step, orig.mc, orig.tc)
    assert jax.tree.structure(hubbed.params) == jax.tree.structure(orig.params)
    for a, b in zip(jax.tree.leaves(hubbed.params), jax.tree.leaves(orig.params)): np.testing.assert_array_equal(a, b)
    rc, _, err = fsdit(capsys, 'sample', '--run', 'user/tiny-glyphs', '--class-dir', supports, '--n', 2, '--steps', 2,
                       '--out', tmp_path / 'hub.png')
    assert rc == 0, err
    line = refused(fsdit(capsys, 'sample', '--run', 'user/not-there', '--class-dir', supports, '--out', tmp_path / 'x.png'),
                   "'user/not-there'", 'HF_HUB_OFFLINE')
    assert not (tmp_path / 'x.png').exists() and len(line) < 600


def test_export_carries_its_encoder_folder(demo_tiny, supports, tmp_path, capsys):
    """A run whose store names a local encoder folder (a saved glyph encoder, as `fsdit demo --data unaligned` makes):
    the export carries a copy (weights and config, not the pickle beside them) and samples as the run did after the
    original folder is gone."""
    from fsdit.codecs import PixelSpace, offline_model_config
    from fsdit.config import train_config
    from fsdit.features import precompute
    from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderNet, GlyphEncoderSpec
    from fsdit.run import checkpoint_manager, save_checkpoint, write_run_config
    from fsdit.state import create_state
    r = np.random.default_rng(0)
    draw = lambda shapes, scale: jax.tree.map(lambda a: (scale * r.standard_normal(a.shape)).astype(a.dtype), shapes)
    spec = GlyphEncoderSpec(embed_dim=8)                         # random weights, drawn from the shapes (no init to run)
    enc = GlyphEncoder(spec, draw(jax.eval_shape(GlyphEncoderNet(spec).init, jax.random.PRNGKey(0), np.zeros((1, 24, 24, 3)))['params'], 0.2))
    enc_dir = enc.save_pretrained(tmp_path / 'demo' / 'encoder')
    (enc_dir / 'pytorch_model.bin').write_bytes(b'a pickle that must not travel')
    precompute(demo_tiny / 'demo' / 'split', tmp_path / 'demo' / 'feats', GlyphEncoder.from_pretrained(enc_dir),
               PixelSpace(16, 1), 16, 'pixel', splits=('test',), progress=False)
    mc, tc = offline_model_config('mu', size=16, channels=1, embed_dim=8, cond='aligned'), train_config('test', shots=3)
    run = tmp_path / 'demo' / 'run'
    write_run_config(run, mc, tc, 'pixel', {'feats': str(tmp_path / 'demo' / 'feats'), 'latent_scale': 1.0})
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(lambda: create_state(mc, tc)))
    state = state.replace(ema_params=draw(state.ema_params, 0.1))
    with checkpoint_manager(run, keep=1) as m: save_checkpoint(m, state, {})
    args = lambda r, name: ('sample', '--run', r, '--class-dir', supports, '--n', 2, '--steps', 2,
                            '--out', tmp_path / f'{name}.png', '--npz', tmp_path / f'{name}.npz')
    assert fsdit(capsys, *args(run, 'run'))[0] == 0
    rc, out, err = fsdit(capsys, 'export', run, tmp_path / 'shared')
    assert rc == 0 and 'encoder encoder (carried)' in out and 'figures: none, held-out grid: none' in out, err
    ex = tmp_path / 'shared'
    assert sorted(p.name for p in (ex / 'encoder').iterdir()) == ['config.json', 'model.safetensors']
    assert json.loads((ex / 'config.json').read_text())['codecs']['encoder'] == 'encoder'
    card = (ex / 'README.md').read_text()
    assert 'None: the run was not evaluated' in card and 'No held-out sample grid' in card and 'carried in this folder' in card
    shutil.move(enc_dir, tmp_path / 'gone')
    rc, _, err = fsdit(capsys, *args(ex, 'export'))
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / 'export.npz')['samples'], np.load(tmp_path / 'run.npz')['samples'])


def test_eval_on_export_matches_run(shared, demo_tiny, tmp_path, capsys):
    "`fsdit eval` on the export, given the store, scores it as it scores the run."
    run, ex = shared
    feats = demo_tiny / 'demo' / 'feats'
    recs = {}
    for name, r in (('run', run), ('export', ex)):
        rc, _, err = fsdit(capsys, 'eval', '--run', r, '--feats', feats, '--n', 2, '--shots', 3, '--max-real', 4, '--steps', 2,
                           '--no-seen', '--out', tmp_path / name)
        assert rc == 0, err
        recs[name] = json.loads((tmp_path / name / 'eval.json').read_text())
    assert recs['export']['records'] == recs['run']['records'] and recs['export']['step'] == 30
    rc, _, err = fsdit(capsys, 'eval', '--run', ex, '--out', tmp_path / 'nofeats')
    assert rc == 1 and 'pass --feats' in err


def test_explorer_opens_an_export(shared, demo_tiny):
    from fsdit.explorer import Explorer, find_runs
    run, ex = shared
    assert find_runs(ex) == [ex]
    e = Explorer(ex, feats=demo_tiny / 'demo' / 'feats', n=2, steps=2)
    kw = dict(n=2, cfg_scale=3.0, steps=2, seed=1)
    from fsdit.explorer import RunView
    np.testing.assert_array_equal(e.view.generate(e.supports, **kw), RunView(run).generate(e.supports, **kw))
    assert e.metrics_view()['step'] == 30


def test_refusals_are_one_line_and_write_nothing(shared, tmp_path, capsys, monkeypatch):
    run, ex = shared
    refused(fsdit(capsys, 'export', run, ex), 'exists and is not empty')
    (tmp_path / 'notarun').mkdir(); (tmp_path / 'notarun' / 'x.png').write_bytes(b'')
    refused(fsdit(capsys, 'export', tmp_path / 'notarun', tmp_path / 'a'), 'not a run directory')
    assert not (tmp_path / 'a').exists()
    (tmp_path / 'file').write_text('x')
    refused(fsdit(capsys, 'export', run, tmp_path / 'file'), 'is a file')
    refused(fsdit(capsys, 'export', run, tmp_path / 'file' / 'out'), 'lies under the file')
    bad = tmp_path / 'bad'; shutil.copytree(ex, bad)
    (bad / 'model.safetensors').write_bytes(b'\x00' * 16)
    refused(fsdit(capsys, 'sample', '--run', bad, '--support', run.parent / 'samples_heldout.png', '--out', tmp_path / 'g.png'),
            'cannot be read')
    import fsdit.export as E                                     # a failure half way: no OUT, no partial folder
    def boom(*a, **k): raise OSError(28, 'No space left on device')
    monkeypatch.setattr(E, 'model_card', boom)
    refused(fsdit(capsys, 'export', run, tmp_path / 'half'), 'No space left on device')
    assert not [p for p in tmp_path.iterdir() if 'half' in p.name]
    assert [l for l in fsdit(capsys, 'export', '--help')[1].splitlines() if 'RUN' in l or 'run' in l]
