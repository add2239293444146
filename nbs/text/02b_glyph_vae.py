# %% [markdown]
# # Glyph VAE
#
# > A stand-in for the SD-VAE on glyphs: a small diffusers-shaped `AutoencoderKL` trained on its own renderings of the classes, frozen, saved as the folder `fsdit precompute --vae FOLDER` loads — so the demo's DiT works on latents, as a miniImageNet run does.

# %%
#| default_exp glyph.vae

# %%
#| export
from __future__ import annotations
import json, time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable

import numpy as np
import jax, jax.numpy as jnp
import optax

from fsdit.vae import VAEConfig, AutoencoderKL, SDVAE, FILES
from fsdit.glyph.data import render_set

# %%
import tempfile as _tf
from fastcore.test import test_eq, test_close, test_fail
from fsdit.testing import raises


# %% [markdown]
# ## Why a VAE for glyphs
#
# On miniImageNet the DiT never sees pixels: it models SD-VAE latents, in which a 224 px photograph is a 28x28
# grid of 4 numbers, and the VAE's decoder draws the textures and colours. The unaligned glyph demo in pixel
# space asked the DiT for all of that itself — 24x24 RGB values whose three channels must agree, with a random
# ink and paper colour on top — and it drew scattered coloured fragments (BENCHMARKS §8: the factors of the
# unaligned problem). This autoencoder plays the SD-VAE's part on glyphs: a diffusers `AutoencoderKL`
# (the same Flax module and the same folder format as the SD-VAE, so the same loading code runs), trained once
# on a **separate rendering** of every class (its own seed; no image of the dataset is one it saw) with an L1
# reconstruction and a small KL term, as SD's first stage was trained (without its perceptual and adversarial
# terms), then frozen.
#
# Its `scaling_factor` is set as SD's was: one over the standard deviation of the posterior means on its
# training renderings, so the DiT models latents of unit variance.

# %%
#| export
@dataclass(frozen=True)
class GlyphVAESpec:
    "The autoencoder's shape: diffusers `AutoencoderKL` blocks (one stride-2 step between two), latent channels."
    image_size: int = 24
    blocks: tuple = (32, 64)           # f = 2: a 24 px image is a 12x12 grid of latents
    latent_channels: int = 4
    groups: int = 16

    def config(self, scaling_factor: float = 1.0) -> VAEConfig:
        return VAEConfig(block_out_channels=tuple(self.blocks), layers_per_block=1, latent_channels=self.latent_channels,
                         norm_num_groups=self.groups, scaling_factor=scaling_factor)


# %% [markdown]
# ## Training
#
# Each step encodes a batch, draws a posterior sample (so the decoder learns to read latents that are not
# exactly an encoder's output, as the DiT's will not be), decodes it and takes
# `L1(image, decoded) + beta * KL(posterior || N(0, 1))`, both averaged per value. The held-out L1 is measured
# on a further rendering (another seed).

# %%
#| export
def _vae_loss(module, params, x, key, beta: float):
    mean, logvar = module.apply({'params': params}, x, method=module.moments)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = jnp.abs(module.apply({'params': params}, z, method=module.decode) - x).mean()
    kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1 - logvar).mean()
    return rec + beta * kl, (rec, kl)


def train_vae(X: np.ndarray, held: np.ndarray, spec: GlyphVAESpec = GlyphVAESpec(), steps: int = 1500, batch_size: int = 64,
              lr: float = 1e-3, beta: float = 1e-4, seed: int = 2027, log: Callable | None = None,
              info: dict | None = None) -> SDVAE:
    """Train the autoencoder on images `X (N, H, W, 3)` in [-1, 1] (L1 + `beta` KL on posterior samples); frozen `SDVAE`
    whose scaling factor is one over the latents' std, with `info` and its L1 on the held-out images `held`."""
    t0 = time.time()
    X, held = np.asarray(X, np.float32), np.asarray(held, np.float32)
    if X.ndim != 4 or X.shape[1:] != held.shape[1:] or not len(held):
        raise ValueError(f"train_vae takes images (N, H, W, 3) and held-out images of the same size, got {X.shape} and {held.shape}")
    module, key = AutoencoderKL(spec.config()), jax.random.PRNGKey(seed)
    params = module.init(key, X[:1])['params']
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps), weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, key):
        (_, aux), g = jax.value_and_grad(lambda p: _vae_loss(module, p, x, key, beta), has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, aux

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.choice(len(X), min(batch_size, len(X)), replace=False)
        params, opt, (rec, kl) = step(params, opt, X[idx], jax.random.fold_in(key, i))
        if log and (i + 1) % max(1, steps // 10) == 0:
            log(f"glyph VAE step {i + 1}/{steps}: L1 {float(rec):.4f}, KL {float(kl):.2f}")
    moments = jax.jit(lambda p, x: module.apply({'params': p}, x, method=module.moments)[0])
    std = float(np.std(np.concatenate([np.asarray(moments(params, X[i:i + 512])) for i in range(0, len(X), 512)])))
    vae = SDVAE(spec.config(round(1.0 / std, 5)), jax.device_get(params), name='glyph-vae')
    l1 = float(np.mean([np.abs(np.asarray(vae.decode(vae.moments(held[i:i + 256])[0])) - held[i:i + 256]).mean()
                        for i in range(0, len(held), 256)]))
    vae.info = dict(info or {}, spec=asdict(spec), steps=steps, batch_size=batch_size, lr=lr, beta=beta, seed=seed,
                    heldout_l1=round(l1, 5), seconds=round(time.time() - t0, 1))
    return vae


def train_glyph_vae(chars: str, spec: GlyphVAESpec = GlyphVAESpec(), per_class: int = 12, steps: int = 1500,
                    batch_size: int = 64, lr: float = 1e-3, beta: float = 1e-4, seed: int = 2027,
                    log: Callable | None = None) -> SDVAE:
    "`train_vae` on `per_class` unaligned renderings of each of `chars` (its own seed), held out on another seed's."
    X, held = render_set(chars, per_class, spec.image_size, seed)[0], render_set(chars[:200], 4, spec.image_size, seed + 1)[0]
    return train_vae(X, held, spec, steps, batch_size, lr, beta, seed, log, dict(chars=chars, per_class=per_class))


# %% [markdown]
# ## Kept in a folder
#
# `glyph_vae(folder, ...)` returns the autoencoder saved in `folder` when it was trained with these settings,
# else trains one and saves it: the diffusers files (`SDVAE.save_pretrained`, whole or not at all) and
# `glyph_vae.json` with the settings and the held-out L1, written last, so a folder without it is retrained.

# %%
#| export
INFO = 'glyph_vae.json'


def glyph_vae(folder, chars: str, spec: GlyphVAESpec = GlyphVAESpec(), log: Callable | None = None, **train_kw) -> SDVAE:
    "The glyph VAE in `folder` when trained with these settings, else a new one trained and saved there."
    folder = Path(folder)
    want = dict(chars=chars, spec=json.loads(json.dumps(asdict(spec))), **train_kw)
    if (folder / INFO).exists():
        info = json.loads((folder / INFO).read_text())
        if all(info.get(k) == v for k, v in want.items()):
            vae = SDVAE.from_pretrained(folder, latent_channels=None); vae.info = info
            if log: log(f"vae:     {folder}  (held-out L1 {info['heldout_l1']:.3f}; reused)")
            return vae
    vae = train_glyph_vae(chars, spec, log=log, **train_kw)
    vae.save_pretrained(folder, sample_size=spec.image_size, replace=True)
    (folder / INFO).write_text(json.dumps(vae.info, indent=1))
    if log: log(f"vae:     {folder}  (an autoencoder trained on its own renderings of {len(chars)} classes; "
                f"held-out L1 {vae.info['heldout_l1']:.3f}; {vae.info['seconds']:.0f} s)")
    saved = SDVAE.from_pretrained(folder, latent_channels=None)      # named by its folder, as the store records it
    saved.info = vae.info
    return saved


# %% [markdown]
# A tiny one, trained for a few steps on three characters: the folder is a diffusers `AutoencoderKL` that
# `SDVAE.from_pretrained` reads back with the same weights and the recorded scaling, the latents of a 24 px
# image are a 12x12 grid, and a second call with the same settings reuses it.

# %%
with _tf.TemporaryDirectory() as d:
    tiny = GlyphVAESpec(blocks=(8, 16), latent_channels=4, groups=4)
    v = glyph_vae(Path(d) / 'vae', 'AB1', tiny, per_class=4, steps=3, batch_size=8)
    test_eq(sorted(p.name for p in (Path(d) / 'vae').iterdir()), sorted([*FILES, INFO]))
    test_eq(v.config.downsample_factor, 2); test_eq(v.config.latent_channels, 4)
    x = render_set('AB', 2, 24, 0)[0]
    m, _ = v.moments(x)
    test_eq(m.shape, (4, 12, 12, 4))
    assert 0 < v.scaling_factor and np.isfinite(v.scaling_factor)
    test_eq(v.decode(m).shape, x.shape)
    info = json.loads((Path(d) / 'vae' / INFO).read_text())
    test_eq((info['steps'], info['chars']), (3, 'AB1'))
    mtime = (Path(d) / 'vae' / FILES[1]).stat().st_mtime_ns
    v2 = glyph_vae(Path(d) / 'vae', 'AB1', tiny, per_class=4, steps=3, batch_size=8)
    test_eq((Path(d) / 'vae' / FILES[1]).stat().st_mtime_ns, mtime)       # reused, not retrained
    test_close(np.asarray(v2.moments(x)[0]), np.asarray(m), eps=1e-5)
test_fail(lambda: train_vae(np.zeros((4, 24, 24, 3)), np.zeros((2, 16, 16, 3))), contains='held-out images of the same size')
