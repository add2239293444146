# %% [markdown]
# # Data
#
# > From a flat folder of class folders to a host batch: the class split, image loading, episodes, stratified batches that can resume exactly, and the episode source the trainer reads.

# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import json, os, shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import jax
from PIL import Image

from fsdit.config import TrainConfig
from fsdit.files import building
from fsdit.utils import l2_normalize, data_mesh, DATA_AXIS, LatentScaling

_all_ = ['l2_normalize']   # its home is `fsdit.utils`; `from fsdit.data import l2_normalize` still works

# %%
import tempfile as _tf
from fastcore.test import test_eq, test_fail, test_close

from fsdit.testing import raises

def same(a: dict, b: dict):
    "Assert two dicts of arrays are equal."
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), (a, b)


# %% [markdown]
# ## Images
#
# A usable image is a `.jpg`, `.jpeg` or `.png` file (any case) whose name does not start with a dot and
# that decodes completely. Everything is decoded to 8-bit RGB: grayscale, CMYK and palette images are
# converted, transparency is composited on white, and 16-bit grayscale is scaled down rather than clipped.

# %%
#| export
IMAGE_EXTS = ('.jpg', '.jpeg', '.png')


def list_images(folder) -> list[Path]:
    "The image files directly in `folder`, sorted by name; hidden files and other files are ignored."
    return sorted(p for p in Path(folder).iterdir()
                  if not p.name.startswith('.') and p.suffix.lower() in IMAGE_EXTS and p.is_file())


def list_classes(folder) -> list[str]:
    "The class folders directly in `folder`, sorted by name (hidden folders ignored)."
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith('.'))


def to_rgb(im: Image.Image) -> Image.Image:
    "Any PIL image as 8-bit RGB: alpha composited on white, 16-bit and float grayscale rescaled."
    if im.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if im.mode == 'P': im = im.convert('RGBA')          # palette transparency becomes alpha
    if im.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
        im = im.convert('RGBA')
        bg = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert('RGB')


def load_image(path, size: int | None = None) -> np.ndarray:
    "The image at `path` as uint8 RGB (H, W, 3); with `size`, resized to size x size (PIL bilinear, no crop)."
    with Image.open(path) as im:
        im = to_rgb(im)
        if size is not None and im.size != (size, size): im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


# One rule for every path (store, online batches, sampling supports): the same as fsdit.encoder.preprocess_siglip.
RESIZE_RULE = 'PIL bilinear resize of the uint8 RGB image to {size}x{size} (no crop), x/255, (x-0.5)/0.5'


def resize_rule(size: int) -> str:
    "The preprocessing rule as recorded in a feature store."
    return RESIZE_RULE.format(size=size)


def to_unit(images: np.ndarray) -> np.ndarray:
    "uint8 images -> float32 in [-1, 1], as `resize_rule` says."
    return (images.astype(np.float32) * np.float32(1 / 255) - 0.5) / 0.5


def folder_images(folder, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    "Every image of a class-folder tree (`folder/<class>/*`) in [-1, 1], `(N, H, W, 3)`, and its class index (sorted names)."
    X, y = [], []
    for i, c in enumerate(list_classes(folder)):
        for p in list_images(Path(folder) / c): X.append(load_image(p, size)); y.append(i)
    if not X: raise ValueError(f"no images under {folder}: it needs one folder of images per class")
    return to_unit(np.stack(X)), np.asarray(y)


def check_image(path) -> str | None:
    "None if the image at `path` decodes completely, else the reason it does not."
    try:
        with Image.open(path) as im:
            im.draft('RGB', (64, 64))                      # JPEG: decode at 1/8 scale, still reads every byte
            im.load()
        return None
    except Exception as e:                                 # PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"


# %% [markdown]
# Odd modes all come back as RGB, and a truncated file is reported rather than crashing:

# %%
_d = Path(_tf.mkdtemp())
Image.new('L', (8, 6), 128).save(_d / 'gray.PNG')
Image.new('CMYK', (8, 6), (0, 255, 0, 0)).save(_d / 'cmyk.jpg')
_p = Image.new('P', (8, 6)); _p.putpalette([255, 0, 0] * 256); _p.save(_d / 'pal.png')
Image.new('RGBA', (8, 6), (0, 0, 0, 0)).save(_d / 'alpha.png')
Image.new('I;16', (8, 6), 65535).save(_d / 'deep.png')
(_d / '.hidden.jpg').write_bytes(b'x'); (_d / 'notes.txt').write_text('x')
_b = _d / 'trunc.jpg'; Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(_b)
_b.write_bytes(_b.read_bytes()[:600])
test_eq([p.name for p in list_images(_d)], ['alpha.png', 'cmyk.jpg', 'deep.png', 'gray.PNG', 'pal.png', 'trunc.jpg'])
for n in ['alpha.png', 'cmyk.jpg', 'deep.png', 'gray.PNG', 'pal.png']:
    a = load_image(_d / n); test_eq((a.shape, a.dtype, check_image(_d / n)), ((6, 8, 3), np.uint8, None))
test_eq(load_image(_d / 'alpha.png')[0, 0], [255, 255, 255])   # transparent -> white
test_eq(load_image(_d / 'pal.png')[0, 0], [255, 0, 0])
test_eq(load_image(_d / 'deep.png')[0, 0], [255, 255, 255])
test_eq(load_image(_d / 'gray.PNG', size=4).shape, (4, 4, 3))
assert check_image(_b).startswith('OSError')

# %% [markdown]
# ## The class split
#
# miniImageNet on Kaggle is flat: 100 class folders of 600 images. `prepare` splits it by class into
# `train/`, `val/` and `test/`.
#
# - `split='seed'` reproduces the seed's `prepare_data.py` exactly: `RandomState(seed).permutation` of the
#   sorted class names, the first `train` for training, the next `val`, the next `test`. With the seed's
#   60/16/20 it uses 96 of the 100 classes; the 4 left over are in no split.
# - `split='ravi'` is the field's standard split (Ravi & Larochelle 2017; the class lists of its
#   `train.csv`/`val.csv`/`test.csv`): 64/16/20, the counts arguments are ignored.
#
# Each class folder of the split holds one symlink per usable image (or a copy with `copy=True`), so
# unreadable files are left out rather than crashing a later step; they are listed in `prepare.json`.

# %%
#| export
RAVI_SPLIT: dict[str, tuple[str, ...]] = {
    'train': (
        'n01532829', 'n01558993', 'n01704323', 'n01749939', 'n01770081', 'n01843383', 'n01910747', 'n02074367',
        'n02089867', 'n02091831', 'n02101006', 'n02105505', 'n02108089', 'n02108551', 'n02108915', 'n02111277',
        'n02113712', 'n02120079', 'n02165456', 'n02457408', 'n02606052', 'n02687172', 'n02747177', 'n02795169',
        'n02823428', 'n02966193', 'n03017168', 'n03047690', 'n03062245', 'n03207743', 'n03220513', 'n03337140',
        'n03347037', 'n03400231', 'n03476684', 'n03527444', 'n03676483', 'n03838899', 'n03854065', 'n03888605',
        'n03908618', 'n03924679', 'n03998194', 'n04067472', 'n04243546', 'n04251144', 'n04258138', 'n04275548',
        'n04296562', 'n04389033', 'n04435653', 'n04443257', 'n04509417', 'n04515003', 'n04596742', 'n04604644',
        'n04612504', 'n06794110', 'n07584110', 'n07697537', 'n07747607', 'n09246464', 'n13054560', 'n13133613'),
    'val': (
        'n01855672', 'n02091244', 'n02114548', 'n02138441', 'n02174001', 'n02950826', 'n02971356', 'n02981792',
        'n03075370', 'n03417042', 'n03535780', 'n03584254', 'n03770439', 'n03773504', 'n03980874', 'n09256479'),
    'test': (
        'n01930112', 'n01981276', 'n02099601', 'n02110063', 'n02110341', 'n02116738', 'n02129165', 'n02219486',
        'n02443484', 'n02871525', 'n03127925', 'n03146219', 'n03272010', 'n03544143', 'n03775546', 'n04146614',
        'n04149813', 'n04418357', 'n04522168', 'n07613480'),
}
SPLITS = ('train', 'val', 'test')
MIN_IMAGES = 6   # one target and five supports


def split_classes(classes: Sequence[str], train: int = 60, val: int = 16, test: int = 20, seed: int = 42,
                  split: str = 'seed') -> dict[str, list[str]]:
    "Class names of each split: the seed's permutation rule, or the Ravi & Larochelle lists."
    classes = sorted(classes)
    if split == 'ravi':
        missing = sorted(set(sum(RAVI_SPLIT.values(), ())) - set(classes))
        if missing: raise ValueError(f"split='ravi' needs the miniImageNet wnid folders; missing {len(missing)}: {missing[:5]}...")
        return {k: list(v) for k, v in RAVI_SPLIT.items()}
    if split != 'seed': raise ValueError(f"split must be 'seed' or 'ravi', got {split!r}")
    need = train + val + test
    if len(classes) < need: raise ValueError(f"need {need} classes ({train}+{val}+{test}) but found only {len(classes)}")
    idx = np.random.RandomState(seed).permutation(len(classes))[:need]   # the seed's prepare_data.py
    cut = np.cumsum([train, val])
    return {k: [classes[i] for i in part] for k, part in zip(SPLITS, np.split(idx, cut))}


# %% [markdown]
# The standard lists are the 100 miniImageNet classes, disjoint; the seed's rule leaves 4 classes out:

# %%
test_eq([len(RAVI_SPLIT[k]) for k in SPLITS], [64, 16, 20])
_all = sum(RAVI_SPLIT.values(), ()); test_eq(len(set(_all)), 100)
s = split_classes(_all)
test_eq([len(s[k]) for k in SPLITS], [60, 16, 20]); test_eq(len(set(sum(s.values(), []))), 96)
test_eq(s['train'][0], sorted(_all)[np.random.RandomState(42).permutation(100)[0]])
test_eq(split_classes(_all, split='ravi')['test'][0], 'n01930112')
raises(lambda: split_classes(['a', 'b'], 1, 1, 1), 'found only 2')


# %%
#| export
def _scan(src: Path, classes: Sequence[str], workers: int = 8):
    "Usable images per class, and (path, reason) for every file left out."
    good, bad = {}, []
    with ThreadPoolExecutor(workers) as ex:                  # PIL releases the GIL while decoding
        for c in classes:
            paths = list_images(src / c)
            reasons = list(ex.map(check_image, paths))
            good[c] = [p for p, r in zip(paths, reasons) if r is None]
            bad += [[str(p), r] for p, r in zip(paths, reasons) if r is not None]
    few = {c: len(v) for c, v in good.items() if len(v) < MIN_IMAGES}
    if few:
        raise ValueError(f"classes with fewer than {MIN_IMAGES} usable images (one target + 5 supports): "
                         + ', '.join(f"{c!r} ({n})" for c, n in sorted(few.items())))
    return good, bad


def _build(dst_tmp: Path, splits: dict, good: dict, copy: bool):
    for name, classes in splits.items():
        for c in classes:
            d = dst_tmp / name / c; d.mkdir(parents=True)
            for p in good[c]:
                if copy: shutil.copy2(p, d / p.name)
                else: os.symlink(os.path.abspath(p), d / p.name)


def prepare(src, dst, train: int = 60, val: int = 16, test: int = 20, seed: int = 42, split: str = 'seed',
            copy: bool = False) -> dict:
    "Split the flat class folders in `src` into `dst/{train,val,test}/<class>/`; returns the manifest."
    src, dst = Path(src).resolve(), Path(dst)
    splits = split_classes(list_classes(src), train, val, test, seed, split)
    want = dict(src=str(src), split=split, seed=seed if split == 'seed' else None, copy=copy, classes=splits)
    if dst.exists() and any(dst.iterdir()):
        man = dst / 'prepare.json'
        old = json.loads(man.read_text()) if man.exists() else None
        if old is not None and all(old.get(k) == v for k, v in want.items()): return old
        diff = 'it is not a prepared split' if old is None else 'it holds a different split: ' + ', '.join(
            k for k, v in want.items() if old.get(k) != v) + ' differ'
        raise FileExistsError(f"refusing to write into {dst}: {diff}. Choose another --dst or delete it.")
    good, bad = _scan(src, [c for v in splits.values() for c in v])
    manifest = {**want, 'counts': {k: {c: len(good[c]) for c in v} for k, v in splits.items()}, 'skipped': bad}
    with building(dst) as tmp:                             # an empty `dst` is replaced
        _build(tmp, splits, good, copy)
        (tmp / 'prepare.json').write_text(json.dumps(manifest, indent=1))
    return manifest


# %% [markdown]
# `prepare` scans before it writes, builds the split in a hidden folder beside `dst` and renames it into
# place at the end (`fsdit.files.building`), so a refused or failed run leaves nothing half-made. The arguments are recorded in
# `dst/prepare.json`: the same call again is a no-op, a different split into an existing `dst` is refused.

# %% [markdown]
# A small flat dataset with the usual defects: a truncated file, a hidden file, a text file.

# %%
def _flat(root, n_classes=5, n=7, size=8):
    rng = np.random.RandomState(0)
    for c in range(n_classes):
        d = Path(root) / f'c{c}'; d.mkdir(parents=True)
        for i in range(n): Image.fromarray(rng.randint(0, 255, (size, size, 3), np.uint8)).save(d / f'{i}.png')
    return Path(root)

_root = Path(_tf.mkdtemp()); src = _flat(_root / 'flat')
(src / 'c0' / '.DS_Store').write_bytes(b'junk'); (src / 'c1' / 'README.txt').write_text('hi')
(src / 'c2' / '6.png').write_bytes((src / 'c2' / '6.png').read_bytes()[:40])
m = prepare(src, _root / 'split', train=2, val=1, test=1, seed=0)
test_eq(sorted(os.listdir(_root / 'split')), ['prepare.json', 'test', 'train', 'val'])
_mask = os.umask(0); os.umask(_mask)
test_eq((_root / 'split').stat().st_mode & 0o777, 0o777 & ~_mask)        # as mkdir makes folders, not 0700
test_eq(len(m['skipped']), 1 if 'c2' in sum(m['classes'].values(), []) else 0)
c = m['classes']['train'][0]; f = next((_root / 'split' / 'train' / c).iterdir())
assert f.is_symlink() and load_image(f).shape == (8, 8, 3)
test_eq(prepare(src, _root / 'split', train=2, val=1, test=1, seed=0), m)          # same call: no-op
raises(lambda: prepare(src, _root / 'split', train=2, val=1, test=1, seed=1), 'different split')
test_eq([p for p in os.listdir(_root) if 'partial' in p], [])

# %% [markdown]
# A class with fewer than 6 usable images stops the run before anything is written, naming the class:

# %%
for i in range(2, 7): (src / 'c3' / f'{i}.png').unlink()
raises(lambda: prepare(src, _root / 'split2', train=3, val=1, test=1, seed=0), "'c3' (2)")
assert not (_root / 'split2').exists()

# %% [markdown]
# The command `fsdit prepare` (`fsdit.commands.prepare`) runs `prepare` with these arguments as flags; on the
# dataset above it prints the counts, and the refusal is one line:

# %%
import contextlib, io
from fsdit.commands.prepare import prepare_cli
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(prepare_cli(['--src', str(src), '--dst', str(_root / 'split'), '--train', '2', '--val', '1', '--test', '1', '--seed', '0']), 0)
    test_eq(prepare_cli(['--src', str(src), '--dst', str(_root / 'split'), '--train', '2', '--val', '1', '--test', '1', '--seed', '5']), 1)
assert 'train: 2 classes' in out.getvalue() and err.getvalue().startswith('fsdit prepare: refusing to write')


# %% [markdown]
# ## Episodes
#
# An episode is one target image and `shots` support images of the same class; images are rows of the
# feature store. With `class_rows[c]` the rows of class `c`:
#
# - `'disjoint'` (default): per class and epoch the rows are shuffled and cut into disjoint sets of
#   `shots + 1`; each set gives `shots + 1` episodes, each image once the target and the others its
#   supports. 600 images give 100 sets and 600 episodes, every image used once per epoch (a class's
#   last `n mod (shots+1)` images, a different few each epoch, sit the epoch out).
# - `'fixed'`: the seed's table, drawn once: `num_sets` random sets per class
#   (`RandomState(seed).choice(n, shots+1, replace=False)`, classes in order), each in all its rotations.
#   It leaves about $0.99^{100} \approx 37\%$ of the images unused; kept for comparisons.

# %%
#| export
def _rotations(sets: np.ndarray):
    "All rotations of each set: (S, k+1) -> targets (S*(k+1),), supports (S*(k+1), k)."
    k1 = sets.shape[1]
    others = np.array([[j for j in range(k1) if j != r] for r in range(k1)])   # (k+1, k)
    return sets.reshape(-1), sets[:, others].reshape(-1, k1 - 1)


def episode_table(class_rows: Sequence[np.ndarray], shots: int = 5, mode: str = 'disjoint', seed: int = 0,
                  epoch: int = 0, num_sets: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
    "Per class: (targets (E_c,), supports (E_c, shots)) store rows of that class's episodes."
    out = []
    if mode == 'disjoint':
        rng = np.random.default_rng([seed, epoch, 1])
        for rows in class_rows:
            n = len(rows) // (shots + 1) * (shots + 1)
            out.append(_rotations(rng.permutation(np.asarray(rows))[:n].reshape(-1, shots + 1)))
    elif mode == 'fixed':                                  # the seed's build_episode_table; same for every epoch
        rng = np.random.RandomState(seed)
        for rows in class_rows:
            rows = np.asarray(rows)
            sets = np.stack([rows[rng.choice(len(rows), shots + 1, replace=False)] for _ in range(num_sets)])
            out.append(_rotations(sets))
    else: raise ValueError(f"episodes must be 'disjoint' or 'fixed', got {mode!r}")
    return out


# %%
_rows = [np.arange(600) + 600 * c for c in range(3)]
t = episode_table(_rows)
test_eq([(a.shape, b.shape) for a, b in t], [((600,), (600, 5))] * 3)
test_eq(np.sort(t[1][0]), _rows[1])                                    # each image once the target per epoch
for a, b in t: assert (b // 600 == (a // 600)[:, None]).all() and not (b == a[:, None]).any()
f = episode_table(_rows, mode='fixed', seed=42)
test_eq(f[0][0].shape, (600,))
assert 0.3 < 1 - len(np.unique(f[0][0])) / 600 < 0.45                  # ~37% of the images never used
assert not (episode_table(_rows, epoch=1)[0][0] == t[0][0]).all()       # a new draw each epoch


# %% [markdown]
# ## Stratified order
#
# After shuffling within each class, the classes are interleaved round-robin in a shuffled class order:
# `c3 c0 c7 ... c3 c0 c7 ...`. When every class has the same number of episodes, any `B` consecutive
# episodes hold `min(B, classes)` distinct classes whose counts differ by at most one. When a class runs
# out the round-robin continues over the rest. An epoch yields `E // B` batches; the `E mod B` episodes
# at the end wait out that epoch, and since every epoch redraws the shuffles, a different few each time.

# %%
#| export
def stratified_order(per_class: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator):
    "Interleave the classes' episodes round-robin: targets (E,), supports (E, k), labels (E,)."
    perms = [rng.permutation(len(t)) for t, _ in per_class]
    order = rng.permutation(len(per_class))
    # sort key: (round within the class, position of the class in the shuffled order)
    rank = np.empty(len(order), np.int64); rank[order] = np.arange(len(order))
    labels = np.concatenate([np.full(len(t), c, np.int32) for c, (t, _) in enumerate(per_class)])
    rounds = np.concatenate([np.argsort(p) for p in perms])   # round of each episode after the shuffle
    targets = np.concatenate([t for t, _ in per_class]); supports = np.concatenate([s for _, s in per_class])
    idx = np.lexsort((rank[labels], rounds))
    return targets[idx], supports[idx], labels[idx]


# %%
tt, ss, ll = stratified_order([(np.arange(4) + 10 * c, np.zeros((4, 5), int)) for c in range(3)], np.random.default_rng(0))
test_eq(ll[:3], ll[3:6]); test_eq(sorted(ll[:3]), [0, 1, 2])
test_eq(tt // 10, ll)


# %% [markdown]
# ## Batches that resume exactly
#
# `EpisodeBatches` turns the episode tables into an endless stream of index batches. Its position is
# `{'epoch', 'offset'}` (offset: the next episode within the epoch); it is part of the training state,
# so a resumed run continues with exactly the next batch. Everything is a function of
# `(seed, epoch)`: no hidden generator state to save.

# %%
#| export
class EpisodeBatches:
    "Endless, deterministic, resumable stream of stratified episode batches (store row indices)."
    def __init__(self, class_rows: Sequence[np.ndarray], batch_size: int, shots: int = 5, mode: str = 'disjoint',
                 seed: int = 0, num_sets: int = 100):
        self.class_rows, self.batch_size, self.shots, self.mode = [np.asarray(r) for r in class_rows], batch_size, shots, mode
        self.seed, self.num_sets = seed, num_sets
        self.epoch, self.offset, self._cache = 0, 0, (None, None)
        n = len(self._epoch(0)[0])
        if n < batch_size: raise ValueError(f"an epoch has {n} episodes, fewer than the batch size {batch_size}")
        self.batches_per_epoch = n // batch_size

    def _epoch(self, e: int):
        if self._cache[0] != e:
            table = episode_table(self.class_rows, self.shots, self.mode, self.seed, e, self.num_sets)
            self._cache = (e, stratified_order(table, np.random.default_rng([self.seed, e, 2])))
        return self._cache[1]

    def state(self) -> dict: return {'epoch': self.epoch, 'offset': self.offset}

    def state_at(self, n_batches: int) -> dict:
        "The position after `n_batches` batches from the start: what to save at step `n_batches` when prefetching."
        return {'epoch': n_batches // self.batches_per_epoch, 'offset': n_batches % self.batches_per_epoch * self.batch_size}

    def restore(self, state: dict):
        "Continue from a saved `state()`."
        self.epoch, self.offset = int(state['epoch']), int(state['offset'])

    def __iter__(self): return self

    def __next__(self) -> dict:
        if self.offset + self.batch_size > self.batches_per_epoch * self.batch_size:
            self.epoch, self.offset = self.epoch + 1, 0
        t, s, l = self._epoch(self.epoch)
        sl = slice(self.offset, self.offset + self.batch_size)
        self.offset += self.batch_size
        return {'target_index': t[sl].astype(np.int64), 'support_index': s[sl].astype(np.int64), 'labels': l[sl]}


# %% [markdown]
# Equal classes: every batch has `min(B, classes)` distinct classes, counts within one of each other.
# A copy restored from a saved position gives the same next batches:

# %%
_rows = [np.arange(60) + 60 * c for c in range(7)]
it = EpisodeBatches(_rows, batch_size=16, seed=3)
for _ in range(3 * it.batches_per_epoch):
    b = next(it); cnt = np.bincount(b['labels'], minlength=7)
    test_eq((cnt > 0).sum(), 7); assert cnt.max() - cnt.min() <= 1
    assert (b['support_index'] // 60 == b['labels'][:, None]).all()
st = it.state(); want = [next(it) for _ in range(30)]
it2 = EpisodeBatches(_rows, batch_size=16, seed=3); it2.restore(st)
for w in want: same(next(it2), w)
test_eq(EpisodeBatches(_rows, 16, seed=3).batches_per_epoch, 7 * 60 // 16)

# %% [markdown]
# A trainer that prefetches has drawn batches ahead of the step it checkpoints, so `state()` is ahead too.
# The position is a function of the number of batches consumed: save `state_at(step)`.

# %%
it = EpisodeBatches(_rows, batch_size=16, seed=3)
drawn = [next(it) for _ in range(40)]                       # 40 drawn, 30 consumed
it3 = EpisodeBatches(_rows, batch_size=16, seed=3); it3.restore(it.state_at(30))
for w in drawn[30:]: same(next(it3), w)
test_eq(it.state_at(40), it.state())


# %% [markdown]
# Validation uses fixed episodes: the seed's fixed table over the validation classes, interleaved once.

# %%
#| export
def validation_batches(class_rows: Sequence[np.ndarray], batch_size: int, n_batches: int, shots: int = 5,
                       num_sets: int = 10, seed: int = 0) -> list[dict]:
    "The same `n_batches` stratified batches every time (the fixed table, one interleaving)."
    it = EpisodeBatches(class_rows, batch_size, shots, 'fixed', seed, num_sets)
    return [next(it) for _ in range(min(n_batches, it.batches_per_epoch))]


# %%
v1, v2 = validation_batches(_rows, 16, 3), validation_batches(_rows, 16, 3)
test_eq(len(v1), 3)
for a, b in zip(v1, v2): same(a, b)


# %% [markdown]
# ## From indices to a host batch
#
# The feature store holds per row an L2-normalised embedding (N, D) and the VAE posterior of the image and
# of its mirror, `moments` (N, 2, 2, h, w, c) = [mirror][mean, logvar], all float16 (see `fsdit.features`).
# A host batch is a few fancy-indexing reads of those (memory-mapped) arrays: the targets' moments, the
# supports' embeddings and the supports' posterior means (unmirrored), which the sample grid and the
# conditionings that see support images need. The posterior sample, the mirror choice and the support mean
# happen on the device, inside the step. `latents_at` is the one reader of that layout's posterior means
# (`fsdit.features.Store.latents` gives them as float32).

# %%
#| export
def latents_at(moments, rows=slice(None)):
    "The unmirrored posterior means at `rows` of `moments` (N, 2, 2, h, w, c): the latents (pixel space: the images)."
    return moments[rows, 0, 0]


def host_batch(embeds: np.ndarray, moments: np.ndarray, idx: dict) -> dict:
    "Gather a batch from the store arrays for the index batch `idx` (from `EpisodeBatches`)."
    t, s = idx['target_index'], idx['support_index']                # (B,), (B, K)
    return {'moments': np.asarray(moments[t]),                      # (B, 2, 2, h, w, c)
            'support_embeds': np.asarray(embeds[s.reshape(-1)]).reshape(*s.shape, -1),   # (B, K, D)
            'target_embeds': np.asarray(embeds[t]),                  # (B, D): the representation loss's target
            'support_latents': np.asarray(latents_at(moments, s.reshape(-1))).reshape(*s.shape, *moments.shape[-3:]),
            'labels': idx['labels'].astype(np.int32), 'target_index': t.astype(np.int64)}


# %%
_N, _D = 7 * 60, 8
_emb = np.random.RandomState(0).randn(_N, _D).astype(np.float16)
_mom = np.random.RandomState(1).randn(_N, 2, 2, 4, 4, 3).astype(np.float16)
test_eq(latents_at(_mom, [4, 2]), _mom[[4, 2], 0, 0]); test_eq(latents_at(_mom).shape, (_N, 4, 4, 3))
hb = host_batch(_emb, _mom, want[0])
test_eq({k: (v.shape, v.dtype.name) for k, v in hb.items()},
        {'moments': ((16, 2, 2, 4, 4, 3), 'float16'), 'support_embeds': ((16, 5, 8), 'float16'),
         'target_embeds': ((16, 8), 'float16'),
         'labels': ((16,), 'int32'), 'target_index': ((16,), 'int64'), 'support_latents': ((16, 5, 4, 4, 3), 'float16')})
test_eq(hb['support_latents'][3, 2], _mom[want[0]['support_index'][3, 2], 0, 0])
test_eq(hb['target_embeds'][5], _emb[want[0]['target_index'][5]])


# %% [markdown]
# ## Per process
#
# On several hosts each process reads only its contiguous share of the global batch (process `p` of `P`
# takes rows `p*B/P ... (p+1)*B/P`), so global example `i` is the same episode however many processes
# run. (Laying a share out over the local devices is the trainer's step.)

# %%
#| export
def process_share(idx: dict, process_index: int = 0, process_count: int = 1) -> dict:
    "This process's contiguous share of a global index batch."
    B = len(idx['target_index'])
    if B % process_count: raise ValueError(f"batch size {B} does not split over {process_count} processes: use a multiple of {process_count}")
    n = B // process_count
    return {k: v[process_index * n:(process_index + 1) * n] for k, v in idx.items()}


# %%
sh = [process_share(want[0], p, 4) for p in range(4)]
test_eq(np.concatenate([s['target_index'] for s in sh]), want[0]['target_index'])
for k in hb: test_eq(np.concatenate([host_batch(_emb, _mom, s)[k] for s in sh]), hb[k])
raises(lambda: process_share(want[0], 0, 3), 'does not split over 3 processes')


# %% [markdown]
# ## The episode source
#
# The trainer reads episodes through a small source object: `batches(position)` yields this process's
# share of each global batch together with the data position after it (`{'epoch', 'offset'}`, saved with
# every checkpoint), and `val_batches()` the fixed validation episodes. `EpisodeSource` builds both from
# store arrays — the feature store's memory-mapped files or arrays in memory. It also carries the space
# (`'latent'` or `'pixel'`) and the `fsdit.utils.LatentScaling` between the store's posterior latents and
# the model's space (the VAE's scaling factor; 1 in pixel space), which `fsdit.features.store_source` takes
# from the store. `check()` refuses, before a run writes anything, settings the classes cannot meet.

# %%
#| export
class EpisodeSource:
    "Train and validation episode batches gathered from store arrays, this process's share only."
    def __init__(self, embeds, moments, train_rows, val_rows, tc: TrainConfig, space: str = 'latent',
                 val_batches: int = 2, names: dict | None = None, scaling: LatentScaling = LatentScaling()):
        self.embeds, self.moments, self.train_rows, self.val_rows = embeds, moments, train_rows, val_rows
        self.tc, self.space, self.n_val, self.scaling = tc, space, val_batches, scaling
        self.names = names or {}   # class names per split, for messages

    def check(self):
        "Raise `ValueError` naming the setting when the classes cannot make the episodes it asks for."
        tc, need = self.tc, self.tc.shots + 1
        for split, rows in (('train', self.train_rows), ('val', self.val_rows)):
            if not len(rows): raise ValueError(f"the store has no {split} classes: run `fsdit prepare` with {split} classes")
            small = sorted((len(r), i) for i, r in enumerate(rows) if len(r) < need)
            if small:
                n, i = small[0]; name = self.names.get(split, [])[i] if i < len(self.names.get(split, [])) else f"#{i}"
                raise ValueError(f"shots {tc.shots} needs {need} images per class (a target and {tc.shots} supports), but "
                                 f"{len(small)} {split} class(es) have fewer (the smallest, {name!r}, has {n}): "
                                 f"use --shots {n - 1} or less, or classes with more images")
        EpisodeBatches(self.train_rows, tc.batch_size, tc.shots, tc.episodes, tc.seed)   # an epoch must fill a batch

    def _gather(self, idx: dict) -> dict:
        return host_batch(self.embeds, self.moments, process_share(idx, jax.process_index(), jax.process_count()))

    def batches(self, position: dict | None = None) -> Iterator[tuple[dict, dict]]:
        "(batch, position after it) forever, starting at `position` (None: the beginning)."
        tc = self.tc
        it = EpisodeBatches(self.train_rows, tc.batch_size, tc.shots, tc.episodes, tc.seed)
        if position: it.restore(position)
        for idx in it: yield self._gather(idx), it.state()

    def val_batches(self) -> list[dict]:
        "The fixed validation batches (the same episodes every call)."
        return [self._gather(i) for i in validation_batches(self.val_rows, self.tc.batch_size, self.n_val, self.tc.shots, seed=self.tc.seed)]


# %% [markdown]
# Five classes train and two validate; a saved position gives the next batch again, and 12 shots from
# classes of 60 images would be fine, while 70 are refused naming the setting:

# %%
from fsdit.config import train_config
_tc = train_config('test', batch_size=16)
src = EpisodeSource(_emb, _mom, _rows[:5], _rows[5:], _tc, 'pixel', names={'train': list('abcde')})
test_eq((src.space, src.scaling), ('pixel', LatentScaling(1.0)))
it = src.batches()
(b1, p1), (b2, p2) = next(it), next(it)
test_eq(b1['support_latents'].shape, (16, 5, 4, 4, 3)); assert (b1['labels'] < 5).all()
same(next(src.batches(p1))[0], b2)                                    # restarting at a saved position
test_eq(len(src.val_batches()), 2); same(src.val_batches()[1], src.val_batches()[1])
src.check()
raises(EpisodeSource(_emb, _mom, _rows[:5], _rows[5:], train_config('test', shots=70), names={'train': list('abcde')}).check,
       "shots 70 needs 71 images per class (a target and 70 supports), but 5 train class(es) have fewer (the smallest, 'a', has 60)")


# %% [markdown]
# ## Devices
#
# `device_sharding` splits a leading axis over the local devices (the mesh of `fsdit.utils.data_mesh`);
# `fsdit.features` uses it to spread each encoder batch over them.

# %%
#| export
def device_sharding(devices=None):
    "A sharding that splits the leading (device) axis over `devices` (default: the local devices)."
    from jax.sharding import NamedSharding, PartitionSpec
    return NamedSharding(data_mesh(devices), PartitionSpec(DATA_AXIS))


# %%
_n = jax.local_device_count()
_a = jax.device_put(np.arange(4 * _n).reshape(_n, 4), device_sharding())
test_eq(len(_a.sharding.device_set), _n); test_eq([s.data.shape for s in _a.addressable_shards], [(1, 4)] * _n)


# %% [markdown]
# ## Encoding images
#
# The frozen encoders turn uint8 images into what the store holds. `encode_images` is the one path used
# both by `fsdit.features.precompute` (every image once) and by `online_batch` (small runs, the explorer):
# images are scaled to [-1, 1] by `to_unit`; `embed` gives (n, D), L2-normalised here; `moments` gives the posterior
# `(mean, logvar)` of the images and of their mirrors in one call (L2 normalisation is `fsdit.utils.l2_normalize`).

# %%
#| export
def encode_images(images: np.ndarray, embed: Callable, moments: Callable) -> tuple[np.ndarray, np.ndarray]:
    "uint8 (n, H, W, 3) -> embeds (n, D) float16 L2-normalised, moments (n, 2, 2, h, w, c) float16."
    x = to_unit(images)                                                 # [-1, 1], as SigLIP and the VAE expect
    e = l2_normalize(np.asarray(embed(x), np.float32))
    mean, logvar = moments(np.concatenate([x, x[:, :, ::-1]]))          # image and mirror, one call
    mean, logvar = np.asarray(mean, np.float32), np.asarray(logvar, np.float32)
    n = len(x)
    m = np.stack([np.stack([mean[:n], logvar[:n]], 1), np.stack([mean[n:], logvar[n:]], 1)], 1)
    return e.astype(np.float16), m.astype(np.float16)


def online_batch(paths: Sequence, idx: dict, embed: Callable, moments: Callable, image_size: int) -> dict:
    "The host batch of `host_batch`, computed from the image files through the encoders."
    t, s = idx['target_index'], idx['support_index']
    rows = np.unique(np.concatenate([t, s.reshape(-1)]))                # each image once
    imgs = np.stack([load_image(paths[r], image_size) for r in rows])
    e, m = encode_images(imgs, embed, moments)
    where = np.searchsorted(rows, np.arange(rows.max() + 1))            # store row -> position in `rows`
    return host_batch(e, m, {**idx, 'target_index': where[t], 'support_index': where[s]}) | {
        'target_index': t.astype(np.int64)}


# %% [markdown]
# With toy encoders (mean colour as the embedding, the image itself as a posterior with log-variance -30)
# the store rows hold the image and its mirror, and the batch computed from the files equals the batch
# gathered from a store of the same encoders:

# %%
_embed = lambda x: np.asarray(x).mean((1, 2))                           # (n, 3)
_moments = lambda x: (x, np.full_like(x, -30.0))
_files = [list_images(_root / 'split' / 'train' / c) for c in list_classes(_root / 'split' / 'train')]
_paths = sum(_files, [])
_E, _M = encode_images(np.stack([load_image(p, 8) for p in _paths]), _embed, _moments)
_X, _y = folder_images(_root / 'split' / 'train', 8)                  # the same images, in [-1, 1], with class indices
test_eq(_X, to_unit(np.stack([load_image(p, 8) for p in _paths]))); test_eq(_y, np.repeat(np.arange(len(_files)), [len(f) for f in _files]))
(_root / 'empty').mkdir(exist_ok=True); test_fail(lambda: folder_images(_root / 'empty'), contains='no images under')
test_eq((_E.shape, _E.dtype, _M.shape), ((len(_paths), 3), np.float16, (len(_paths), 2, 2, 8, 8, 3)))
test_close(np.linalg.norm(_E.astype(np.float32), axis=-1), 1, eps=1e-2)
test_close(_M[0, 1, 0], _M[0, 0, 0][:, ::-1], eps=1e-3)
_cr = np.split(np.arange(len(_paths)), np.cumsum([len(f) for f in _files])[:-1])   # each class's rows
_idx = next(EpisodeBatches(_cr, 4, seed=0))
ob, sb = online_batch(_paths, _idx, _embed, _moments, 8), host_batch(_E, _M, _idx)
for k in sb: test_close(ob[k].astype(np.float32), sb[k].astype(np.float32), eps=2e-3)
