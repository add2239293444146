# %% [markdown]
# # Codecs
#
# > How a run sees images: the support encoder that embeds them and the VAE (or pixel space) that encodes and decodes them — SigLIP2 and the SD-VAE, or the offline stand-ins — chosen by the names a feature store records.

# %%
#| default_exp codecs

# %%
#| export
from __future__ import annotations
import functools, re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import jax.numpy as jnp

from fsdit.config import model_config
from fsdit.sampler import Guide
from fsdit.utils import l2_normalize
from fsdit.encoder import SigLIPEncoder
from fsdit.features import open_store
from fsdit.vae import DEFAULT_VAE, SDVAE

# %%
import contextlib, io, types, tempfile as _tf
from fastcore.test import test_eq, test_close, test_fail
from fsdit.data import EpisodeBatches, encode_images, host_batch, list_classes, list_images, load_image, online_batch, prepare
from fsdit.glyph.data import glyph_name, make_offline_dataset, offline_split_sizes

_root = Path(_tf.mkdtemp())


# %% [markdown]
# ## Stand-in encoders for the offline dataset
#
# **The stand-in support encoder is not SigLIP2.** It is a fixed random projection (Gaussian, seeded)
# of the image downsampled to `grid x grid` gray pixels, centred and scaled to unit norm, then
# L2-normalised: it sees shapes and positions, no semantics. It makes the whole chain run offline with
# the same code paths; numbers measured with it say nothing about SigLIP2 features. `PixelSpace` is
# the pixel-space "VAE": the image itself (resized to `size`) is the posterior mean with log-variance
# -30, so the posterior sample is the image and training, sampling and the store need no second path.

# %%
#| export
@dataclass(frozen=True)
class PixelEncoder:
    "Stand-in support encoder (NOT SigLIP2): seeded random projection of normalised downsampled pixels."
    dim: int = 64
    grid: int = 8
    seed: int = 0

    @property
    def name(self) -> str: return f"stand-in/pixel-randproj-g{self.grid}-d{self.dim}-s{self.seed}"

    @property
    def matrix(self) -> np.ndarray:                                   # (grid*grid, dim)
        return np.random.RandomState(self.seed).randn(self.grid ** 2, self.dim).astype(np.float32)

    def embed(self, images):
        "images (B, H, W, C) in [-1, 1] -> (B, dim) L2-normalised."
        import jax, jax.numpy as jnp
        x = jnp.asarray(images, jnp.float32).mean(-1)                  # (B, H, W) gray
        x = jax.image.resize(x, (x.shape[0], self.grid, self.grid), 'linear', antialias=True).reshape(x.shape[0], -1)
        x = l2_normalize(x - x.mean(-1, keepdims=True), eps=1e-6)
        return l2_normalize(x @ jnp.asarray(self.matrix), eps=1e-6)

    @property
    def embed_fn(self) -> tuple[Callable, None]:
        "`(fn, None)` with `fn(None, images) == embed(images)`: traceable (encoder guidance); no weights."
        return _pixel_embed_fn(self), None


@functools.lru_cache(maxsize=8)
def _pixel_embed_fn(enc: PixelEncoder) -> Callable:
    return lambda p, x: enc.embed(x)


@dataclass(frozen=True)
class PixelSpace:
    "Pixel-space stand-in for the VAE: mean = the image resized to `size`, logvar = -30."
    size: int = 32
    channels: int = 3

    @property
    def name(self) -> str: return f"pixel-{self.size}x{self.channels}"

    @property
    def scaling_factor(self) -> float: return 1.0                    # the images are the model's space

    def moments(self, images):
        "images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, size, size, channels)."
        import jax, jax.numpy as jnp
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (self.size, self.size):
            x = jax.image.resize(x, (x.shape[0], self.size, self.size, x.shape[-1]), 'linear', antialias=True)
        if self.channels == 1: x = x.mean(-1, keepdims=True)
        return x, jnp.full_like(x, -30.0)


# %% [markdown]
# On a few glyphs: unit-norm embeddings, the image and its mirror stored as their own posterior, the same
# embedding every time, and the batch computed online from the files equal to the batch gathered from a
# store of the same encoders:

# %%
pe, ps = PixelEncoder(dim=16), PixelSpace(size=16)
make_offline_dataset(_root / 'glyphs', per_class=6, size=16, chars='0123λ€')
prepare(_root / 'glyphs', _root / 'split', **offline_split_sizes(6), seed=0)
imgs = np.stack([load_image(p, 16) for p in list_images(_root / 'glyphs' / glyph_name('0'))])
e, mo = encode_images(imgs, pe.embed, ps.moments)
test_eq((e.shape, e.dtype, mo.shape), ((6, 16), np.float16, (6, 2, 2, 16, 16, 3)))
test_close(np.linalg.norm(e.astype(np.float32), axis=-1), 1, eps=1e-2)
test_close(mo[:, 0, 0], imgs / 127.5 - 1, eps=1e-2); test_close(mo[:, 1, 0], imgs[:, :, ::-1] / 127.5 - 1, eps=1e-2)
test_eq((float(mo[0, 0, 1].max()), ps.scaling_factor), (-30.0, 1.0))
test_close(np.asarray(pe.embed(imgs / 127.5 - 1)), np.asarray(pe.embed(imgs / 127.5 - 1)))   # deterministic
_paths = [p for c in list_classes(_root / 'split' / 'train') for p in list_images(_root / 'split' / 'train' / c)]
_idx = next(EpisodeBatches([np.arange(6) + 6 * c for c in range(4)], 8, seed=0))
_E, _M = encode_images(np.stack([load_image(p, 16) for p in _paths]), pe.embed, ps.moments)
ob, sb = online_batch(_paths, _idx, pe.embed, ps.moments, 16), host_batch(_E, _M, _idx)
for k in sb: test_close(ob[k].astype(np.float32), sb[k].astype(np.float32), eps=2e-3)


# %% [markdown]
# A pixel-space model for the offline data: 32x32x3 images, patch 4 (64 tokens), the stand-in's width.

# %%
#| export
def offline_model_config(preset: str = 'mu', size: int = 32, channels: int = 3, embed_dim: int = 64, **overrides):
    "A `ModelConfig` for the pixel-space offline dataset (`PixelSpace(size, channels)`, `PixelEncoder(embed_dim)`)."
    return model_config(preset, **{'input_size': size, 'in_channels': channels, 'patch': 4,
                                   'support_dim': embed_dim, **overrides})


# %%
c = offline_model_config(); test_eq((c.input_size, c.in_channels, c.tokens, c.support_dim), (32, 3, 64, 64))
test_eq(offline_model_config(patch=2).tokens, 256)

# %% [markdown]
# ## The run's codecs
#
# Supports are encoded as the training data was: the support encoder of the feature store (SigLIP2 for
# real runs; for the offline dataset the pixel stand-in `PixelEncoder`, which is *not* SigLIP2) and the VAE
# (the identity `PixelSpace` in pixel mode), which also decodes the samples. Which ones is read from the
# store's `metadata.json` — the run's `config.json` when it names the store (`feats`), or `--feats` — and,
# without a store, from the run: pixel runs use the stand-ins of the model's shape, latent runs SigLIP2
# and the SD-VAE (hub ids or local folders, overridable). A run here is anything with `.mc` (its
# `ModelConfig`), `.space` and `.config` (its saved `config.json`), such as `fsdit.supports.Run`.
#
# `Codecs.encode` turns uint8 support images into what the sampler is conditioned on: their embeddings
# and posterior-mean latents (unscaled, as the store holds them).

# %%
#| export
DEFAULT_ENCODER = 'google/siglip2-base-patch16-224'


@dataclass
class Codecs:
    "How a run sees images: embed (N,H,W,3)->(N,D) unit rows; moments -> (mean, logvar); decode latents -> [-1, 1]."
    embed: Callable
    moments: Callable
    decode: Callable
    image_size: int
    names: dict
    guide: Guide | None = None       # the encoder after the decoder, traceable: what encoder guidance differentiates

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        "Support embeddings (K, D) and posterior-mean latents (K, h, w, c) of uint8 images (K, H, W, 3)."
        x = np.asarray(images, np.float32) / 127.5 - 1
        return np.asarray(self.embed(x), np.float32), np.asarray(self.moments(x)[0], np.float32)


def stand_in_encoder(name: str) -> PixelEncoder:
    "The `PixelEncoder` whose `name` is `name` (the store records only the name)."
    m = re.fullmatch(r'stand-in/pixel-randproj-g(\d+)-d(\d+)-s(\d+)', name)
    if not m: raise ValueError(f"unknown stand-in encoder {name!r}: expected a name like 'stand-in/pixel-randproj-g8-d64-s0'")
    enc = PixelEncoder(dim=int(m[2]), grid=int(m[1]), seed=int(m[3]))
    assert enc.name == name
    return enc


def load_encoder(name: str):
    "The support encoder a store names: a stand-in rebuilt from its name, a glyph encoder folder, else SigLIP(2) from a hub id or folder."
    if name.startswith('stand-in/'): return stand_in_encoder(name)
    from fsdit.glyph.encoder import GlyphEncoder, is_glyph_encoder     # the glyph demo's encoder: loaded only when asked for
    if is_glyph_encoder(name): return GlyphEncoder.from_pretrained(name)
    return SigLIPEncoder.from_pretrained(name)


# %%
test_eq(stand_in_encoder(PixelEncoder(dim=16, grid=4, seed=2).name), PixelEncoder(dim=16, grid=4, seed=2))
test_eq(load_encoder('stand-in/pixel-randproj-g8-d64-s0'), PixelEncoder())
test_fail(lambda: stand_in_encoder('stand-in/other'), contains='unknown stand-in encoder')


# %%
#| export
def store_meta(run=None, feats=None) -> dict | None:
    "The feature store's metadata for a run: from `feats`, else from the store its config.json names (a damaged store is refused)."
    path = feats or (run.config.get('feats') if run is not None else None)
    if path is None or not (Path(path) / 'metadata.json').exists(): return None
    return open_store(path).meta


def run_codecs(run, feats=None, encoder: str | None = None, vae: str | None = None) -> Codecs:
    "The support encoder and VAE (or pixel identity) that made the run's training data."
    mc, meta = run.mc, store_meta(run, feats) or {}
    enc_name, vae_name = encoder or meta.get('encoder'), vae or meta.get('vae')
    if run.space == 'pixel':
        enc = load_encoder(enc_name) if enc_name else PixelEncoder(dim=mc.support_dim)
        space = PixelSpace(size=mc.input_size, channels=mc.in_channels)
        size = int(meta.get('image_size', mc.input_size))
        return Codecs(enc.embed, space.moments, lambda z: np.asarray(z), size, {'encoder': enc.name, 'vae': space.name},
                      encoder_guide(enc))
    enc_name, vae_name = enc_name or DEFAULT_ENCODER, vae_name or DEFAULT_VAE
    enc = load_encoder(enc_name)
    v = SDVAE.from_pretrained(vae_name)
    return Codecs(enc.embed, v.moments, v.decode, int(meta.get('image_size', 224)), {'encoder': enc_name, 'vae': vae_name},
                  encoder_guide(enc, v))


def encoder_guide(encoder, vae: SDVAE | None = None) -> Guide:
    "The encoder after the VAE's decoder (pixel space: after clipping to [-1, 1]) as a traceable `fsdit.sampler.Guide`."
    fn, params = encoder.embed_fn
    return Guide(_guide_fn(fn, None if vae is None else vae._decode), (params, None if vae is None else vae.params))


@functools.lru_cache(maxsize=8)
def _guide_fn(embed: Callable, decode: Callable | None) -> Callable:
    if decode is None: return lambda p, z: embed(p[0], jnp.clip(z, -1, 1))
    return lambda p, z: embed(p[0], jnp.clip(decode(p[1], z), -1, 1))


# %% [markdown]
# A pixel-space run without a store gets the stand-ins of its model's shape; one whose config names a
# store gets that store's encoder and image size. `encode` gives one embedding and one latent per support:

# %%
_mc = offline_model_config('mu', size=16, channels=3, embed_dim=16)
_run = types.SimpleNamespace(mc=_mc, space='pixel', config={})
c0 = run_codecs(_run)
test_eq((c0.names, c0.image_size), ({'encoder': PixelEncoder(dim=16).name, 'vae': 'pixel-16x3'}, 16))
_emb, _lat = c0.encode(imgs[:3])
test_eq((_emb.shape, _lat.shape), ((3, 16), (3, 16, 16, 3))); test_close(_lat, imgs[:3] / 127.5 - 1, eps=1e-5)
test_close(np.linalg.norm(_emb, axis=-1), 1, eps=1e-5)
test_eq(store_meta(_run), None)

# %% [markdown]
# ## Command line
#
# `fsdit precompute --data SPLIT --out FEATS` loads SigLIP2 and the SD-VAE (hub ids or local folders) and
# runs `fsdit.features.precompute`; `--stand-in` uses the offline stand-ins instead (pixel space,
# `PixelEncoder` — not SigLIP2). The command is `fsdit.commands.precompute`; it is run here, on the codecs it chooses
# between. A run whose `config.json` names the store then gets the same codecs back from `run_codecs`.

# %%
from fsdit.commands.precompute import precompute_cli
with contextlib.redirect_stdout(io.StringIO()) as o, contextlib.redirect_stderr(io.StringIO()):
    test_eq(precompute_cli(['--data', str(_root / 'split'), '--out', str(_root / 'feats3'), '--stand-in', '--image-size', '16',
                            '--embed-dim', '8', '--chunk-size', '7']), 0)
st3 = open_store(_root / 'feats3', {'space': 'pixel', 'image_size': 16})
test_eq((st3.embeds.shape, st3.moments.shape), ((36, 8), (36, 2, 2, 16, 16, 3)))
assert '36 images' in o.getvalue(); test_eq(st3.latent_scale, 1.0)
c3 = run_codecs(types.SimpleNamespace(mc=offline_model_config('mu', size=16, embed_dim=8), space='pixel',
                                      config={'feats': str(_root / 'feats3')}))
test_eq((c3.names['encoder'], c3.image_size), (st3.meta['encoder'], 16))
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(precompute_cli(['--data', str(_root / 'nothing'), '--out', str(_root / 'feats4'), '--stand-in']), 1)
assert err.getvalue().startswith('fsdit precompute: no images under')

# %% [markdown]
# `--encoder FOLDER` with `--stand-in` embeds with a saved glyph encoder (`fsdit.glyph.encoder`), as a user
# points `--encoder` at a local SigLIP2 folder; the store records the folder, and a run's codecs load it back:

# %%
from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderSpec, GlyphEncoderNet
import jax
_gs = GlyphEncoderSpec(embed_dim=8)
_gdir = GlyphEncoder(_gs, GlyphEncoderNet(_gs).init(jax.random.PRNGKey(0), np.zeros((1, 24, 24, 3)))['params']).save_pretrained(_root / 'genc')
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    test_eq(precompute_cli(['--data', str(_root / 'split'), '--out', str(_root / 'feats5'), '--stand-in', '--image-size', '16',
                            '--encoder', str(_gdir)]), 0)
st5 = open_store(_root / 'feats5')
test_eq((st5.meta['encoder'], st5.embeds.shape), (str(_gdir), (36, 8)))
c5 = run_codecs(types.SimpleNamespace(mc=offline_model_config('mu', size=16, embed_dim=8), space='pixel',
                                      config={'feats': str(_root / 'feats5')}))
_im = np.asarray(st5.moments[:3, 0, 0], np.float32)
test_close(np.asarray(c5.embed(_im)), np.asarray(st5.embeds[:3], np.float32), eps=2e-3)   # float16 store
test_eq(type(load_encoder(str(_gdir))).__name__, 'GlyphEncoder')

# %% [markdown]
# Each run's codecs carry its `guide`: the encoder after the decoder, with their weights as an argument, so that
# encoder guidance (`fsdit.sampler`) can differentiate through both. It is `embed(decode(z))` exactly:

# %%
for _c in (c0, c5):
    _z = np.asarray(st5.moments[:3, 0, 0], np.float32) if _c is c5 else _lat
    test_close(np.asarray(_c.guide.fn(_c.guide.params, jnp.asarray(_z))), np.asarray(_c.embed(np.clip(_c.decode(_z), -1, 1))), eps=1e-5)
