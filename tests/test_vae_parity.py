"fsdit.vae against diffusers' PyTorch AutoencoderKL: random models saved with save_pretrained, loaded by SDVAE.from_pretrained."
import json, time

import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
from safetensors.numpy import load_file, save_file

from fsdit.vae import SDVAE, VAEConfig, DEFAULT_VAE

TOL = 1e-4   # max abs error / max abs reference value, float32


def rel(a, b) -> float: return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
def nhwc(t) -> np.ndarray: return t.permute(0, 2, 3, 1).numpy()


def torch_vae(seed=0, blocks=(8, 16), layers=1, groups=4, **kw):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(block_out_channels=blocks, down_block_types=('DownEncoderBlock2D',) * len(blocks),
                                   up_block_types=('UpDecoderBlock2D',) * len(blocks), layers_per_block=layers,
                                   norm_num_groups=groups, **kw).eval()


def reference(ref, x: np.ndarray, z: np.ndarray | None = None):
    "(mean, logvar, decoded mean, decoded z) from the PyTorch model, NHWC numpy."
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        dec = ref.decode(post.mean).sample
        dz = None if z is None else nhwc(ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample)
    return nhwc(post.mean), nhwc(post.logvar), nhwc(dec), dz


def images(shape, seed=0): return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def assert_parity(vae: SDVAE, ref, x, z=None):
    mean_r, logvar_r, dec_r, dz_r = reference(ref, x, z)
    mean, logvar = vae.moments(x)
    assert mean.shape == mean_r.shape
    assert rel(mean, mean_r) < TOL and rel(logvar, logvar_r) < TOL, (rel(mean, mean_r), rel(logvar, logvar_r))
    assert rel(vae.decode(mean_r, clip=False), dec_r) < TOL
    if z is not None: assert rel(vae.decode(z, clip=False), dz_r) < TOL


# block counts, channels, layers per block, norm groups, optional pieces; image sizes give odd latent grids
CONFIGS = {
    'two-blocks': (dict(blocks=(8, 16), layers=1, groups=4), (2, 14, 10, 3), (1, 5, 3, 4)),      # latents 7x5
    'three-blocks-l2': (dict(blocks=(8, 8, 16), layers=2, groups=8), (1, 12, 20, 3), (1, 3, 3, 4)),  # latents 3x5
    'one-block-bare': (dict(blocks=(16,), layers=1, groups=8, latent_channels=3, use_quant_conv=False,
                            use_post_quant_conv=False, mid_block_add_attention=False), (2, 9, 7, 3), None),
}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_parity_tiny(tmp_path, name):
    kw, xshape, zshape = CONFIGS[name]
    ref = torch_vae(**kw)
    ref.save_pretrained(tmp_path)
    vae = SDVAE.from_pretrained(tmp_path, latent_channels=None)
    assert vae.config.latent_channels == kw.get('latent_channels', 4)
    assert vae.num_params == sum(p.numel() for p in ref.parameters())
    assert_parity(vae, ref, images(xshape), None if zshape is None else images(zshape, 1) * 3)


# --- the hub's file layout: stabilityai/sd-vae-ft-mse was written by diffusers 0.4 ---------------------------

HUB_CONFIG_KEYS = ('_class_name', 'act_fn', 'block_out_channels', 'down_block_types', 'in_channels', 'latent_channels',
                   'layers_per_block', 'norm_num_groups', 'out_channels', 'sample_size', 'up_block_types')
LEGACY = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def hub_shaped(d):
    "Rewrite a save_pretrained directory the way the hub's sd-vae-ft-mse files are."
    cfg = json.loads((d / 'config.json').read_text())
    cfg = {k: cfg[k] for k in HUB_CONFIG_KEYS} | {'_diffusers_version': '0.4.2'}   # no scaling_factor etc.
    (d / 'config.json').write_text(json.dumps(cfg, indent=2))
    w = load_file(str(d / 'diffusion_pytorch_model.safetensors'))
    out = {}
    for k, v in w.items():
        for new, old in LEGACY.items():
            if '.attentions.0.' in k and f'.{new}.' in k: k = k.replace(f'.{new}.', f'.{old}.')
        out[k] = v
    save_file(out, str(d / 'diffusion_pytorch_model.safetensors'))
    return out


def test_hub_shaped_fixture(tmp_path):
    ref = torch_vae(blocks=(8, 8, 16, 16), layers=2, groups=4, scaling_factor=0.5)
    ref.save_pretrained(tmp_path)
    w = hub_shaped(tmp_path)
    assert any('.attentions.0.query.' in k for k in w) and not any('to_q' in k for k in w)
    assert 'scaling_factor' not in json.loads((tmp_path / 'config.json').read_text())
    vae = SDVAE.from_pretrained(tmp_path)
    assert vae.scaling_factor == 0.18215 and vae.config.downsample_factor == 8
    # diffusers itself reads the rewritten files (so the fixture is realistic) and agrees with the original
    ref2 = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = images((1, 32, 24, 3))
    assert np.allclose(reference(ref2, x)[0], reference(ref, x)[0])
    assert_parity(vae, ref, x)


# --- full size ---------------------------------------------------------------------------------------------

SD_VAE = dict(blocks=(128, 256, 512, 512), layers=2, groups=32)   # stabilityai/sd-vae-ft-mse's architecture


@pytest.mark.slow
def test_full_size(tmp_path):
    "SD-VAE architecture with random weights at 224 px: same parameter count, same moments and decoded image."
    torch.set_num_threads(2)
    ref = torch_vae(**SD_VAE)
    ref.save_pretrained(tmp_path)
    hub_shaped(tmp_path)
    vae = SDVAE.from_pretrained(tmp_path)
    n = sum(p.numel() for p in ref.parameters())
    assert vae.num_params == n == 83_653_863
    x = images((1, 224, 224, 3))
    mean_r, logvar_r, dec_r, _ = reference(ref, x)
    mean, logvar = vae.moments(x)
    assert mean.shape == (1, 28, 28, 4)
    assert rel(mean, mean_r) < TOL and rel(logvar, logvar_r) < TOL
    dec = vae.decode(mean_r, clip=False)
    assert dec.shape == (1, 224, 224, 3) and rel(dec, dec_r) < TOL


# --- errors ------------------------------------------------------------------------------------------------

@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    return constants


def test_offline_flag(no_cache, monkeypatch):
    monkeypatch.setattr(no_cache, 'HF_HUB_OFFLINE', True)
    t = time.time()
    with pytest.raises(OSError, match=r"sd-vae-ft-mse.*SDVAE.from_pretrained\('DIR'\)"):
        SDVAE.from_pretrained(DEFAULT_VAE)
    assert time.time() - t < 10


def test_unreachable_hub(no_cache, monkeypatch):
    monkeypatch.setattr(no_cache, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(no_cache, 'ENDPOINT', 'http://127.0.0.1:9')   # nothing listens on the discard port
    t = time.time()
    with pytest.raises(OSError, match='no connection and no cached copy'):
        SDVAE.from_pretrained('someone/some-vae')
    assert time.time() - t < 10


def test_missing_dir():
    with pytest.raises(FileNotFoundError, match='no directory'):
        SDVAE.from_pretrained('./no/such/vae')


def test_wrong_kind(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'clip', 'architectures': ['CLIPModel']}))
    with pytest.raises(ValueError, match="AutoencoderKL config, found model_type='clip'"):
        SDVAE.from_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DModel', 'block_out_channels': [8]}))
    with pytest.raises(ValueError, match="found _class_name='UNet2DModel'"):
        SDVAE.from_pretrained(tmp_path)


def test_wrong_channels_and_weights(tmp_path):
    torch_vae(latent_channels=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='expected a VAE with 4 latent channels, found 8'):
        SDVAE.from_pretrained(tmp_path)
    assert SDVAE.from_pretrained(tmp_path, latent_channels=None).config.latent_channels == 8
    cfg = json.loads((tmp_path / 'config.json').read_text()) | {'latent_channels': 4}   # config and weights disagree
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='wrong shape'):
        SDVAE.from_pretrained(tmp_path)
    (tmp_path / 'diffusion_pytorch_model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='safetensors'):
        SDVAE.from_pretrained(tmp_path)


def test_bad_images():
    vae = SDVAE.random(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4))
    x = images((1, 16, 16, 3))
    for bad, msg in [(x * 2, r'in \[-1, 1\]'), (x * np.nan, r'in \[-1, 1\]'), (x[0], 'NHWC'),
                     (x.transpose(0, 3, 1, 2), 'NCHW'), (x[..., :1], '3 channels'), (x[:, :15], 'multiples of 2'),
                     ((x > 0).astype(np.uint8), 'floating point')]:
        with pytest.raises((ValueError, TypeError), match=msg):
            vae.moments(bad)
    with pytest.raises(ValueError, match='4 channels'): vae.decode(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match='shapes differ'): vae.sample(None, np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match='dtype'): SDVAE(vae.config, vae.params, dtype='int8')


@pytest.mark.parametrize('name', ['two-blocks', 'one-block-bare'])
def test_save_pretrained_loads_in_diffusers(tmp_path, name):
    "A Flax VAE written by `SDVAE.save_pretrained` is read by diffusers' own loader and computes the same thing there."
    kw, xshape, _ = CONFIGS[name]
    ref = torch_vae(**kw)
    ref.save_pretrained(tmp_path / 'a')
    vae = SDVAE.from_pretrained(tmp_path / 'a', latent_channels=None)
    vae.save_pretrained(tmp_path / 'b')
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / 'b').eval()
    for k in ('block_out_channels', 'layers_per_block', 'latent_channels', 'norm_num_groups', 'scaling_factor',
              'use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention'):
        assert np.array_equal(back.config[k], ref.config[k]), k
    assert_parity(vae, back, images(xshape))
    with pytest.raises(FileExistsError, match='exists'): vae.save_pretrained(tmp_path / 'b')


def test_glyph_vae_folder_is_a_diffusers_autoencoder(tmp_path):
    "The glyph demo's VAE, trained for a few steps, is a folder diffusers loads, with the scaling it recorded."
    from fsdit.glyph.vae import GlyphVAESpec, glyph_vae
    v = glyph_vae(tmp_path / 'vae', 'AB', GlyphVAESpec(blocks=(8, 16), groups=4), per_class=4, steps=2, batch_size=8)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / 'vae').eval()
    assert back.config.scaling_factor == pytest.approx(v.scaling_factor) and back.config.sample_size == 24
    assert_parity(v, back, images((2, 24, 24, 3)))
