# %% [markdown]
# # Glyph encoder
#
# > A stand-in for SigLIP2 that knows the glyph classes as SigLIP2 knows ImageNet's: a small Flax image tower trained on its own renderings, frozen, saved as a folder (safetensors + config) that `fsdit precompute --encoder FOLDER` loads.

# %%
#| default_exp glyph.encoder

# %%
#| export
from __future__ import annotations
import functools, json, time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
import optax

from fsdit.utils import l2_normalize
from fsdit.files import building, flat_params, unflat_params
from fsdit.glyph.data import render_set

# %%
import tempfile as _tf
from fastcore.test import test_eq, test_close, test_fail
from fsdit.testing import raises


# %% [markdown]
# ## Why a second encoder
#
# On miniImageNet the class reaches the model through SigLIP2, a frozen tower trained on web images that
# include miniImageNet's classes but never the dataset's own files. The offline demo's random projection of
# pixels knows nothing about characters, so a conditioning that reads it cannot be judged by what it does
# with SigLIP2. This encoder plays SigLIP2's part on glyphs: it is trained once, on a **separate rendering**
# of every class (its own seed, so no image of the dataset is one it saw), in the unaligned style (anywhere in
# the frame, any size, angle and colours), then frozen.
#
# It is deliberately not the judge: the judge is a strided CNN on gray images with a linear classifier
# trained by cross-entropy; this tower reads RGB, standardises each image, keeps a 6x6 grid of patch tokens,
# maps the whole grid to a normalised embedding and is trained with a metric objective on its own renderings
# (below) — so the verdict of one is not the training target of the other.
#
# Like `fsdit.encoder.SigLIPEncoder` it returns patch tokens `(N, T, D)` and a pooled vector, and `embed`
# gives the L2-normalised pooled embedding the feature store keeps.

# %%
#| export
@dataclass(frozen=True)
class GlyphEncoderSpec:
    "The tower's shape and input."
    image_size: int = 24
    widths: tuple = (32, 48, 96, 96)   # 3x3 convolutions; the first and the third halve the grid (24 -> 6x6 = 36 tokens)
    dim: int = 96                      # token width
    embed_dim: int = 64                # pooled embedding width

    @property
    def tokens(self) -> int: return (self.image_size // 4) ** 2


class GlyphEncoderNet(nn.Module):
    "RGB images `(B, H, W, 3)` in [-1, 1] -> patch tokens `(B, T, dim)` and the pooled vector `(B, embed_dim)` (not normalised)."
    spec: GlyphEncoderSpec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        # each image standardised over its pixels: the paper's colour and the contrast carry no class
        x = (x - x.mean((1, 2, 3), keepdims=True)) / (x.std((1, 2, 3), keepdims=True) + 1e-3)
        for i, w in enumerate(s.widths):
            x = nn.gelu(nn.Conv(w, (3, 3), (2, 2) if i in (0, 2) else (1, 1))(x))   # (B, 6, 6, w) after the last
        tok = nn.Dense(s.dim)(x).reshape(x.shape[0], -1, s.dim)              # (B, T, D)
        # pooled from the whole token grid at once: attention or mean pooling over these local tokens learned
        # several times slower from scratch (measured; a SigLIP-size tower would first mix them in a transformer)
        pooled = nn.Dense(s.dim)(tok.reshape(tok.shape[0], -1))               # (B, D)
        pooled = pooled + nn.Dense(s.dim)(nn.gelu(nn.Dense(2 * s.dim)(nn.LayerNorm()(pooled))))
        return tok, nn.Dense(s.embed_dim)(nn.LayerNorm()(pooled))            # (B, T, D), (B, E)


@functools.lru_cache(maxsize=8)
def _apply(spec: GlyphEncoderSpec):
    net = GlyphEncoderNet(spec)
    return jax.jit(lambda p, x: net.apply({'params': p}, x))


# %% [markdown]
# A fresh tower maps a batch of images to 36 tokens of width 96 and a 64-wide pooled vector:

# %%
_spec = GlyphEncoderSpec()
_x = jnp.zeros((2, 24, 24, 3))
_p = GlyphEncoderNet(_spec).init(jax.random.PRNGKey(0), _x)['params']
_tok, _pool = _apply(_spec)(_p, _x)
test_eq((_tok.shape, _pool.shape), ((2, _spec.tokens, 96), (2, 64)))
test_eq(_spec.tokens, 36)


# %% [markdown]
# ## The frozen encoder
#
# `GlyphEncoder` has the interface of `SigLIPEncoder`: call it for `(tokens, pooled)`, `embed` for the
# L2-normalised pooled embedding, `name` for what the feature store records (the folder it was loaded
# from), `save_pretrained` and `from_pretrained` for a folder of `model.safetensors` and `config.json`. The
# config's `model_type` says what the folder holds, so `fsdit.codecs.load_encoder` tells it from a
# SigLIP folder. Images of another size are resized (antialiased) to the tower's.

# %%
#| export
@functools.lru_cache(maxsize=8)
def _embed_fn(spec: GlyphEncoderSpec) -> Callable:
    resize = GlyphEncoder(spec, None)._input
    return lambda p, x: l2_normalize(_apply(spec)(p, resize(x))[1], eps=1e-6)


GLYPH_ENCODER_TYPE = 'fsdit-glyph-encoder'


@dataclass
class GlyphEncoder:
    "A frozen `GlyphEncoderNet`: `(tokens, pooled) = enc(images)`, `enc.embed(images)` unit rows; images (N, H, W, 3) in [-1, 1]."
    spec: GlyphEncoderSpec
    params: Any
    name: str = 'random'
    info: dict | None = None        # how it was trained and what it scores (config.json's 'trained')

    @property
    def dim(self) -> int: return self.spec.embed_dim

    @property
    def image_size(self) -> int: return self.spec.image_size

    def _input(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"the glyph encoder takes images (N, H, W, 3) in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[-1] == 1: x = jnp.repeat(x, 3, -1)
        s = self.spec.image_size
        if x.shape[1:3] != (s, s): x = jax.image.resize(x, (x.shape[0], s, s, 3), 'linear', antialias=True)
        return x

    def __call__(self, images):
        "Patch tokens (N, T, D) and the pooled vector (N, E), float32."
        return _apply(self.spec)(self.params, self._input(images))

    def embed(self, images):
        "The L2-normalised pooled embedding (N, E): what the feature store keeps."
        return l2_normalize(self(images)[1], eps=1e-6)

    @property
    def embed_fn(self) -> tuple[Callable, Any]:
        "`(fn, params)` with `fn(params, images) == embed(images)`, the weights an argument: traceable (encoder guidance)."
        return _embed_fn(self.spec), self.params

    def save_pretrained(self, folder) -> Path:
        "Write `folder/model.safetensors` and `folder/config.json` atomically (no pickle)."
        from safetensors.numpy import save_file
        folder = Path(folder)
        with building(folder, replace=True) as tmp:
            save_file({k: np.asarray(v, np.float32) for k, v in flat_params(self.params).items()}, str(tmp / 'model.safetensors'))
            cfg = {'model_type': GLYPH_ENCODER_TYPE, **asdict(self.spec), 'trained': self.info or {}}
            (tmp / 'config.json').write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
        return folder

    @classmethod
    def from_pretrained(cls, folder) -> GlyphEncoder:
        "The encoder saved in `folder`; a folder that holds something else is an error that says so."
        from safetensors.numpy import load_file
        folder = Path(folder)
        if not is_glyph_encoder(folder):
            raise ValueError(f"{folder} holds no glyph encoder (config.json with model_type {GLYPH_ENCODER_TYPE!r}); "
                             "make one with fsdit.glyph.encoder.train_glyph_encoder or `fsdit demo --data unaligned`")
        cfg = json.loads((folder / 'config.json').read_text())
        info = cfg.pop('trained', {}); cfg.pop('model_type')
        spec = GlyphEncoderSpec(**{**cfg, 'widths': tuple(cfg['widths'])})
        return cls(spec, jax.tree.map(jnp.asarray, unflat_params(load_file(str(folder / 'model.safetensors')))), str(folder), info)


# %% [markdown]
# Gray images and images of another size are taken as well (repeated to RGB, resized to the tower's):

# %%
_enc0 = GlyphEncoder(_spec, _p)
_tk, _pl = _enc0(np.zeros((2, 32, 32, 1), np.float32))
test_eq((_tk.shape, _pl.shape, _enc0.dim, _enc0.image_size), ((2, 36, 96), (2, 64), 64, 24))
raises(lambda: _enc0(np.zeros((2, 24, 24, 4))), 'takes images (N, H, W, 3)')


# %% [markdown]
# A folder is recognised by its config's `model_type`:

# %%
#| export
def is_glyph_encoder(folder) -> bool:
    "Whether `folder` holds a saved `GlyphEncoder` (its config.json names the type)."
    p = Path(folder) / 'config.json'
    try: return Path(folder).is_dir() and json.loads(p.read_text()).get('model_type') == GLYPH_ENCODER_TYPE
    except (OSError, ValueError): return False


# %% [markdown]
# A saved encoder loads back to the same embeddings, unit-norm; a folder without one is refused with a
# message:

# %%
_root = Path(_tf.mkdtemp())
_enc = GlyphEncoder(_spec, _p)
_xr = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 24, 24, 3)), jnp.float32)
_e = np.asarray(_enc.embed(_xr))
test_close(np.linalg.norm(_e, axis=1), 1.0, eps=1e-5)
_back = GlyphEncoder.from_pretrained(_enc.save_pretrained(_root / 'enc'))
test_close(np.asarray(_back.embed(_xr)), _e, eps=1e-6)
test_eq((_back.name, _back.dim), (str(_root / 'enc'), 64))
test_eq(np.asarray(_back.embed(jax.image.resize(_xr, (3, 48, 48, 3), 'linear'))).shape, (3, 64))   # resized to 24
_fn, _fp = _back.embed_fn                                             # the same embedding, weights as an argument
test_close(np.asarray(jax.jit(_fn)(_fp, _xr)), _e, eps=1e-6)
(_root / 'other').mkdir(); (_root / 'other' / 'config.json').write_text('{"model_type": "siglip"}')
raises(lambda: GlyphEncoder.from_pretrained(_root / 'other'), 'holds no glyph encoder')
assert not is_glyph_encoder(_root / 'missing')


# %% [markdown]
# ## Training it
#
# The objective is metric learning with class proxies (NormFace): each class has a learned unit vector, and
# an image's normalised embedding is classified by its cosine similarity to every proxy at temperature `tau`.
# Only the direction of an embedding matters, which is what nearest-prototype few-shot classification uses;
# the proxies are thrown away after training. (A prototypical-network loss over episodes of the batch was
# tried first: from scratch on these images it collapsed to one embedding for every image.) The images are
# rendered once, `per_class` per character, in the unaligned style from the encoder's own seed.
#
# `prototype_accuracy` measures what SigLIP2's few-shot quality measures: for each image of a set of
# classes, the nearest of the classes' 5-image prototypes (its own image left out of them).

# %%
#| export
def prototype_accuracy(enc, images, labels, shots: int = 5, seed: int = 0, batch_size: int = 512) -> float:
    """Nearest-prototype accuracy of `enc.embed` on images (N, H, W, 3) in [-1, 1]: each class's prototype is the mean of
    `shots` of its images drawn at random; every other image is classified among all the prototypes."""
    e = np.concatenate([np.asarray(enc.embed(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
    labels, r = np.asarray(labels), np.random.default_rng(seed)
    classes, protos, query = np.unique(labels), [], np.ones(len(labels), bool)
    for c in classes:
        pick = r.choice(np.flatnonzero(labels == c), shots, replace=False)
        protos.append(e[pick].mean(0)); query[pick] = False
    pred = classes[np.argmax(e[query] @ l2_normalize(np.stack(protos)).T, axis=1)]
    return float((pred == labels[query]).mean())


def _proxy_loss(net, params, x, y, tau: float):
    "Cross-entropy over cosine similarities to one learned unit proxy per class, at temperature `tau`."
    e = l2_normalize(net.apply({'params': params['net']}, x)[1], eps=1e-6)        # (B, E)
    logits = e @ l2_normalize(params['proxies'], eps=1e-6).T / tau               # (B, C)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _perturb(loss_fn, x, eps: float, steps: int):
    """`x` moved within an L2 ball of radius `eps` per image (and inside [-1, 1]) by `steps` of projected gradient ascent
    on `loss_fn(x)`: the adversarial examples of robust training (Madry et al.), without a gradient through the search."""
    x0, alpha = jax.lax.stop_gradient(x), 2.5 * eps / steps
    norm = lambda d: jnp.sqrt((d ** 2).sum((1, 2, 3), keepdims=True)) + 1e-12
    xa = x0
    for _ in range(steps):
        g = jax.grad(loss_fn)(xa)
        d = xa + alpha * g / norm(g) - x0
        xa = jnp.clip(x0 + d * jnp.minimum(1.0, eps / norm(d)), -1, 1)
    return jax.lax.stop_gradient(xa)


def train_encoder(X: np.ndarray, y: np.ndarray, spec: GlyphEncoderSpec = GlyphEncoderSpec(), steps: int = 2500,
                  batch_size: int = 128, lr: float = 2e-3, tau: float = 0.1, seed: int = 2026, log: Callable | None = None,
                  info: dict | None = None, adv_eps: float = 0.0, adv_steps: int = 2) -> GlyphEncoder:
    """Train a `GlyphEncoderNet` of `spec` with cosine proxies on images `X (N, H, W, 3)` in [-1, 1] of classes `y (N,)`
    (0..C-1); the proxies are dropped. Any labelled image set: the glyph renderings, or a real set's own drawings.
    `adv_eps > 0`: trained on adversarial examples within that L2 radius (`adv_steps` of projected gradient ascent; the
    radius grows from 0 over the first half of training, as a tower trained at the full radius from scratch stays at
    chance), so that its input gradients follow the shapes that make a class, which is what encoder guidance steps along."""
    t0 = time.time()
    X, y = np.asarray(X, np.float32), np.asarray(y)
    if X.ndim != 4 or len(X) != len(y) or not len(y):
        raise ValueError(f"train_encoder takes images (N, H, W, 3) and N labels, got {X.shape} and {y.shape}")
    if adv_eps < 0 or (adv_eps > 0 and adv_steps < 1):
        raise ValueError(f"adversarial training needs adv_eps >= 0 and, when adv_eps > 0, adv_steps >= 1; got {adv_eps} and "
                         f"{adv_steps} (adv_eps=0 trains on the images as they are)")
    net, key = GlyphEncoderNet(spec), jax.random.PRNGKey(seed)
    params = {'net': net.init(key, X[:1])['params'],
              'proxies': jax.random.normal(jax.random.fold_in(key, 1), (int(y.max()) + 1, spec.embed_dim))}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps), weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y, eps):
        if adv_eps > 0: x = _perturb(lambda xa: _proxy_loss(net, params, xa, y, tau), x, eps, adv_steps)
        loss, g = jax.value_and_grad(lambda p: _proxy_loss(net, p, x, y, tau))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.choice(len(X), min(batch_size, len(X)), replace=False)
        params, opt, loss = step(params, opt, X[idx], y[idx], jnp.float32(adv_eps * min(1.0, 2 * i / steps)))
        if log and (i + 1) % max(1, steps // 10) == 0: log(f"glyph encoder step {i + 1}/{steps}: loss {float(loss):.3f}")
    info = dict(info or {}, steps=steps, batch_size=batch_size, lr=lr, tau=tau, seed=seed, seconds=round(time.time() - t0, 1))
    if adv_eps > 0: info.update(adv_eps=adv_eps, adv_steps=adv_steps)
    return GlyphEncoder(spec, params['net'], 'trained', info)


def train_glyph_encoder(chars: str, spec: GlyphEncoderSpec = GlyphEncoderSpec(), per_class: int = 48, steps: int = 2500,
                        batch_size: int = 128, lr: float = 2e-3, tau: float = 0.1, seed: int = 2026,
                        log: Callable | None = None, adv_eps: float = 0.0, adv_steps: int = 2) -> GlyphEncoder:
    "`train_encoder` on `per_class` unaligned renderings of each of `chars` (its own seed)."
    X, y = render_set(chars, per_class, spec.image_size, seed)
    return train_encoder(X, y, spec, steps, batch_size, lr, tau, seed, log, dict(chars=chars, per_class=per_class),
                         adv_eps, adv_steps)


# %% [markdown]
# Eight characters, 250 steps: on fresh renderings (another seed) the trained tower's prototypes find the
# character far more often than the same tower untrained:

# %%
_chars = '0123ABCD'
_ge = train_glyph_encoder(_chars, per_class=64, steps=250, batch_size=64)
_Xq, _yq = render_set(_chars, 8, 24, seed=7)
_acc, _acc0 = prototype_accuracy(_ge, _Xq, _yq), prototype_accuracy(GlyphEncoder(_spec, _p), _Xq, _yq)
assert _acc > _acc0 + 0.15, (_acc, _acc0)                                     # chance: 1/8
test_eq((_ge.info['steps'], _ge.info['seed']), (250, 2026))
test_fail(lambda: train_encoder(np.zeros((3, 24, 24), np.float32), np.zeros(3, int)), contains='takes images (N, H, W, 3)')

# %% [markdown]
# Robust training. `_perturb` moves each image, within an L2 ball of radius `eps` and inside [-1, 1], the way that
# raises the loss most; training on those images makes a tower whose input gradient follows the strokes of a class
# rather than a pattern only it reads (robust classifiers' gradients look like the class; robust classifier guidance
# of diffusion models builds on that). Encoder guidance steps along that gradient, so the unaligned demo trains its
# encoder this way (`adv_eps=0.5`, chosen on validation classes; BENCHMARKS §8). A radius of 0.5 is a change of 0.012
# per value on average in a 24 x 24 x 3 image.

# %%
_Xa, _ya = render_set(_chars, 4, 24, seed=3)
_protos = l2_normalize(np.stack([np.asarray(_ge.embed(_Xa[_ya == c])).mean(0) for c in range(len(_chars))]))
_lossa = lambda x: -(_embed_fn(_spec)(_ge.params, x) * _protos[_ya]).sum()      # minus the cosine to the own class
_xa = _perturb(_lossa, jnp.asarray(_Xa), 0.5, 2)
_d = np.sqrt(((np.asarray(_xa) - _Xa) ** 2).sum((1, 2, 3)))
assert _d.max() <= 0.5 + 1e-4 and _d.min() > 0.1 and np.abs(np.asarray(_xa)).max() <= 1, _d
assert float(_lossa(_xa)) > float(_lossa(jnp.asarray(_Xa))) + 0.1                  # the search found worse images
_ra = train_glyph_encoder(_chars, per_class=64, steps=250, batch_size=64, adv_eps=0.5)
test_eq((_ra.info['adv_eps'], _ra.info['adv_steps']), (0.5, 2))
test_fail(lambda: train_encoder(_Xa, _ya, adv_eps=0.5, adv_steps=0), contains='adv_steps >= 1')
assert prototype_accuracy(_ra, _Xq, _yq) > _acc0 + 0.15                       # it still learns the classes
