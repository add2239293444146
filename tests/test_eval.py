"""fsdit.eval and fsdit.supports: metrics with known answers, the FID feature path, and the whole eval on a tiny trained run."""
import json
import urllib.error

import numpy as np
import pytest

from fsdit.metrics import frechet_distance, frechet_from_stats, class_prototypes, prototype_accuracy, loo_prototype_accuracy, class_diversity, nearest_support_distance
from fsdit.utils import l2_normalize

from fsdit.fid import fid_available, fid_inception, inception_features

from fsdit.eval import evaluate_classes, Pipeline, ClassSet


# ---------------------------------------------------------------- metrics with known answers

def test_frechet_known_answers():
    r = np.random.default_rng(0)
    a = r.normal(size=(400, 6))
    assert abs(frechet_distance(a, a)) < 1e-6
    d = np.linspace(-1, 2, 6)
    assert frechet_distance(a, a + d) == pytest.approx((d ** 2).sum(), abs=1e-6)
    # N(0, diag(va)) vs N(m, diag(vb)): |m|^2 + sum (sqrt va - sqrt vb)^2
    va, vb, m = np.array([1., 2., 5.]), np.array([3., 2., .5]), np.array([1., -1., 2.])
    want = (m ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert frechet_from_stats(np.zeros(3), np.diag(va), m, np.diag(vb)) == pytest.approx(want, abs=1e-9)
    # full (non-diagonal) covariances that commute: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T
    q, _ = np.linalg.qr(r.normal(size=(3, 3)))
    s1, s2 = q @ np.diag(va) @ q.T, q @ np.diag(vb) @ q.T
    assert frechet_from_stats(m, s1, m, s2) == pytest.approx(((np.sqrt(va) - np.sqrt(vb)) ** 2).sum(), abs=1e-8)


def test_prototypes_and_distances():
    C, D = 5, 12
    lab = np.repeat(np.arange(C), 7)
    emb = np.eye(D)[lab] * 3.0                            # perfect: every image on its class direction
    protos = class_prototypes(emb, lab)
    assert prototype_accuracy(emb, lab, protos) == 1.0 and loo_prototype_accuracy(emb, lab) == 1.0
    assert prototype_accuracy(emb, (lab + 2) % C, protos) == 0.0
    assert class_diversity(emb, lab, 'cosine') == pytest.approx(0.0, abs=1e-12)   # no spread within a class
    x = l2_normalize(np.random.default_rng(1).normal(size=(4, 3, D)))
    assert np.allclose(nearest_support_distance(x[:, 2], x, 'cosine'), 0, atol=1e-12)


# ---------------------------------------------------------------- FID feature path

def _fid_installed() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ('torch', 'torchvision', 'pytorch_fid'))


@pytest.fixture
def fid_modules():
    "torch and pytorch-fid's `inception` module (conftest makes torchvision importable beside a CPU torch)."
    from fsdit.fid import _import_fid
    return _import_fid()


@pytest.mark.fid
@pytest.mark.skipif(not _fid_installed(), reason="the fid extra (torch + torchvision + pytorch-fid) is not installed here")
def test_fid_inception_random_weights(tmp_path, monkeypatch, fid_modules):
    torch, inc = fid_modules
    from PIL import Image
    from pytorch_fid.fid_score import get_activations
    from fsdit.fid import _fid_inception_net
    torch.manual_seed(0)
    imgs = np.random.default_rng(0).integers(0, 255, (5, 48, 40, 3), dtype=np.uint8)
    net = _fid_inception_net(inc)
    # random weights with their batch-norm statistics set on random images, so activations stay near unit scale
    # (with the initial statistics the pool3 features shrink to ~1e-8 and every comparison below would pass)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d): m.momentum = None; m.reset_running_stats()
    with torch.no_grad(): net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    net.eval()
    torch.save(net.state_dict(), tmp_path / 'w.pth')              # the layout of pytorch-fid's weight file
    model = fid_inception(str(tmp_path / 'w.pth'), device='cpu')
    assert torch.equal(model.blocks[0][0].conv.weight, net.Conv2d_1a_3x3.conv.weight)   # the file's weights
    assert torch.equal(model.blocks[3][1].branch_pool.conv.weight, net.Mixed_7b.branch_pool.conv.weight)
    a, b = inception_features(imgs, model, batch_size=2), inception_features(imgs, model, batch_size=5)
    assert a.shape == (5, 2048) and np.isfinite(a).all() and a.std() > 1e-2
    close = lambda x, y: np.abs(x - y).max() <= 1e-5 * np.abs(y).max()
    assert close(a, b)
    # pytorch-fid's own path: PNG files -> its dataset and transforms -> the same model
    files = []
    for i, im in enumerate(imgs):
        files.append(tmp_path / f'{i}.png'); Image.fromarray(im).save(files[-1])
    ref = get_activations(files, model, batch_size=2, dims=2048, device='cpu', num_workers=0)
    assert close(a, ref), np.abs(a - ref).max()
    assert np.abs(a - a[::-1]).max() > 1e-2 * np.abs(a).max()    # the features depend on the image (1000x the tolerance)
    # grayscale is repeated to three channels; float input in [-1, 1] is the same image
    g = imgs[..., :1]
    assert close(inception_features(g, model), inception_features(np.repeat(g, 3, -1), model))
    assert close(inception_features(imgs / 127.5 - 1, model), a)

    def offline(*a, **k): raise urllib.error.URLError('no network')
    monkeypatch.setattr(inc, 'load_state_dict_from_url', offline)
    with pytest.raises(RuntimeError, match='could not download the FID Inception weights'):
        fid_inception('download')


def test_fid_error_without_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__
    def no_fid(name, *a, **k):
        if name.startswith('pytorch_fid'): raise ImportError('No module named pytorch_fid')
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', no_fid)
    with pytest.raises(ImportError, match=r"pip install 'fsdit\[fid\]'"):
        fid_inception(None)


# ---------------------------------------------------------------- the protocol on toy data

def test_protocol_baselines_on_toy_classes():
    r = np.random.default_rng(0)
    C, n = 3, 10
    templates = r.uniform(-1, 1, (C, 6, 6, 3))
    lab = np.repeat(np.arange(C), n)
    x = np.clip(templates[lab] + 0.2 * r.normal(size=(C * n, 6, 6, 3)), -1, 1).astype(np.float32)
    cs = ClassSet(x, lab, list('abc'), x.reshape(len(x), -1))
    mean_gen = lambda emb, lat, cfg, seed: lat.mean(1)           # a "model" that outputs the support mean
    pipe = Pipeline(lambda z: z, lambda im: im.reshape(len(im), -1), mean_gen)
    recs = evaluate_classes(pipe, cs, n_per_class=4, shots=(3,), cfg_scales=(2.0,))
    by = {r_['method']: r_ for r_ in recs}
    assert set(by) == {'real', 'copy', 'mean', 'model'}
    for k in ('proto_acc', 'fd_embed', 'diversity_pixel', 'nn_support_pixel'):
        assert by['model'][k] == pytest.approx(by['mean'][k])
    assert by['copy']['nn_support_pixel'] == pytest.approx(0, abs=1e-6) and by['real']['proto_acc'] == 1.0


# ---------------------------------------------------------------- whole eval on a tiny trained run

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "Glyphs 12x12 (pixel space, stand-in encoder) -> store -> a `mu` model trained for a few steps."
    from fsdit.data import prepare, EpisodeSource
    from fsdit.glyph.data import make_offline_dataset
    from fsdit.codecs import PixelEncoder, PixelSpace, offline_model_config
    from fsdit.features import precompute, open_store
    from fsdit.config import train_config
    from fsdit.train import train
    d = tmp_path_factory.mktemp('eval')
    make_offline_dataset(d / 'flat', per_class=8, size=12, chars='ABCDEFGHIJKLMN')
    prepare(d / 'flat', d / 'split', train=8, val=2, test=4)
    store = precompute(d / 'split', d / 'feats', PixelEncoder(dim=16), PixelSpace(size=12), image_size=12,
                       space='pixel', progress=False)
    mc = offline_model_config('mu', size=12, channels=3, embed_dim=16, patch=4)
    tc = train_config('test', max_steps=6, batch_size=8, log_every=3, eval_every=6, sample_every=6, save_every=6,
                      keep=1, sample_steps=2)
    src = EpisodeSource(store.embeds, store.moments, store.class_rows('train'), store.class_rows('val'), tc, 'pixel')
    train(mc, tc, src, d / 'run')
    return d


def test_eval_cli_on_tiny_run(tiny_run, capsys):
    from fsdit.commands.eval import eval_cli
    out = tiny_run / 'eval'
    rc = eval_cli(['--run', str(tiny_run / 'run'), '--feats', str(tiny_run / 'feats'), '--shots', '1', '3',
                   '--cfg', '0', '3', '--cfg-interval', '0.5', '1', '--n', '4', '--steps', '2', '--max-real', '6', '--out', str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / 'eval.json').read_text())
    recs = res['records']
    assert {r['split'] for r in recs} == {'test', 'train'}
    # per split and shots: real, copy, mean, and the model at 2 cfg scales
    assert len(recs) == 2 * 2 * (3 + 2)
    assert len(res['classes']['train']) == len(res['classes']['test']) == 4
    assert res['settings']['cfg_interval'] == [0.5, 1.0] and res['settings']['cfg_scales'] == [0.0, 3.0]
    model = [r for r in recs if r['method'] == 'model']
    assert all(0 <= r['proto_acc'] <= 1 and r['fd_embed'] >= -1e-6 and r['n'] == 16 for r in model)
    assert all(r['nn_support_pixel'] == pytest.approx(0, abs=1e-6) for r in recs if r['method'] == 'copy')
    assert (out / 'fig_proto_acc.png').exists() and (out / 'fig_nn_support_embed.png').exists()
    assert 'proto_acc' in capsys.readouterr().out


def test_quick_eval_for_training(tiny_run):
    from fsdit.eval import quick_eval, class_set
    from fsdit.features import open_store
    from fsdit.run import load_run
    from fsdit.codecs import run_codecs
    run, store = load_run(tiny_run / 'run'), open_store(tiny_run / 'feats')
    codecs = run_codecs(run, store.path)
    cs = class_set(store, 'val', max_per_class=6)
    m = quick_eval(run.params, run.mc, cs, codecs.decode, codecs.embed, n_per_class=2, shots=3, steps=2)
    assert {'val_fs/proto_acc', 'val_fs/fd_embed', 'val_fs/nn_support_embed', 'val_fs/real_proto_acc'} <= set(m)
    assert m['val_fs/chance'] == 0.5 and all(np.isfinite(v) for v in m.values())


def test_sample_cli_on_tiny_run(tiny_run, capsys):
    from PIL import Image
    from fsdit.commands.sample import sample_cli
    cls = next((tiny_run / 'split' / 'test').iterdir())
    out = tiny_run / 'grid.png'
    rc = sample_cli(['--run', str(tiny_run / 'run'), '--class-dir', str(cls), '--n', '6', '--steps', '2',
                     '--out', str(out), '--feats', str(tiny_run / 'feats')])
    assert rc == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out)).shape == (2 * 14, 6 * 14, 3)   # default 5 supports; 6 samples in one row
    assert sample_cli(['--run', str(tiny_run / 'split'), '--class-dir', str(cls)]) == 1
    assert 'not a run directory' in capsys.readouterr().err


def _small_eval(tiny_run, capsys, tag: str, *flags) -> dict:
    "`fsdit eval` of the tiny run on 3-shot held-out episodes only (4 samples a class, CFG 1), with `flags`: its eval.json."
    from fsdit.commands.eval import eval_cli
    out = tiny_run / f'eval_{tag}'
    rc = eval_cli(['--run', str(tiny_run / 'run'), '--feats', str(tiny_run / 'feats'), '--shots', '3', '--no-seen',
                   '--cfg', '1', '--n', '4', '--max-real', '6', *flags, '--out', str(out)])
    assert rc == 0, capsys.readouterr().err
    return json.loads((out / 'eval.json').read_text())


_model = lambda res: next(r for r in res['records'] if r['method'] == 'model')


def test_eval_cli_with_encoder_guidance(tiny_run, capsys):
    "`fsdit eval --guide`: the eval records its guidance, and guided samples sit nearer their supports by the encoder."
    from fsdit.commands.eval import eval_cli
    res = {g: _small_eval(tiny_run, capsys, f'guide{g}', '--steps', '3', '--guide', g, '--guide-upto', '0.8') for g in ('0', '3')}
    assert res['3']['settings']['guide_scale'] == 3.0 and res['3']['settings']['guide_upto'] == 0.8
    model = {g: _model(res[g]) for g in res}
    assert model['3']['nn_support_embed'] < model['0']['nn_support_embed'] - 0.05, model
    assert eval_cli(['--run', str(tiny_run / 'run'), '--guide', '-2']) == 1
    assert 'must be >= 0' in capsys.readouterr().err


def test_eval_cli_from_support(tiny_run, capsys):
    "`fsdit eval --from-support T`: recorded in the settings, and late starts sit nearer the supports than samples from noise."
    from fsdit.commands.eval import eval_cli
    res = {t: _small_eval(tiny_run, capsys, f'from{t}', '--steps', '4', '--from-support', t) for t in ('0', '0.75')}
    for t in res: assert res[t]['settings']['from_support'] == float(t)
    model = {t: _model(res[t]) for t in res}
    assert model['0.75']['nn_support_pixel'] < 0.7 * model['0']['nn_support_pixel'], model
    assert eval_cli(['--run', str(tiny_run / 'run'), '--from-support', '1.5']) == 1
    assert 'starts at a time t in [0, 1)' in capsys.readouterr().err


def test_latent_guide_through_vae_and_siglip():
    "A latent run's guide: SigLIP after the SD-VAE decoder (resized to the tower's size), equal to embed(decode(z)), with finite gradients."
    import jax, jax.numpy as jnp
    from fsdit.codecs import encoder_guide
    from fsdit.encoder import SigLIPEncoder, VisionSpec
    from fsdit.vae import SDVAE, VAEConfig
    vae = SDVAE.random(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4), seed=1)
    enc = SigLIPEncoder.random(VisionSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          image_size=16, patch_size=8), seed=2)
    g = encoder_guide(enc, vae)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, 10, 4)), jnp.float32)   # decodes to 20 px, tower takes 16
    e = np.asarray(g.fn(g.params, z))
    img = np.asarray(jnp.clip(vae.decode(z, clip=False), -1, 1))
    ref = np.asarray(enc.embed(np.asarray(jax.image.resize(img, (3, 16, 16, 3), 'linear', antialias=True))))
    np.testing.assert_allclose(e, ref, atol=1e-5)
    grad = jax.grad(lambda z: (g.fn(g.params, z) * jnp.asarray(ref[::-1])).sum())(z)
    assert grad.shape == z.shape and np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


# ---------------------------------------------------------------- generation spread over devices

_GEN = r'''
import sys, numpy as np, jax
from fsdit.config import model_config
from fsdit.dit import init_params
from fsdit.sampler import generate
mc = model_config('mu', input_size=8, in_channels=3, patch=4, support_dim=16)
p = init_params(mc, jax.random.PRNGKey(0))
leaves, tree = jax.tree.flatten(p)
r = np.random.default_rng(0)   # perturb: a fresh DiT outputs 0 and every sample would be its noise
p = jax.tree.unflatten(tree, [l + 0.05 * r.normal(size=l.shape).astype(np.float32) for l in leaves])
emb = r.normal(size=(5, 3, 16)).astype(np.float32)
z = generate(p, mc, emb, None, steps=3, cfg_scale=2.0, seed=3)
np.save(sys.argv[1], z); print(jax.local_device_count())
'''


def test_generate_same_on_8_devices(tmp_path):
    import os, subprocess, sys, jax
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
    got = subprocess.run([sys.executable, '-c', _GEN, str(tmp_path / 'z8.npy')], env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split()[-1] == '8'
    exec(_GEN.replace('sys.argv[1]', repr(str(tmp_path / 'z1.npy'))), {})    # the same here, on this process's devices
    z1, z8 = np.load(tmp_path / 'z1.npy'), np.load(tmp_path / 'z8.npy')
    assert jax.local_device_count() < 8 and z1.shape == (5, 8, 8, 3) and np.abs(z1).max() > 0
    np.testing.assert_allclose(z8, z1, atol=1e-5)
