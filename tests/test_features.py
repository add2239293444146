"""fsdit.features: the store's contents, resume after a kill equals one uninterrupted run, mismatched
stores are refused, the store feeds EpisodeBatches/host_batch, online batches equal store batches,
several devices give the same store, and the real encoder modules plug in."""
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdit.codecs import PixelEncoder, PixelSpace
from fsdit.commands.precompute import precompute_cli
from fsdit.data import EpisodeBatches, host_batch, load_image, online_batch, to_unit
from fsdit.features import FORMAT_VERSION, open_store, precompute, store_index


def _split(root: Path, layout=(('train', 3), ('val', 1), ('test', 2)), n=7, size=12):
    rng = np.random.RandomState(0)
    for s, k in layout:
        for c in range(k):
            d = root / s / f'{s}{c}'; d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (size + i, size, 3), np.uint8)).save(d / f'{i:02d}.png')
    return root


ENC, VAE = PixelEncoder(dim=8, grid=4), PixelSpace(size=16)
KW = dict(image_size=16, space='pixel', chunk_size=4, batch_size=3, progress=False)


class Killed(Exception): pass


def _kill_after(n):
    def f(i):
        if i == n - 1: raise Killed()
    return f


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return _split(tmp_path_factory.mktemp('d') / 'split')


@pytest.fixture(scope='module')
def whole(data, tmp_path_factory):
    return precompute(data, tmp_path_factory.mktemp('f') / 'feats', ENC, VAE, **KW)


def test_store_contents(data, whole):
    n = 6 * 7
    assert whole.embeds.shape == (n, 8) and whole.moments.shape == (n, 2, 2, 16, 16, 3)
    assert whole.embeds.dtype == whole.moments.dtype == np.float16
    assert isinstance(whole.embeds, np.memmap)
    m = whole.meta
    assert m['format_version'] == FORMAT_VERSION and m['encoder'] == ENC.name and m['vae'] == VAE.name
    assert m['image_size'] == 16 and m['space'] == 'pixel' and m['latent_shape'] == [16, 16, 3] and m['embed_dim'] == 8
    assert 'bilinear' in m['resize'] and m['splits'] == {'train': 21, 'val': 7, 'test': 14}
    assert whole.index['path'][:2] == ['train/train0/00.png', 'train/train0/01.png']
    assert whole.index['split'][21] == 'val' and whole.index['label'][14] == 2
    x = to_unit(load_image(data / whole.index['path'][9], 16))
    np.testing.assert_allclose(whole.moments[9, 0, 0], x, atol=1e-2)
    np.testing.assert_allclose(whole.moments[9, 1, 0], x[:, ::-1], atol=1e-2)
    assert (whole.moments[:, :, 1] == -30).all()
    e = np.asarray(ENC.embed(x[None]))[0]
    np.testing.assert_allclose(whole.embeds[9], e, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(whole.embeds.astype(np.float32), axis=1), 1, atol=2e-3)


@pytest.mark.parametrize('kill_at', [1, 3, 10])
def test_resume_after_kill_equals_uninterrupted(data, whole, tmp_path, kill_at):
    out = tmp_path / 'feats'
    with pytest.raises(Killed):
        precompute(data, out, ENC, VAE, **KW, on_chunk=_kill_after(kill_at))
    assert not out.exists() or not (out / 'metadata.json').exists()
    with pytest.raises(ValueError, match='not a complete feature store'):
        open_store(out)
    done = []
    st = precompute(data, out, ENC, VAE, **KW, on_chunk=done.append)
    assert done == list(range(kill_at, 11))                     # 42 rows / 4 = 11 chunks; none redone
    for k in ('embeds.npy', 'moments.npy', 'index.json', 'metadata.json'):
        assert (out / k).read_bytes() == (whole.path / k).read_bytes(), k
    assert not Path(f'{out}.partial').exists()


def test_half_written_chunk_is_not_taken(data, whole, tmp_path):
    out = tmp_path / 'feats'
    with pytest.raises(Killed):
        precompute(data, out, ENC, VAE, **KW, on_chunk=_kill_after(2))
    part = Path(f'{out}.partial')
    (part / '.chunk_000002.tmp.npz').write_bytes(b'half')      # a chunk killed while being written
    st = precompute(data, out, ENC, VAE, **KW)
    assert np.array_equal(st.moments, whole.moments)


def test_partial_with_other_settings_refused(data, tmp_path):
    out = tmp_path / 'feats'
    with pytest.raises(Killed):
        precompute(data, out, ENC, VAE, **KW, on_chunk=_kill_after(1))
    with pytest.raises(ValueError, match='other settings'):
        precompute(data, out, PixelEncoder(dim=8, grid=4, seed=1), VAE, **KW)
    with pytest.raises(ValueError, match='other settings'):
        precompute(data, out, ENC, VAE, **{**KW, 'chunk_size': 5})


def test_mismatched_store_refused(whole, tmp_path):
    with pytest.raises(ValueError, match="encoder is 'stand-in"):
        open_store(whole.path, {'encoder': 'google/siglip2-base-patch16-224'})
    with pytest.raises(ValueError, match='image_size is 16, the run asks for 224'):
        open_store(whole.path, {'image_size': 224})
    with pytest.raises(ValueError, match="vae is 'pixel-16x3'"):
        open_store(whole.path, {'vae': 'stabilityai/sd-vae-ft-mse', 'space': 'latent'})
    future = tmp_path / 'future'; shutil.copytree(whole.path, future)
    meta = json.loads((future / 'metadata.json').read_text()); meta['format_version'] = FORMAT_VERSION + 1
    (future / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='format_version'):
        open_store(future)
    with pytest.raises(ValueError, match='not a complete feature store'):
        open_store(tmp_path)


def test_rerun_reuses_and_mismatch_refused(data, whole):
    assert precompute(data, whole.path, ENC, VAE, **KW).meta == whole.meta
    with pytest.raises(ValueError, match='does not match'):
        precompute(data, whole.path, ENC, PixelSpace(size=16, channels=1), **KW)


def test_store_feeds_batches_and_online_equals_store(data, whole):
    rows = whole.class_rows('train')
    assert [len(r) for r in rows] == [7, 7, 7] and whole.classes('val') == ['val0']
    idx = next(EpisodeBatches(rows, 6, seed=0))
    b = host_batch(whole.embeds, whole.moments, idx)
    assert set(b) == {'moments', 'support_embeds', 'target_embeds', 'support_latents', 'labels', 'target_index'}
    paths = [data / p for p in whole.index['path']]
    o = online_batch(paths, idx, ENC.embed, VAE.moments, 16)
    for k in b: np.testing.assert_allclose(o[k].astype(np.float32), b[k].astype(np.float32), atol=2e-3)


def test_cli_stand_in(data, tmp_path, capsys):
    out = tmp_path / 'f'
    assert precompute_cli(['--data', str(data), '--out', str(out), '--stand-in', '--image-size', '16',
                           '--embed-dim', '8', '--chunk-size', '5']) == 0
    st = open_store(out, {'space': 'pixel', 'image_size': 16, 'embed_dim': 8})
    assert st.moments.shape == (42, 2, 2, 16, 16, 3)
    assert precompute_cli(['--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'g'), '--stand-in']) == 1


def test_store_index_needs_a_split(tmp_path):
    with pytest.raises(ValueError, match='fsdit prepare'):
        store_index(tmp_path)


_DEVICES = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from fsdit.codecs import PixelEncoder, PixelSpace
    from fsdit.features import precompute, open_store
    assert jax.local_device_count() == 8
    st = precompute(sys.argv[1], sys.argv[2], PixelEncoder(dim=8, grid=4), PixelSpace(size=16), image_size=16,
                    space='pixel', chunk_size=4, batch_size=3, progress=False)
    ref = open_store(sys.argv[3])
    np.testing.assert_allclose(st.embeds.astype(np.float32), ref.embeds.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(st.moments, ref.moments)
    print("OK")
''')


def test_eight_devices_same_store(data, whole, tmp_path):
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
    r = subprocess.run([sys.executable, '-c', _DEVICES, str(data), str(tmp_path / 'f8'), str(whole.path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and 'OK' in r.stdout, r.stdout + r.stderr


def test_real_encoder_modules_plug_in(tmp_path):
    enc_mod = pytest.importorskip('fsdit.encoder'); vae_mod = pytest.importorskip('fsdit.vae')
    import jax
    data = _split(tmp_path / 'split', (('train', 2), ('val', 1)), n=6, size=40)
    enc = enc_mod.SigLIPEncoder.random(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2)
    enc.name = 'tiny-random-siglip'
    vae = vae_mod.SDVAE.random(vae_mod.VAEConfig(block_out_channels=(32, 32), norm_num_groups=8))
    vae.name = 'tiny-random-vae'
    st = precompute(data, tmp_path / 'feats', enc, vae, image_size=32, chunk_size=8, batch_size=4, progress=False)
    assert st.embeds.shape == (18, 32) and st.moments.shape == (18, 2, 2, 16, 16, 4)
    assert st.meta['resize'] == enc.resize_rule
    x = to_unit(np.stack([load_image(data / p, 32) for p in st.index['path'][:4]]))   # the first batch, same shapes
    np.testing.assert_allclose(st.embeds[:4], np.asarray(enc.embed(x)), atol=2e-3)
    mean, logvar = vae.moments(np.concatenate([x, x[:, :, ::-1]]))
    np.testing.assert_allclose(st.moments[:4, 1, 0], np.asarray(mean)[4:], atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(st.moments[:4, 0, 1], np.asarray(logvar)[:4], atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- the latent scale

def test_store_records_the_vaes_scaling_factor(tmp_path):
    "A diffusers AutoencoderKL saved with the SDXL VAE's factor: the store made with it records 0.13025."
    torch = pytest.importorskip('torch'); diffusers = pytest.importorskip('diffusers')
    from fsdit.vae import SDVAE
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=('DownEncoderBlock2D',) * 2,
                            up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=4,
                            scaling_factor=0.13025).save_pretrained(tmp_path / 'vae')
    vae = SDVAE.from_pretrained(tmp_path / 'vae')
    assert vae.scaling_factor == 0.13025
    data = _split(tmp_path / 'split', (('train', 2), ('val', 1)), n=6, size=16)
    st = precompute(data, tmp_path / 'feats', ENC, vae, image_size=16, chunk_size=8, batch_size=4, progress=False)
    assert st.meta['latent_scale'] == 0.13025 and st.latent_scale == 0.13025
    assert open_store(tmp_path / 'feats').latent_scale == 0.13025
    from fsdit.features import store_source
    from fsdit.config import train_config
    assert store_source(st, train_config('test', batch_size=6, shots=3), 1).scaling.scale == 0.13025
    _trains_and_samples_at(st, 0.13025, tmp_path / 'run')


def _trains_and_samples_at(st, scale, run_dir):
    "Two train steps on the store, then a sample: the loss, the run's config and the sampler all use `scale`."
    import jax
    from fsdit.config import model_config, train_config
    from fsdit.dit import DiT
    from fsdit.features import store_source
    from fsdit.flow import example_keys, loss_fn
    from fsdit.run import load_run, read_records
    from fsdit.sampler import generate
    from fsdit.state import create_state
    from fsdit.train import train
    from fsdit.utils import LatentScaling
    mc = model_config('mu', input_size=st.moments.shape[3], in_channels=st.moments.shape[-1], support_dim=st.embeds.shape[1],
                      patch=2, cond='aligned')
    tc = train_config('test', batch_size=6, shots=3, max_steps=2, log_every=1, eval_every=2, sample_every=2, save_every=2)
    src = store_source(st, tc, 1)
    first, _ = next(src.batches())
    train(mc, tc, src, run_dir)
    logged = read_records(run_dir / 'metrics.jsonl')[0][1]['train/loss']      # step 1: the fresh state's loss
    state = create_state(mc, tc)
    want = {s: float(loss_fn(state.params, DiT(mc), first, example_keys(state.key, 0, 6), mc, tc, LatentScaling(s))[0]) for s in (scale, 0.18215)}
    assert abs(logged - want[scale]) < 1e-4 * want[scale] and abs(want[scale] - want[0.18215]) > 1e-2, (logged, want)
    run = load_run(run_dir)
    assert run.latent_scale == scale and json.loads((run_dir / 'config.json').read_text())['latent_scale'] == scale
    emb, lat = np.zeros((4, 3, mc.support_dim), np.float32), np.zeros((4, 3, *st.moments.shape[3:]), np.float32)
    z = generate(jax.tree.map(np.zeros_like, run.params), mc, emb, lat, scaling=run.scaling, steps=2)
    assert abs(float(np.std(z)) * scale - 1) < 0.1   # a zero model returns its noise, divided by the run's scale


def _old_store(path: Path, **meta) -> Path:
    "A copy of a store as made before stores recorded their VAE scaling factor."
    m = json.loads((path / 'metadata.json').read_text())
    m.pop('latent_scale'); m.update(meta)
    (path / 'metadata.json').write_text(json.dumps(m))
    return path


def test_old_store_without_latent_scale(whole, tmp_path):
    shutil.copytree(whole.path, tmp_path / 'pixel')
    assert open_store(_old_store(tmp_path / 'pixel')).latent_scale == 1.0                       # pixel space
    shutil.copytree(whole.path, tmp_path / 'sd')
    sd = open_store(_old_store(tmp_path / 'sd', space='latent', vae='stabilityai/sd-vae-ft-mse'))
    assert sd.latent_scale == 0.18215                                                           # the default VAE
    shutil.copytree(whole.path, tmp_path / 'other')
    other = open_store(_old_store(tmp_path / 'other', space='latent', vae='madebyollin/sdxl-vae-fp16-fix'))
    with pytest.raises(ValueError, match=r'does not record its VAE scaling factor.*fsdit precompute.*"latent_scale"'):
        other.latent_scale
