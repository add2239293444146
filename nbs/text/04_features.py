# %% [markdown]
# # Feature store
#
# > Every image once through the frozen encoders: L2-normalised support embeddings and VAE posteriors (image and mirror), float16, resumable, with the metadata that stops a run from reading features it did not ask for.

# %%
#| default_exp features

# %%
#| export
from __future__ import annotations
import argparse, hashlib, json, os, shutil, types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from fsdit.data import (EpisodeSource, SPLITS, resize_rule, list_classes, list_images, load_image, encode_images,
                        PixelEncoder, PixelSpace)

# %%
import tempfile as _tf
from fastcore.test import test_eq, test_close
from PIL import Image

def raises(f, match, exc=Exception):
    "Assert that `f()` raises `exc` with `match` in its message; return the message."
    try: f()
    except exc as e:
        assert match in str(e), f"{match!r} not in {e!r}"; return str(e)
    raise AssertionError('no error raised')


# %% [markdown]
# ## Layout
#
# ```
# FEATS/metadata.json   format_version, encoder and vae ids, image_size, resize rule, space, shapes, rows per split
# FEATS/index.json      per row: split, class, label (class index within the split), path (relative to the data)
# FEATS/embeds.npy      (N, D) float16, L2-normalised support-encoder embeddings
# FEATS/moments.npy     (N, 2, 2, h, w, c) float16: [mirror 0/1][mean, logvar] of the VAE posterior
# ```
#
# Rows run split by split (`train`, `val`, `test`), class by class (sorted), image by image (sorted), so
# each class is a contiguous block. In pixel space (`PixelSpace`) the "posterior" is the image with
# logvar -30: one code path. The `.npy` files are memory-mapped when read.
#
# The encoders are objects with a `name` (recorded in the store) and a method: the support encoder
# `.embed(images)` -> (n, D), the VAE `.moments(images)` -> (mean, logvar), images NHWC in [-1, 1] at
# `image_size`, resized by one rule (`fsdit.data.resize_rule`, the same as `fsdit.encoder.preprocess_siglip`). Tests use the small stand-ins of
# `fsdit.data`; `fsdit precompute` loads SigLIP2 and the SD-VAE.

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
# ## Reading a store
#
# `open_store` refuses a folder that is not a complete store and, given `expect`, a store made with other
# encoders, image size or format than the run asks for — with what differs in the message. A store whose
# files were damaged after it was made (a file truncated or emptied, a disk that filled up while it was
# copied) is refused naming the store and the file, rather than failing later inside numpy or json.

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


def _damaged(path: Path, name: str, why: str) -> ValueError:
    return ValueError(f"feature store {path} is damaged: {name} {why}; delete the store and run `fsdit precompute` again")


def _store_json(path: Path, name: str):
    try: return json.loads((path / name).read_text())
    except FileNotFoundError: raise _damaged(path, name, 'is missing') from None
    except (OSError, ValueError) as e: raise _damaged(path, name, f"cannot be read ({type(e).__name__}: empty or cut off)") from None


def _store_array(path: Path, name: str, rows: int, mode) -> np.ndarray:
    try: a = np.load(path / name, mmap_mode=mode)
    except FileNotFoundError: raise _damaged(path, name, 'is missing') from None
    except (OSError, ValueError, EOFError) as e:      # truncated: numpy says "mmap length ...", "cannot reshape", EOF
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


# %% [markdown]
# ## Precompute
#
# The rows are cut into chunks at fixed boundaries (`chunk_size` rows). Each chunk is loaded, encoded in
# batches whose leading axis is split over the local devices, and saved as its own file, renamed into
# place when complete — the file's presence is the chunk's done-marker. A killed run leaves
# `FEATS.partial/`; run again, it checks the plan is the same, skips the finished chunks and does the
# rest. The store is assembled beside `FEATS` (in the hidden `.FEATS.assembling/`) and renamed into place at
# the end, so `FEATS` is either absent or whole, and equals what one uninterrupted run gives. A run killed
# while assembling leaves the hidden folder; the next run deletes it before assembling again, and a run that
# finds the store complete deletes what is left of `FEATS.partial/`. Folders get the usual permissions
# (0755 under the usual umask), as runs do.

# %%
#| export
def _encode_fn(f: Callable, n_dev: int, quantum: int):
    "Call `f` on a batch padded to a multiple of `quantum` (itself one of the devices), split over the devices."
    import jax
    from fsdit.data import device_sharding
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
    tmp = d / f".chunk_{i:06d}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, d / f"chunk_{i:06d}.npz")          # atomic: the file is the done-marker


def _plan(data: Path, encoder, vae, image_size: int, space: str, chunk_size: int, index: dict) -> dict:
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    return dict(format_version=FORMAT_VERSION, encoder=encoder.name, vae=vae.name, image_size=image_size,
                resize=resize_rule(image_size), space=space, chunk_size=chunk_size, rows=len(index['path']), index_sha256=digest)


# %%
#| export
def precompute(data, out, encoder, vae, image_size: int = 224, space: str = 'latent', chunk_size: int = 512,
               batch_size: int = 64, splits: Sequence[str] = SPLITS, progress: bool = True,
               on_chunk: Callable[[int], None] | None = None) -> Store:
    "Encode every image of the prepared split `data` once into the store `out` (resumable); returns it opened."
    import jax
    if chunk_size < 1 or batch_size < 1: raise ValueError(f"chunk_size and batch_size must be 1 or more, got {chunk_size}, {batch_size}")
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
    return _assemble(part, out, plan, index, len(starts))


# %%
#| export
def _assemble(part: Path, out: Path, plan: dict, index: dict, n_chunks: int) -> Store:
    "Concatenate the chunk files into the store beside `out`, then rename it into place."
    first = np.load(part / 'chunk_000000.npz')
    N = plan['rows']
    for stale in out.parent.glob(f'.{out.name}.assembling*'): shutil.rmtree(stale)   # left by a run killed here
    tmp = out.parent / f'.{out.name}.assembling'
    tmp.mkdir()                                            # the umask's permissions (mkdtemp would give 0700)
    try:
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
        if out.exists(): out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise
    shutil.rmtree(part)
    return open_store(out)


# %% [markdown]
# A tiny prepared split of 16 px images, encoded with the stand-ins in pixel space:

# %%
def _split(root, classes=(('train', 3), ('val', 1), ('test', 2)), n=6, size=12):
    rng = np.random.RandomState(0)
    for s, k in classes:
        for c in range(k):
            d = Path(root) / s / f'{s}{c}'; d.mkdir(parents=True)
            for i in range(n): Image.fromarray(rng.randint(0, 255, (size, size, 3), np.uint8)).save(d / f'{i}.png')
    return Path(root)

_root = Path(_tf.mkdtemp()); data = _split(_root / 'split')
enc, vae = PixelEncoder(dim=8, grid=4), PixelSpace(size=16)
st = precompute(data, _root / 'feats', enc, vae, image_size=16, space='pixel', chunk_size=5, batch_size=4, progress=False)
test_eq((st.embeds.shape, st.moments.shape, st.embeds.dtype), ((36, 8), (36, 2, 2, 16, 16, 3), np.float16))
test_eq(st.meta['splits'], {'train': 18, 'val': 6, 'test': 12})
test_eq([len(r) for r in st.class_rows('train')], [6, 6, 6]); test_eq(st.classes('test'), ['test0', 'test1'])
test_close(np.linalg.norm(st.embeds.astype(np.float32), axis=-1), 1, eps=1e-2)
img = load_image(data / st.index['path'][7], 16) / 127.5 - 1
test_close(st.moments[7, 0, 0], img, eps=1e-2); test_close(st.moments[7, 1, 0], img[:, ::-1], eps=1e-2)
assert not Path(f"{_root / 'feats'}.partial").exists() and not list(_root.glob('.feats.assembling*'))
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
       "encoder is 'stand-in/pixel-randproj-g4-d8-s0', the run asks for 'google/siglip2-base-patch16-224'")
raises(lambda: precompute(data, _root / 'feats', PixelEncoder(dim=16), vae, 16, 'pixel', progress=False), 'does not match')
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
# ## Command line
#
# `fsdit precompute --data SPLIT --out FEATS` loads SigLIP2 and the SD-VAE (hub ids or local folders).
# `--stand-in` uses the offline stand-ins instead (pixel space, `PixelEncoder` — not SigLIP2).

# %%
#| export
def _named(obj, name: str, method: str):
    "`obj` if it carries a `name`, else a view of it with `name` and `method`."
    if getattr(obj, 'name', None): return obj
    return types.SimpleNamespace(name=name, **{method: getattr(obj, method)})


def precompute_cli(argv: list[str]) -> int:
    "`fsdit precompute`: every image of a prepared split once through the frozen encoders."
    from fsdit.cli import Parser, positive_int, check_out_dir, fail
    p = Parser(prog='fsdit precompute', description=precompute.__doc__)
    p.add_argument('--data', required=True, help='prepared split (output of `fsdit prepare`)')
    p.add_argument('--out', required=True, help='feature store folder to write')
    p.add_argument('--encoder', default='google/siglip2-base-patch16-224', help='SigLIP(2) hub id or local folder')
    p.add_argument('--vae', default='stabilityai/sd-vae-ft-mse', help='SD-VAE hub id or local folder')
    p.add_argument('--image-size', type=positive_int, default=None, help='224 (latent) or 32 (--stand-in)')
    p.add_argument('--chunk-size', type=positive_int, default=1024); p.add_argument('--batch-size', type=positive_int, default=64)
    p.add_argument('--stand-in', action='store_true', help='offline stand-ins: pixel space + PixelEncoder (NOT SigLIP2)')
    p.add_argument('--embed-dim', type=positive_int, default=64, help='stand-in embedding width')
    p.add_argument('--channels', type=int, default=3, help='stand-in pixel channels (3 or 1)')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='encoder compute dtype')
    a = p.parse_args(argv)
    try:
        check_out_dir(a.out)
        store_index(a.data)                                  # a split to read, before any encoder loads
        if a.stand_in:
            size = a.image_size or 32
            enc, vae, space = PixelEncoder(dim=a.embed_dim), PixelSpace(size=size, channels=a.channels), 'pixel'
        else:
            from fsdit.encoder import SigLIPEncoder          # imported here: heavy, and only this path needs them
            from fsdit.vae import SDVAE
            size, space = a.image_size or 224, 'latent'
            enc = _named(SigLIPEncoder.from_pretrained(a.encoder, dtype=a.dtype), a.encoder, 'embed')
            vae = _named(SDVAE.from_pretrained(a.vae, dtype=a.dtype), a.vae, 'moments')
        st = precompute(a.data, a.out, enc, vae, size, space, a.chunk_size, a.batch_size)
    except (ValueError, OSError) as e:
        return fail('precompute', e)
    print(f"{a.out}: {len(st.embeds)} images, embeds {st.embeds.shape[1:]}, moments {st.moments.shape[1:]}, {st.meta['splits']}")
    return 0


# %%
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()) as o, contextlib.redirect_stderr(io.StringIO()):
    test_eq(precompute_cli(['--data', str(data), '--out', str(_root / 'feats3'), '--stand-in', '--image-size', '16',
                            '--embed-dim', '8', '--chunk-size', '7']), 0)
st3 = open_store(_root / 'feats3', {'space': 'pixel', 'image_size': 16})
test_eq((st3.embeds.shape, st3.moments.shape), ((36, 8), (36, 2, 2, 16, 16, 3)))
assert '36 images' in o.getvalue()


# %% [markdown]
# ## The trainer's source
#
# `store_source` opens the store's train split for training episodes and its val split for validation, as an
# `fsdit.data.EpisodeSource` that carries the store's latent scale.

# %%
#| export
def store_source(feats, tc, val_batches: int = 4) -> EpisodeSource:
    "Episodes of the feature store at `feats` (a path or an open store): train split for training, val split for validation."
    st = feats if isinstance(feats, Store) else open_store(feats)
    scale = 1.0 if st.meta['space'] == 'pixel' else float(st.meta.get('latent_scale', 0.18215))
    return EpisodeSource(st.embeds, st.moments, st.class_rows('train'), st.class_rows('val'), tc, st.meta['space'], val_batches,
                         names={s: st.classes(s) for s in ('train', 'val')}, latent_scale=scale)
