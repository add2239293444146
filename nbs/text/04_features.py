# %% [markdown]
# # Feature store
#
# > Every image once through the frozen encoders: L2-normalised support embeddings and VAE posteriors (image and mirror), float16, resumable, with the metadata that stops a run from reading features it did not ask for.

# %%
#| default_exp features

# %%
#| export
from __future__ import annotations
import hashlib, json, os, shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from fsdit.config import TrainConfig
from fsdit.data import (SPLITS, resize_rule, list_classes, list_images, load_image, encode_images, device_sharding,
                        EpisodeSource, latents_at)
from fsdit.files import atomic_file, building
from fsdit.utils import patch_to, LatentScaling
from fsdit.vae import DEFAULT_VAE, DEFAULT_SCALING

# %%
import tempfile as _tf
from fastcore.test import test_eq, test_close
from PIL import Image

from fsdit.testing import raises

# %% [markdown]
# ## Layout
#
# ```
# FEATS/metadata.json   format_version, encoder and vae ids, latent_scale, image_size, resize rule, space, shapes, rows per split
# FEATS/index.json      per row: split, class, label (class index within the split), path (relative to the data)
# FEATS/embeds.npy      (N, D) float16, L2-normalised support-encoder embeddings
# FEATS/moments.npy     (N, 2, 2, h, w, c) float16: [mirror 0/1][mean, logvar] of the VAE posterior
# ```
#
# Rows run split by split (`train`, `val`, `test`), class by class (sorted), image by image (sorted), so
# each class is a contiguous block. In pixel space (`fsdit.codecs.PixelSpace`) the "posterior" is the image with
# logvar -30: one code path. The `.npy` files are memory-mapped when read.
#
# The encoders are objects with a `name` (recorded in the store) and a method: the support encoder
# `.embed(images)` -> (n, D), the VAE `.moments(images)` -> (mean, logvar), images NHWC in [-1, 1] at
# `image_size`, resized by one rule (`fsdit.data.resize_rule`, the same as `fsdit.encoder.preprocess_siglip`). The
# VAE also has a `scaling_factor` (recorded as `latent_scale`: see below). The examples here use toy encoders;
# `fsdit precompute` (in `fsdit.codecs`) loads SigLIP2 and the SD-VAE, or the offline stand-ins.

# %%
#| export
FORMAT_VERSION = 1


def store_index(data, splits: Sequence[str] = SPLITS) -> dict[str, list]:
    "The rows of a store of the prepared split at `data`: split, class, label, path (relative to `data`)."
    data, idx = Path(data), {'split': [], 'class': [], 'label': [], 'path': []}
    for s in splits:
        if not (data / s).is_dir(): continue
        for label, c in enumerate(list_classes(data / s)):
            for p in list_images(data / s / c):
                idx['split'].append(s); idx['class'].append(c); idx['label'].append(label)
                idx['path'].append(f"{s}/{c}/{p.name}")
    if not idx['path']: raise ValueError(f"no images under {data}/{{{','.join(splits)}}}/<class>/: run `fsdit prepare` first")
    return idx


# %% [markdown]
# A tiny prepared split of 12 px images, three train classes, one validation class and two test classes of six
# images each; its rows:

# %%
def _split(root, classes=(('train', 3), ('val', 1), ('test', 2)), n=6, size=12):
    rng = np.random.RandomState(0)
    for s, k in classes:
        for c in range(k):
            d = Path(root) / s / f'{s}{c}'; d.mkdir(parents=True)
            for i in range(n): Image.fromarray(rng.randint(0, 255, (size, size, 3), np.uint8)).save(d / f'{i}.png')
    return Path(root)

_root = Path(_tf.mkdtemp()); data = _split(_root / 'split')
_idx = store_index(data)
test_eq((len(_idx['path']), _idx['path'][:2], _idx['path'][-1]), (36, ['train/train0/0.png', 'train/train0/1.png'], 'test/test1/5.png'))
test_eq((_idx['split'][18], _idx['class'][18], _idx['label'][30]), ('val', 'val0', 1))
raises(lambda: store_index(_root / 'nothing'), 'run `fsdit prepare` first')


# %% [markdown]
# ## The store
#
# `Store` is an opened store: its metadata, its index and its two arrays, with the rows of a split and of
# each of its classes.

# %%
#| export
@dataclass
class Store:
    "A feature store: metadata, index and memory-mapped arrays."
    path: Path
    meta: dict
    index: dict
    embeds: np.ndarray     # (N, D) float16
    moments: np.ndarray    # (N, 2, 2, h, w, c) float16

    def rows(self, split: str) -> np.ndarray:
        "Store rows of `split`."
        return np.flatnonzero(np.asarray(self.index['split']) == split)

    def classes(self, split: str) -> list[str]:
        "Class names of `split`, in label order."
        r = self.rows(split); cls = np.asarray(self.index['class'])[r]
        return list(dict.fromkeys(cls))

    def class_rows(self, split: str) -> list[np.ndarray]:
        "Per class of `split` (label order), its store rows: what `fsdit.data.EpisodeBatches` takes."
        r = self.rows(split); lab = np.asarray(self.index['label'])[r]
        return [r[lab == c] for c in range(int(lab.max()) + 1)] if len(r) else []


# %%
_toy = Store(Path('toy'), {'space': 'pixel'},
             {'split': ['train'] * 3 + ['val'] * 2, 'class': ['a', 'a', 'b', 'c', 'c'], 'label': [0, 0, 1, 0, 0], 'path': list('01234')},
             np.zeros((5, 4), np.float16), np.arange(5 * 8, dtype=np.float16).reshape(5, 2, 2, 2, 1, 1))
test_eq((list(_toy.rows('val')), _toy.classes('train'), _toy.classes('val')), ([3, 4], ['a', 'b'], ['c']))
test_eq([list(r) for r in _toy.class_rows('train')], [[0, 1], [2]]); test_eq(_toy.class_rows('test'), [])


# %% [markdown]
# `Store.latents(rows)` gives the latents of rows, as the model reads them: the unmirrored posterior means
# (`moments[rows, 0, 0]`), float32.

# %%
#| export
@patch_to(Store)
def latents(self, rows) -> np.ndarray:
    "float32 (n, h, w, c): the unmirrored posterior means of `rows`, the latents (pixel space: the images)."
    return np.asarray(latents_at(self.moments, rows), np.float32)


# %%
_lat = _toy.latents([4, 1])
test_eq((_lat.shape, _lat.dtype), ((2, 2, 1, 1), np.float32)); test_eq(_lat[:, :, 0, 0], [[32, 33], [8, 9]])


# %% [markdown]
# ## Reading a store
#
# `open_store` refuses a folder that is not a complete store and, given `expect`, a store made with other
# encoders, image size or format than the run asks for — with what differs in the message. A store whose
# files were damaged after it was made (a file truncated or emptied, a disk that filled up while it was
# copied) is refused naming the store and the file, rather than failing later inside numpy or json.

# %%
#| export
def _damaged(path: Path, name: str, why: str) -> ValueError:
    return ValueError(f"feature store {path} is damaged: {name} {why}; delete the store and run `fsdit precompute` again")


def _store_json(path: Path, name: str):
    try: return json.loads((path / name).read_text())
    except FileNotFoundError: raise _damaged(path, name, 'is missing') from None
    except (OSError, ValueError) as e: raise _damaged(path, name, f"cannot be read ({type(e).__name__}: empty or cut off)") from None


def _store_array(path: Path, name: str, rows: int, mode) -> np.ndarray:
    try: a = np.load(path / name, mmap_mode=mode)
    except FileNotFoundError: raise _damaged(path, name, 'is missing') from None
    except (OSError, ValueError, EOFError):      # truncated: numpy says "mmap length ...", "cannot reshape", EOF
        raise _damaged(path, name, f"is truncated or empty ({path / name}: {os.path.getsize(path / name)} bytes)") from None
    if len(a) != rows: raise _damaged(path, name, f"holds {len(a)} rows, its index {rows}")
    return a


def open_store(path, expect: dict | None = None, mmap: bool = True) -> Store:
    "Open the store at `path`; raise `ValueError` if it is incomplete, damaged or differs from `expect`."
    path = Path(path)
    meta = _store_json(path, 'metadata.json') if (path / 'metadata.json').exists() else {}
    if not meta.get('complete'):
        hint = f" (an interrupted precompute left {path}.partial: run it again to finish)" if Path(f"{path}.partial").exists() else ''
        raise ValueError(f"{path} is not a complete feature store{hint}")
    want = {'format_version': FORMAT_VERSION, **(expect or {})}
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise ValueError(f"feature store {path} does not match this run: " + '; '.join(
            f"{k} is {have!r}, the run asks for {need!r}" for k, (have, need) in diff.items())
            + ". Run `fsdit precompute` for these settings into another folder.")
    index, mode = _store_json(path, 'index.json'), 'r' if mmap else None
    rows = len(index.get('path', [])) if isinstance(index, dict) else -1
    if rows != meta.get('rows', rows) or rows < 1: raise _damaged(path, 'index.json', f"lists {rows} rows, metadata.json {meta.get('rows')}")
    return Store(path, meta, index, _store_array(path, 'embeds.npy', rows, mode), _store_array(path, 'moments.npy', rows, mode))


# %%
raises(lambda: open_store(data), f"{data} is not a complete feature store")


# %% [markdown]
# ## Precompute
#
# The rows are cut into chunks at fixed boundaries (`chunk_size` rows). Each chunk is loaded, encoded in
# batches whose leading axis is split over the local devices, and saved as its own file, renamed into
# place when complete — the file's presence is the chunk's done-marker. A killed run leaves
# `FEATS.partial/`; run again, it checks the plan is the same, skips the finished chunks and does the
# rest. The store is assembled beside `FEATS` (in a hidden `.FEATS.partial-XXXX/`, `fsdit.files.building`) and
# renamed into place at the end, so `FEATS` is either absent or whole, and equals what one uninterrupted run gives. A run killed
# while assembling leaves the hidden folder; the next run deletes it before assembling again, and a run that
# finds the store complete deletes what is left of `FEATS.partial/`. Folders get the usual permissions
# (0755 under the usual umask), as runs do.

# %%
#| export
def _encode_fn(f: Callable, n_dev: int, quantum: int):
    "Call `f` on a batch padded to a multiple of `quantum` (itself one of the devices), split over the devices."
    import jax
    shard = device_sharding() if n_dev > 1 else None
    def g(x):                                          # fixed shapes: one compilation, also for the last chunk
        n = len(x); pad = -n % quantum
        if pad: x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = f(jax.device_put(x, shard) if shard is not None else x)
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], y)
    return g


def _chunk(paths: Sequence[Path], image_size: int, embed, moments, batch_size: int, pool) -> dict:
    imgs = np.stack(list(pool.map(lambda p: load_image(p, image_size), paths)))   # (n, S, S, 3) uint8
    out = [encode_images(imgs[i:i + batch_size], embed, moments) for i in range(0, len(imgs), batch_size)]
    return {'embeds': np.concatenate([e for e, _ in out]), 'moments': np.concatenate([m for _, m in out])}


def _save_chunk(d: Path, i: int, arrays: dict):
    with atomic_file(d / f"chunk_{i:06d}.npz") as tmp:   # atomic: the file is the done-marker
        np.savez(tmp, **arrays)


def _plan(data: Path, encoder, vae, image_size: int, space: str, chunk_size: int, index: dict) -> dict:
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    return dict(format_version=FORMAT_VERSION, encoder=encoder.name, vae=vae.name, image_size=image_size,
                resize=resize_rule(image_size), space=space, chunk_size=chunk_size, rows=len(index['path']), index_sha256=digest)


def _scaling_factor(vae, space: str) -> float:
    "The moments codec's `scaling_factor` (1 in pixel space when it has none): recorded as the store's `latent_scale`."
    f = getattr(vae, 'scaling_factor', 1.0 if space == 'pixel' else None)
    if f is None: raise ValueError(f"the VAE {getattr(vae, 'name', vae)!r} has no `scaling_factor`: give it the factor its "
                                   "latents are multiplied by for the model (diffusers' config.json `scaling_factor`)")
    return float(f)


# %%
#| hide
_g = _encode_fn(lambda x: x * 2, 1, 4)                                  # padded to 4 rows, cut back to 3
test_eq(_g(np.ones((3, 2), np.float32)), np.full((3, 2), 2, np.float32))
test_eq(_scaling_factor(object(), 'pixel'), 1.0)
raises(lambda: _scaling_factor(object(), 'latent'), 'has no `scaling_factor`')


# %% [markdown]
# The finished chunks are assembled into the store:

# %%
#| export
def _assemble(part: Path, out: Path, plan: dict, index: dict, n_chunks: int) -> Store:
    "Concatenate the chunk files into the store beside `out`, then rename it into place."
    first, N = np.load(part / 'chunk_000000.npz'), plan['rows']
    for stale in [*out.parent.glob(f'.{out.name}.partial-*'), *out.parent.glob(f'.{out.name}.assembling*')]:
        shutil.rmtree(stale)                               # left by a run killed while assembling
    with building(out) as tmp:
        E = np.lib.format.open_memmap(tmp / 'embeds.npy', 'w+', np.float16, (N, *first['embeds'].shape[1:]))
        M = np.lib.format.open_memmap(tmp / 'moments.npy', 'w+', np.float16, (N, *first['moments'].shape[1:]))
        for i in range(n_chunks):
            c = np.load(part / f"chunk_{i:06d}.npz"); s = i * plan['chunk_size']
            E[s:s + len(c['embeds'])] = c['embeds']; M[s:s + len(c['moments'])] = c['moments']
        E.flush(); M.flush(); del E, M
        meta = {**plan, 'embed_dim': int(first['embeds'].shape[1]), 'latent_shape': list(first['moments'].shape[3:]),
                'dtype': 'float16', 'splits': {s: index['split'].count(s) for s in dict.fromkeys(index['split'])},
                'complete': True}
        (tmp / 'index.json').write_text(json.dumps(index))
        (tmp / 'metadata.json').write_text(json.dumps(meta, indent=1))
    shutil.rmtree(part)
    return open_store(out)


# %%
#| hide
_part = _root / 'toy.partial'; _part.mkdir()
_ix = {'split': ['train', 'train', 'val'], 'class': ['a', 'b', 'c'], 'label': [0, 1, 0], 'path': ['x', 'y', 'z']}
_E, _M = np.eye(3, 4, dtype=np.float16), np.ones((3, 2, 2, 2, 2, 1), np.float16)
_save_chunk(_part, 0, {'embeds': _E[:2], 'moments': _M[:2]}); _save_chunk(_part, 1, {'embeds': _E[2:], 'moments': _M[2:]})
_st = _assemble(_part, _root / 'toy', dict(format_version=FORMAT_VERSION, chunk_size=2, rows=3), _ix, 2)
test_eq((_st.embeds, _st.meta['splits'], _st.meta['latent_shape'], _st.index), (_E, {'train': 2, 'val': 1}, [2, 2, 1], _ix))
assert not _part.exists()


# %% [markdown]
# `precompute` plans the chunks, encodes those not done yet and assembles the store:

# %%
#| export
def precompute(data, out, encoder, vae, image_size: int = 224, space: str = 'latent', chunk_size: int = 512,
               batch_size: int = 64, splits: Sequence[str] = SPLITS, progress: bool = True,
               on_chunk: Callable[[int], None] | None = None) -> Store:
    "Encode every image of the prepared split `data` once into the store `out` (resumable); returns it opened."
    import jax
    if chunk_size < 1 or batch_size < 1: raise ValueError(f"chunk_size and batch_size must be 1 or more, got {chunk_size}, {batch_size}")
    scale = _scaling_factor(vae, space)
    data, out = Path(data).resolve(), Path(out)
    index = store_index(data, splits)
    plan = _plan(data, encoder, vae, image_size, space, chunk_size, index)
    expect = {k: plan[k] for k in ('encoder', 'vae', 'image_size', 'resize', 'space')}
    if (out / 'metadata.json').exists():
        st = open_store(out, {**expect, 'index_sha256': plan['index_sha256']})
        shutil.rmtree(f"{out}.partial", ignore_errors=True)       # a run killed after the rename left it
        return st
    if out.exists() and any(out.iterdir()): raise ValueError(f"{out} exists and is not a feature store; choose another --out")
    part = Path(f"{out}.partial"); part.mkdir(parents=True, exist_ok=True)
    pf = part / 'plan.json'
    if pf.exists() and json.loads(pf.read_text()) != plan:
        raise ValueError(f"{part} holds an interrupted precompute with other settings or images; delete it to start over")
    pf.write_text(json.dumps(plan, indent=1))
    n_dev = jax.local_device_count()
    batch_size = -(-batch_size // n_dev) * n_dev                       # a multiple of the devices
    embed, moments = _encode_fn(encoder.embed, n_dev, batch_size), _encode_fn(vae.moments, n_dev, batch_size)
    N = len(index['path']); starts = range(0, N, chunk_size)
    with ThreadPoolExecutor(8) as pool, tqdm(total=N, desc='precompute', unit='img', disable=not progress) as bar:
        for i, s in enumerate(starts):
            e = min(s + chunk_size, N)
            if not (part / f"chunk_{i:06d}.npz").exists():
                _save_chunk(part, i, _chunk([data / p for p in index['path'][s:e]], image_size, embed, moments,
                                            batch_size, pool))
                if on_chunk is not None: on_chunk(i)
            bar.update(e - s)
    return _assemble(part, out, {**plan, 'latent_scale': scale}, index, len(starts))


# %% [markdown]
# The tiny split, encoded at 16 px with the stand-ins in pixel space:

# %%
class ToyEncoder:       # the examples' encoders: a random projection of the mean colour, and pixels as the "posterior"
    def __init__(self, dim: int = 8): self.name, self.w = f'toy/colour-d{dim}', np.random.RandomState(0).randn(3, dim)
    def embed(self, x): return np.asarray(x).mean((1, 2)) @ self.w
class ToyPixels:
    name, scaling_factor = 'toy/pixels', 1.0
    def moments(self, x): return np.asarray(x), np.full(np.shape(x), -30.0)

enc, vae = ToyEncoder(), ToyPixels()
st = precompute(data, _root / 'feats', enc, vae, image_size=16, space='pixel', chunk_size=5, batch_size=4, progress=False)
test_eq((st.embeds.shape, st.moments.shape, st.embeds.dtype), ((36, 8), (36, 2, 2, 16, 16, 3), np.float16))
test_eq(st.meta['splits'], {'train': 18, 'val': 6, 'test': 12})
test_eq([len(r) for r in st.class_rows('train')], [6, 6, 6]); test_eq(st.classes('test'), ['test0', 'test1'])
test_close(np.linalg.norm(st.embeds.astype(np.float32), axis=-1), 1, eps=1e-2)
img = load_image(data / st.index['path'][7], 16) / 127.5 - 1
test_close(st.moments[7, 0, 0], img, eps=1e-2); test_close(st.moments[7, 1, 0], img[:, ::-1], eps=1e-2)
_lat = st.latents([7, 2]); test_eq((_lat.shape, _lat.dtype), ((2, 16, 16, 3), np.float32)); test_close(_lat[0], img, eps=1e-2)
assert not Path(f"{_root / 'feats'}.partial").exists() and not list(_root.glob('.feats*'))
_mask = os.umask(0); os.umask(_mask)                                  # folders as mkdir makes them, not 0700
test_eq(oct((_root / 'feats').stat().st_mode & 0o777), oct(0o777 & ~_mask))


# %% [markdown]
# Interrupted after two chunks and run again, it finishes from the third and gives the same store:

# %%
class Killed(Exception): pass
def kill_after(n):
    def f(i):
        if i + 1 == n: raise Killed()
    return f
try: precompute(data, _root / 'feats2', enc, vae, 16, 'pixel', chunk_size=5, batch_size=4, progress=False, on_chunk=kill_after(2))
except Killed: pass
raises(lambda: open_store(_root / 'feats2'), 'interrupted precompute')
done = []
st2 = precompute(data, _root / 'feats2', enc, vae, 16, 'pixel', chunk_size=5, batch_size=4, progress=False, on_chunk=done.append)
test_eq(done, [2, 3, 4, 5, 6, 7])                                      # chunks 0 and 1 were not redone
assert np.array_equal(st2.embeds, st.embeds) and np.array_equal(st2.moments, st.moments)
test_eq(st2.index, st.index)

# %% [markdown]
# A run that asks for other encoders or another image size is refused:

# %%
raises(lambda: open_store(_root / 'feats', {'encoder': 'google/siglip2-base-patch16-224', 'image_size': 224}),
       "encoder is 'toy/colour-d8', the run asks for 'google/siglip2-base-patch16-224'")
raises(lambda: precompute(data, _root / 'feats', ToyEncoder(dim=16), vae, 16, 'pixel', progress=False), 'does not match')
test_eq(precompute(data, _root / 'feats', enc, vae, 16, 'pixel', progress=False).meta, st.meta)   # same call: reused

# %% [markdown]
# A damaged copy of the store — an array file cut short, the index emptied — is refused naming the store and the file:

# %%
bad = _root / 'feats_damaged'; shutil.copytree(_root / 'feats', bad)
with open(bad / 'moments.npy', 'r+b') as f: f.truncate(1000)
raises(lambda: open_store(bad), f"feature store {bad} is damaged: moments.npy is truncated")
(bad / 'index.json').write_text('')
raises(lambda: open_store(bad), 'index.json cannot be read')


# %% [markdown]
# ## The latent scale
#
# The DiT models `latents * scaling_factor` (0.18215 for `stabilityai/sd-vae-ft-mse`, 0.13025 for the SDXL
# VAE: unit variance in either case). The factor belongs to the VAE that made the latents, so `precompute`
# records it in the store as `latent_scale`, and the trainer and sampler take it from there (`Store.scaling`, the
# `fsdit.utils.LatentScaling` that applies it). A store made
# before the factor was recorded is read with the one default that is safe — the default VAE's factor when
# the store names that VAE, 1 in pixel space — and any other is refused with the fix rather than trained
# at a wrong scale.

# %%
#| export
def store_latent_scale(meta: dict, path=None) -> float:
    "The store's recorded `latent_scale`; for a store made before it was recorded, the default VAE's or pixel space's."
    if 'latent_scale' in meta: return float(meta['latent_scale'])
    if meta.get('space') == 'pixel': return 1.0
    if meta.get('vae') == DEFAULT_VAE: return DEFAULT_SCALING
    raise ValueError(f"feature store {path or ''} does not record its VAE scaling factor (it was made with {meta.get('vae')!r} "
                     "before stores recorded it): run `fsdit precompute` again, or add \"latent_scale\": <the VAE's "
                     "scaling_factor, from its config.json> to its metadata.json")


@patch_to(Store, as_prop=True)
def latent_scale(self) -> float:
    "The factor between the stored latents and the model's space: the VAE's `scaling_factor` (1 in pixel space)."
    return store_latent_scale(self.meta, self.path)


@patch_to(Store, as_prop=True)
def scaling(self) -> LatentScaling:
    "The `LatentScaling` of the store's latents: what the trainer and the sampler apply."
    return LatentScaling(self.latent_scale)


# %%
import dataclasses
test_eq(st.latent_scale, 1.0); test_eq(st.meta['latent_scale'], 1.0); test_eq(st.scaling, LatentScaling(1.0))
_old = {k: v for k, v in st.meta.items() if k != 'latent_scale'}           # a store made before the change
test_eq(dataclasses.replace(st, meta=_old).latent_scale, 1.0)
test_eq(store_latent_scale({**_old, 'space': 'latent', 'vae': 'stabilityai/sd-vae-ft-mse'}), 0.18215)
raises(lambda: store_latent_scale({**_old, 'space': 'latent', 'vae': 'madebyollin/sdxl-vae-fp16-fix'}, 'FEATS'),
       'does not record its VAE scaling factor')


# %% [markdown]
# ## Episodes of a store
#
# `store_source` is what `fsdit train` reads: the train split's classes for training, the val split's for
# validation, the class names for messages, and the store's latent scale.

# %%
#| export
def store_source(feats, tc: TrainConfig, val_batches: int = 4) -> EpisodeSource:
    "Episodes of the feature store at `feats` (a path or an open store): train split for training, val split for validation."
    st = feats if isinstance(feats, Store) else open_store(feats)
    return EpisodeSource(st.embeds, st.moments, st.class_rows('train'), st.class_rows('val'), tc, st.meta['space'], val_batches,
                         names={s: st.classes(s) for s in ('train', 'val')}, scaling=st.scaling)


# %%
from fsdit.config import train_config
src = store_source(_root / 'feats', train_config('test', batch_size=6, shots=3), 1)
test_eq((src.space, src.scaling, src.names['val']), ('pixel', LatentScaling(1.0), ['val0']))
b, pos = next(src.batches())
test_eq((b['moments'].shape, b['support_embeds'].shape, pos), ((6, 2, 2, 16, 16, 3), (6, 3, 8), {'epoch': 0, 'offset': 6}))
