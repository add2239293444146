"""Command-line settings that take more than one word: every tuple-valued setting of `fsdit train` in the form its
`--help` shows (`--cfg-interval LO HI`), refused in one line naming that form when malformed; `fsdit sample`
takes its sampler steps from the run, as it takes its guidance.

Refusals run in-process through `fsdit.cli.main` (the console script's function). Nothing is trained: the trainer
is replaced where a test only needs the configs it would get, and the run `fsdit sample` reads is a freshly
initialised one, saved as `fsdit train` saves one."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from fsdit.config import ModelConfig, TrainConfig

# a valid value of every tuple-valued TrainConfig field, as typed, and as the config holds it
TUPLES = {'cfg_interval': (['0.6', '1'], (0.6, 1.0))}
TUPLE_FIELDS = [f for f in dataclasses.fields(TrainConfig) if isinstance(f.default, tuple)]


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
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc not in (0, None) and 'Traceback' not in err and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f'fsdit {cmd}: '), err
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


def flag(f: dataclasses.Field) -> str: return '--' + f.name.replace('_', '-')


def parsed(*flags) -> TrainConfig:
    "The TrainConfig `fsdit train FLAGS` would train with (the `test` preset below the flags; no store, nothing run)."
    from fsdit.commands.train import parse_train_args, resolve_configs
    return resolve_configs(parse_train_args(['--out', '/nonexistent/run', '--preset', 'test', *flags]), None)[1]


def test_every_tuple_setting_is_covered():
    "A new tuple-valued TrainConfig field must get a value here, and with it every test below."
    assert {f.name for f in TUPLE_FIELDS} == set(TUPLES)
    assert not [f for f in dataclasses.fields(ModelConfig) if isinstance(f.default, tuple)]   # none to test yet


@pytest.mark.parametrize('f', TUPLE_FIELDS, ids=lambda f: f.name)
def test_train_help_shows_tuple_settings_as_numbers(f, capsys):
    "`--help` names each number (`--cfg-interval LO HI`), as `fsdit eval` and `fsdit sample` do; the parser takes that many."
    from fsdit.commands.train import train_parser
    rc, out, _ = fsdit(capsys, 'train', '--help')
    action = next(a for a in train_parser()._actions if flag(f) in a.option_strings)
    assert rc == 0 and action.nargs == len(action.metavar) == len(f.default)
    assert f"{flag(f)} {' '.join(action.metavar)}" in ' '.join(out.split())
    if f.name == 'cfg_interval': assert action.metavar == ('LO', 'HI')


@pytest.mark.parametrize('form', ['spaced', 'seed name', 'commas', 'equals', 'before another flag'])
@pytest.mark.parametrize('f', TUPLE_FIELDS, ids=lambda f: f.name)
def test_train_tuple_setting_forms(f, form):
    words, want = TUPLES[f.name]
    argv = {'spaced': [flag(f), *words], 'seed name': [f"--{f.name}", *words], 'commas': [flag(f), ','.join(words)],
            'equals': [f"{flag(f)}={','.join(words)}"], 'before another flag': [flag(f), *words, '--lr', '0.01']}[form]
    tc = parsed(*argv)
    got = getattr(tc, f.name)
    assert got == want and type(got) is tuple and hash(tc)          # a tuple: the config stays hashable (jit's static arg)
    assert getattr(parsed(), f.name) == f.default                    # not given: the preset's


@pytest.mark.parametrize('bad', [['0.6'], ['0.6', 'x'], ['[0.6,', '1.0]'], ['[0.6, 1.0]'], ['0.6', '1', '0.2'], []],
                         ids=['one', 'not a number', 'a list', 'a quoted list', 'three', 'none'])
@pytest.mark.parametrize('f', TUPLE_FIELDS, ids=lambda f: f.name)
def test_train_tuple_setting_malformed_refused(f, bad, capsys, tmp_path):
    out = tmp_path / 'run'
    line = refused(fsdit(capsys, 'train', '--feats', tmp_path / 'feats', '--out', out, flag(f), *bad, '--max-steps', '4'),
                   'train', f"argument {flag(f)}: expected {len(f.default)} numbers",
                   f"as in `{flag(f)} {' '.join(map(str, f.default))}`", 'got')
    if f.name == 'cfg_interval': assert 'LO HI' in line
    assert not out.exists()


@pytest.fixture(scope='module')
def cli_store(tmp_path_factory):
    "A tiny prepared glyph split and its stand-in feature store (pixel space, 12x12)."
    from fsdit.cli import main
    from fsdit.glyph.data import make_offline_dataset
    d = tmp_path_factory.mktemp('cli_args')
    make_offline_dataset(d / 'glyphs', per_class=6, size=12, chars='0123456789AB')
    assert main(['prepare', '--src', str(d / 'glyphs'), '--dst', str(d / 'split'), '--train', '8', '--val', '2',
                 '--test', '2']) == 0
    assert main(['precompute', '--data', str(d / 'split'), '--out', str(d / 'feats'), '--stand-in', '--image-size', '12',
                 '--embed-dim', '16']) == 0
    return d / 'feats'


def test_train_cli_tuple_setting_reaches_the_trainer(cli_store, tmp_path, capsys, monkeypatch):
    "The whole `fsdit train` path up to the trainer: the given numbers arrive as the config's tuple; out of range: refused."
    import fsdit.commands.train as L
    got = []
    monkeypatch.setattr(L, 'train', lambda mc, tc, *a, **k: got.append(tc))
    base = ['train', '--feats', cli_store, '--model', 'mu', '--model.patch', '4', '--preset', 'test']
    rc, _, err = fsdit(capsys, *base, '--out', tmp_path / 'a', '--cfg-interval', '0.6', '1')
    assert rc == 0 and got[-1].cfg_interval == (0.6, 1.0), err
    rc, _, err = fsdit(capsys, *base, '--out', tmp_path / 'b', '--cfg-interval', '0.25,0.75')
    assert rc == 0 and got[-1].cfg_interval == (0.25, 0.75), err
    refused(fsdit(capsys, *base, '--out', tmp_path / 'c', '--cfg-interval', '0.9', '0.1'), 'train',
            'cfg_interval must be two times', '0 <= lo <= hi <= 1')
    assert len(got) == 2 and not (tmp_path / 'c').exists()


@pytest.fixture(scope='module')
def sample_run(tmp_path_factory):
    "A freshly initialised run (pixel space, 8x8, `sample_steps` 3), saved as `fsdit train` saves one, and 3 support files."
    from fsdit.config import train_config
    from fsdit.codecs import offline_model_config
    from fsdit.run import write_run_config, checkpoint_manager, save_checkpoint
    from fsdit.state import create_state
    d = tmp_path_factory.mktemp('sample_steps')
    mc, tc = offline_model_config('mu', size=8, channels=3, embed_dim=16), train_config('test', shots=3, sample_steps=3)
    write_run_config(d / 'run', mc, tc, 'pixel')
    with checkpoint_manager(d / 'run', keep=1) as mngr: save_checkpoint(mngr, create_state(mc, tc), {})
    r = np.random.default_rng(0)
    files = [d / f's{i}.png' for i in range(3)]
    for f in files: Image.fromarray(r.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(f)
    return d / 'run', files


def test_sample_steps_default_to_the_runs(sample_run, tmp_path, capsys, monkeypatch):
    "No --steps: the run's TrainConfig.sample_steps (3 here, not 50); --steps still wins."
    import fsdit.commands.sample as S
    run, files = sample_run
    steps, real = [], S.sample_from_supports
    monkeypatch.setattr(S, 'sample_from_supports', lambda *a, **k: steps.append(k['steps']) or real(*a, **k))
    rc, out, err = fsdit(capsys, 'sample', '--run', run, '--support', *files, '--n', '2', '--out', tmp_path / 'g.png')
    assert rc == 0 and steps == [3] and out.rstrip().endswith('cfg 3.0, 3 steps)'), err
    rc, out, err = fsdit(capsys, 'sample', '--run', run, '--support', *files, '--n', '2', '--steps', '2',
                         '--out', tmp_path / 'g2.png')
    assert rc == 0 and steps == [3, 2] and out.rstrip().endswith('cfg 3.0, 2 steps)'), err
    rc, out, _ = fsdit(capsys, 'sample', '--help')
    assert rc == 0 and "--steps STEPS sampler steps (default: the run's)" in ' '.join(out.split())


def test_explore_refuses_in_one_line(sample_run, cli_store, tmp_path, capsys, monkeypatch):
    "`fsdit explore RUN`: what is wrong and what to do, in one line, before any server starts; a good RUN reaches Voilà."
    import shutil, socket
    import fsdit.app as A
    served = []
    def serve(nb, port, browser=True, name=''):                      # instead of Voilà: what it would serve, then clean up
        served.append((nb.read_text(), port, browser)); shutil.rmtree(nb.parent); return 0
    monkeypatch.setattr(A, 'serve', serve)
    run, _ = sample_run
    refused(fsdit(capsys, 'explore', tmp_path / 'nope'), 'explore', 'no such run folder', '--out folder of `fsdit train`')
    refused(fsdit(capsys, 'explore', run.parent), 'explore', 'is not a run', 'it holds 1 run(s)', 'pass one of them')
    refused(fsdit(capsys, 'explore', run), 'explore', 'names no feature store', 'pass --feats STORE')
    refused(fsdit(capsys, 'explore', run, '--feats', tmp_path), 'explore', 'is not a feature store')
    refused(fsdit(capsys, 'explore', run, '--port', '70000'), 'explore', 'argument --port: a port is 1 to 65535')
    refused(fsdit(capsys, 'explore', run, '--split', 'all'), 'explore', 'argument --split: invalid choice')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(); port = s.getsockname()[1]
        refused(fsdit(capsys, 'explore', run, '--feats', cli_store, '--port', port), 'explore',
                f'port {port} is in use', 'pick another with --port')
    monkeypatch.setattr(A, 'voila_installed', lambda: False)
    refused(fsdit(capsys, 'explore', run, '--feats', cli_store), 'explore', "pip install 'fsdit[app]'")
    assert served == []
    monkeypatch.setattr(A, 'voila_installed', lambda: True)
    rc, _, err = fsdit(capsys, 'explore', run, '--feats', cli_store, '--no-browser', '--split', 'val')
    assert rc == 0 and len(served) == 1, err
    src, port, browser = served[0]
    assert f"show_explorer({str(run)!r}, feats={str(cli_store)!r}, split='val')" in src and not browser and port > 0


def test_precompute_takes_a_stand_in_encoder_folder_beside_a_vae(cli_store, tmp_path, capsys):
    "`fsdit precompute --encoder FOLDER --vae FOLDER` without --stand-in: a saved stand-in encoder and a diffusers VAE make a latent store."
    import jax
    from fsdit.features import open_store
    from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderNet, GlyphEncoderSpec
    from fsdit.glyph.vae import GlyphVAESpec
    from fsdit.vae import SDVAE
    spec = GlyphEncoderSpec(image_size=12, widths=(8, 8, 8, 8), dim=8, embed_dim=16)
    params = GlyphEncoderNet(spec).init(jax.random.PRNGKey(0), np.zeros((1, 12, 12, 3), np.float32))['params']
    GlyphEncoder(spec, params).save_pretrained(tmp_path / 'enc')
    SDVAE.random(GlyphVAESpec(image_size=12, blocks=(8, 16), groups=4).config(0.5)).save_pretrained(tmp_path / 'vae', sample_size=12)
    rc, out, err = fsdit(capsys, 'precompute', '--data', cli_store.parent / 'split', '--out', tmp_path / 'feats',
                         '--encoder', tmp_path / 'enc', '--vae', tmp_path / 'vae', '--image-size', '12')
    assert rc == 0, err
    st = open_store(tmp_path / 'feats')
    assert (st.meta['space'], st.meta['encoder'], st.meta['vae']) == ('latent', str(tmp_path / 'enc'), str(tmp_path / 'vae'))
    assert st.embeds.shape[1] == 16 and tuple(st.meta['latent_shape']) == (6, 6, 4) and st.meta['latent_scale'] == 0.5
    np.testing.assert_allclose(np.linalg.norm(st.embeds.astype(np.float32), axis=1), 1, atol=2e-3)
