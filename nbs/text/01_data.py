# %% [markdown]
# # Data
#
# > From a flat folder of class folders to a device batch: the class split, image loading, episodes, stratified batches that can resume exactly, and a small real dataset that runs offline.

# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import argparse, dataclasses, functools, json, os, shutil, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter

from fsdit.config import TrainConfig

# %%
import tempfile as _tf
from fastcore.test import test_eq, test_fail, test_close

def raises(f, match, exc=Exception):
    "Assert that `f()` raises `exc` with `match` in its message; return the message."
    try: f()
    except exc as e:
        assert match in str(e), f"{match!r} not in {e!r}"; return str(e)
    raise AssertionError('no error raised')

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


def partial_dir(dst: Path) -> Path:
    "A new hidden sibling `.NAME.partial-XXXX` of `dst` to build it in, with the permissions `mkdir` gives (not mkdtemp's 0700)."
    tmp = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.partial-', dir=dst.parent))
    mask = os.umask(0); os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


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


# %% [markdown]
# `prepare` scans before it writes, builds the split in a hidden folder beside `dst` and renames it into
# place at the end, so a refused or failed run leaves nothing half-made. The arguments are recorded in
# `dst/prepare.json`: the same call again is a no-op, a different split into an existing `dst` is refused.

# %%
#| export
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
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(dst)
    try:
        _build(tmp, splits, good, copy)
        (tmp / 'prepare.json').write_text(json.dumps(manifest, indent=1))
        if dst.exists(): dst.rmdir()                       # an empty folder is replaced
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise
    return manifest


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


# %%
#| export
def prepare_cli(argv: list[str]) -> int:
    "`fsdit prepare`: split a flat class-folder dataset by class."
    p = argparse.ArgumentParser(prog='fsdit prepare', description=prepare.__doc__)
    p.add_argument('--src', required=True, help='folder of class folders (flat miniImageNet)')
    p.add_argument('--dst', required=True, help='output: DST/{train,val,test}/<class>/')
    p.add_argument('--train', type=int, default=60); p.add_argument('--val', type=int, default=16)
    p.add_argument('--test', type=int, default=20); p.add_argument('--seed', type=int, default=42)
    p.add_argument('--split', choices=('seed', 'ravi'), default='seed',
                   help="'seed': the seed's RandomState permutation; 'ravi': the standard 64/16/20 lists")
    p.add_argument('--copy', action='store_true', help='copy the images instead of symlinking them')
    a = p.parse_args(argv)
    try: m = prepare(a.src, a.dst, a.train, a.val, a.test, a.seed, a.split, a.copy)
    except (ValueError, FileExistsError) as e:
        print(f"fsdit prepare: {e}"); return 1
    for k, v in m['counts'].items(): print(f"{k}: {len(v)} classes, {sum(v.values())} images")
    for path, why in m['skipped']: print(f"skipped {path}: {why}")
    return 0


# %%
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()) as out:
    test_eq(prepare_cli(['--src', str(src), '--dst', str(_root / 'split'), '--train', '2', '--val', '1', '--test', '1', '--seed', '0']), 0)
assert 'train: 2 classes' in out.getvalue()


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
# A host batch is a few fancy-indexing reads of those (memory-mapped) arrays. The posterior sample, the
# mirror choice and the support mean happen on the device, inside the step.

# %%
#| export
def host_batch(embeds: np.ndarray, moments: np.ndarray, idx: dict, latents: bool = True) -> dict:
    "Gather a batch from the store arrays for the index batch `idx` (from `EpisodeBatches`)."
    t, s = idx['target_index'], idx['support_index']                # (B,), (B, K)
    out = {'moments': np.asarray(moments[t]),                       # (B, 2, 2, h, w, c)
           'support_embeds': np.asarray(embeds[s.reshape(-1)]).reshape(*s.shape, -1),   # (B, K, D)
           'labels': idx['labels'].astype(np.int32), 'target_index': t.astype(np.int64)}
    if latents:                                                     # posterior means of the supports, unmirrored
        out['support_latents'] = np.asarray(moments[s.reshape(-1), 0, 0]).reshape(*s.shape, *moments.shape[-3:])
    return out


# %%
_N, _D = 7 * 60, 8
_emb = np.random.RandomState(0).randn(_N, _D).astype(np.float16)
_mom = np.random.RandomState(1).randn(_N, 2, 2, 4, 4, 3).astype(np.float16)
hb = host_batch(_emb, _mom, want[0])
test_eq({k: (v.shape, v.dtype.name) for k, v in hb.items()},
        {'moments': ((16, 2, 2, 4, 4, 3), 'float16'), 'support_embeds': ((16, 5, 8), 'float16'),
         'labels': ((16,), 'int32'), 'target_index': ((16,), 'int64'), 'support_latents': ((16, 5, 4, 4, 3), 'float16')})
test_eq(hb['support_latents'][3, 2], _mom[want[0]['support_index'][3, 2], 0, 0])


# %% [markdown]
# ## Per process, per device
#
# On several hosts each process reads only its contiguous share of the global batch (process `p` of `P`
# takes rows `p*B/P ... (p+1)*B/P`), so global example `i` is the same episode however many processes and
# devices run. Each share is then laid out `(local_devices, B/n, ...)` and put on the devices with
# `jax.device_put` and a sharding over the local devices (no `device_put_sharded`, gone in JAX 0.10).

# %%
#| export
def process_share(idx: dict, process_index: int = 0, process_count: int = 1) -> dict:
    "This process's contiguous share of a global index batch."
    B = len(idx['target_index'])
    if B % process_count: raise ValueError(f"batch size {B} does not split over {process_count} processes")
    n = B // process_count
    return {k: v[process_index * n:(process_index + 1) * n] for k, v in idx.items()}


def per_device(batch: dict, n_devices: int) -> dict:
    "Reshape every array (B, ...) -> (n_devices, B / n_devices, ...)."
    def f(x):
        if x.shape[0] % n_devices: raise ValueError(f"batch {x.shape[0]} does not split over {n_devices} devices")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])
    return {k: f(v) for k, v in batch.items()}


# %%
sh = [process_share(want[0], p, 4) for p in range(4)]
test_eq(np.concatenate([s['target_index'] for s in sh]), want[0]['target_index'])
pd = per_device(hb, 8); test_eq(pd['moments'].shape, (8, 2, 2, 2, 4, 4, 3))
test_eq(pd['moments'].reshape(16, *pd['moments'].shape[2:]), hb['moments'])
raises(lambda: per_device(hb, 3), 'does not split over 3 devices')


# %% [markdown]
# `host_batches` chains it for a training loop: this process's share of each global batch, gathered from
# the store and laid out per local device.

# %%
#| export
def host_batches(embeds: np.ndarray, moments: np.ndarray, batches: Iterator[dict], n_devices: int,
                 process_index: int = 0, process_count: int = 1, latents: bool = True) -> Iterator[dict]:
    "Per global index batch: this process's host batch, laid out `(n_devices, B / (P * n_devices), ...)`."
    for idx in batches:
        yield per_device(host_batch(embeds, moments, process_share(idx, process_index, process_count), latents), n_devices)


# %%
hb2 = next(host_batches(_emb, _mom, iter(want[:1]), 2, process_index=1, process_count=2))
test_eq(hb2['support_embeds'].shape, (2, 4, 5, _D))
test_eq(hb2['target_index'].reshape(-1), want[0]['target_index'][8:])


# %%
#| export
def device_sharding(devices=None):
    "A sharding that splits the leading (device) axis over `devices` (default: the local devices)."
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    devices = jax.local_devices() if devices is None else devices
    return NamedSharding(Mesh(np.array(devices), ('devices',)), PartitionSpec('devices'))


def prefetch_to_device(batches: Iterator[dict], size: int = 2, sharding=None) -> Iterator[dict]:
    "Keep `size` batches (laid out by `per_device`) in flight to the devices ahead of the consumer."
    import jax, collections
    sharding = device_sharding() if sharding is None else sharding
    buf = collections.deque()
    def put(b): buf.append({k: jax.device_put(v, sharding) for k, v in b.items()})   # asynchronous copy
    for b in batches:
        put(b)
        if len(buf) > size: yield buf.popleft()
    while buf: yield buf.popleft()


# %%
import jax
n = jax.local_device_count()
got = list(prefetch_to_device(per_device(host_batch(_emb, _mom, w), n) for w in want[:3]))
test_eq(len(got), 3)
test_eq(np.asarray(got[2]['support_embeds']).reshape(16, 5, _D), host_batch(_emb, _mom, want[2])['support_embeds'])


# %% [markdown]
# ## Encoding images
#
# The frozen encoders turn uint8 images into what the store holds. `encode_images` is the one path used
# both by `fsdit.features.precompute` (every image once) and by `online_batch` (small runs, the explorer):
# images are scaled to [-1, 1] by `to_unit`; `embed` gives (n, D), L2-normalised here; `moments` gives the posterior
# `(mean, logvar)` of the images and of their mirrors in one call.

# %%
#| export
def encode_images(images: np.ndarray, embed: Callable, moments: Callable) -> tuple[np.ndarray, np.ndarray]:
    "uint8 (n, H, W, 3) -> embeds (n, D) float16 L2-normalised, moments (n, 2, 2, h, w, c) float16."
    x = to_unit(images)                                                 # [-1, 1], as SigLIP and the VAE expect
    e = np.asarray(embed(x), np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    mean, logvar = moments(np.concatenate([x, x[:, :, ::-1]]))          # image and mirror, one call
    mean, logvar = np.asarray(mean, np.float32), np.asarray(logvar, np.float32)
    n = len(x)
    m = np.stack([np.stack([mean[:n], logvar[:n]], 1), np.stack([mean[n:], logvar[n:]], 1)], 1)
    return e.astype(np.float16), m.astype(np.float16)


def online_batch(paths: Sequence, idx: dict, embed: Callable, moments: Callable, image_size: int,
                 latents: bool = True) -> dict:
    "The host batch of `host_batch`, computed from the image files through the encoders."
    t, s = idx['target_index'], idx['support_index']
    rows = np.unique(np.concatenate([t, s.reshape(-1)]))                # each image once
    imgs = np.stack([load_image(paths[r], image_size) for r in rows])
    e, m = encode_images(imgs, embed, moments)
    where = np.searchsorted(rows, np.arange(rows.max() + 1))            # store row -> position in `rows`
    return host_batch(e, m, {**idx, 'target_index': where[t], 'support_index': where[s]}, latents) | {
        'target_index': t.astype(np.int64)}


# %% [markdown]
# ## An offline dataset: glyphs of matplotlib's fonts
#
# Our machines reach no dataset site, and the measured experiment in the project notes shows that with
# few classes (scikit-learn's 10 digits) the model learns a lookup of class identity instead of drawing
# what the supports show. So the offline dataset has many classes: **characters as classes, fonts as
# images**, rendered from the 16 text fonts matplotlib ships (DejaVu Sans / Serif / Sans Mono and
# STIX General, each regular, bold, italic, bold italic). About 130 characters (digits, Latin, the
# Greek letters that do not look like Latin ones, symbols); each image is one font with a small
# deterministic jitter (shift, scale, rotation, stroke weight), so a class has `per_class` (24) images, at
# `size` (32) px, gray rendered to RGB PNG, laid out flat like miniImageNet (`dst/<class>/<image>.png`).
# It is real data (typefaces are drawn by people), not random noise; a character missing from a font is
# skipped for that font. 24 images make 4 disjoint sets of 6, so no image sits out an epoch.

# %%
#| export
GLYPHS = ('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
          'αβγδεζηθικλμνξπρστυφχψωΓΔΘΛΞΠΣΦΨΩ' '#$%&@?!+=<>*/\\{}[]()~^§¶£¥€ßæøðþÆØÞ')
GLYPH_FONTS = ('DejaVuSans', 'DejaVuSans-Bold', 'DejaVuSans-Oblique', 'DejaVuSans-BoldOblique',
               'DejaVuSerif', 'DejaVuSerif-Bold', 'DejaVuSerif-Italic', 'DejaVuSerif-BoldItalic',
               'DejaVuSansMono', 'DejaVuSansMono-Bold', 'DejaVuSansMono-Oblique', 'DejaVuSansMono-BoldOblique',
               'STIXGeneral', 'STIXGeneralBol', 'STIXGeneralItalic', 'STIXGeneralBolIta')


def _font_path(name: str) -> str:
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', name + '.ttf')


@functools.lru_cache(maxsize=None)
def _ft2font(path: str):
    from matplotlib.ft2font import FT2Font
    return FT2Font(path)


def _has_glyph(path: str, ch: str) -> bool: return _ft2font(path).get_char_index(ord(ch)) != 0


def render_glyph(ch: str, font: str, size: int = 32, shift=(0.0, 0.0), scale: float = 1.0, angle: float = 0.0,
                 stroke: int = 0) -> np.ndarray:
    "One character in one matplotlib font: uint8 (size, size) dark on white, jittered as asked."
    from PIL import ImageDraw, ImageFont
    S = 4 * size                                            # render large, then downsample (antialiasing)
    f = ImageFont.truetype(_font_path(font), int(0.6 * S * scale))
    im = Image.new('L', (S, S), 0)
    ImageDraw.Draw(im).text((S / 2 + shift[0] * S, S / 2 + shift[1] * S), ch, fill=255, font=f, anchor='mm')
    if stroke: im = im.filter(ImageFilter.MaxFilter(2 * stroke + 1))
    im = im.rotate(angle, resample=Image.BICUBIC)
    return 255 - np.asarray(im.resize((size, size), Image.LANCZOS), np.uint8)


def glyph_name(ch: str) -> str:
    "A folder name for a character: its code point and Unicode name."
    import unicodedata
    return f"u{ord(ch):04x}_" + unicodedata.name(ch, 'glyph').lower().replace(' ', '_').replace('-', '_')


def glyph_char(name: str) -> str:
    "The character of a `glyph_name` folder."
    return chr(int(name.split('_', 1)[0][1:], 16))


def glyph_fonts(ch: str, fonts: Sequence[str] = GLYPH_FONTS) -> list[str]:
    "The fonts of `fonts` that draw `ch`."
    return [f for f in fonts if _has_glyph(_font_path(f), ch)]


def glyph_jitter(rng: np.random.RandomState) -> dict:
    "One image's random jitter: shift, scale, rotation and (a quarter of the time) a heavier stroke."
    return dict(shift=tuple(rng.uniform(-0.06, 0.06, 2)), scale=rng.uniform(0.85, 1.1),
                angle=rng.uniform(-10, 10), stroke=int(rng.rand() < 0.25))


def render_class(ch: str, n: int, size: int, rng: np.random.RandomState, fonts: Sequence[str] = GLYPH_FONTS):
    "`n` jittered images (n, size, size) uint8 of `ch`, cycling through the fonts that draw it, and their fonts."
    have = glyph_fonts(ch, fonts)
    names = [have[i % len(have)] for i in range(n)]
    return np.stack([render_glyph(ch, f, size, **glyph_jitter(rng)) for f in names]), names


# %%
g = render_glyph('A', 'DejaVuSans', 32)
test_eq((g.shape, g.dtype), ((32, 32), np.uint8))
assert g.min() < 50 and g[0, 0] == 255 and (g < 128).mean() > 0.05        # dark glyph on white
assert (render_glyph('A', 'DejaVuSans', 32, stroke=2) < 128).sum() > (g < 128).sum()
test_eq(glyph_name('λ'), 'u03bb_greek_small_letter_lamda'); test_eq(glyph_char(glyph_name('λ')), 'λ')

# %% [markdown]
# 130 characters are few: with few classes a model can learn a lookup of class identity instead of
# drawing what the supports show (Omniglot, the classic few-shot set, has 1,623 characters). The fonts
# cover far more: 5,865 characters are drawn by at least 4 of the 16. `glyph_classes(n)` picks `n` of
# them that look different from each other: the classic set first, then the rest in a seeded random
# order, keeping a character only if its rendering (one font, `size` px, centred and unit-normalised)
# is at least `min_distance` from every character kept so far. That drops exact look-alikes (Latin A and
# Greek Alpha, Cyrillic O and Latin O), accented near-copies and marks too small or too big to read.

# %%
#| export
GLYPH_CATEGORIES = ('Lu', 'Ll', 'Lt', 'Lo', 'Nd', 'No', 'Sm', 'So', 'Sc', 'Po', 'Ps', 'Pe')


def _candidates(fonts: Sequence[str], min_fonts: int) -> list[str]:
    import unicodedata
    maps = [set(_ft2font(_font_path(f)).get_charmap()) for f in fonts]
    cps = sorted(cp for cp in set().union(*maps) if sum(cp in m for m in maps) >= min_fonts)
    return [chr(cp) for cp in cps if unicodedata.category(chr(cp)) in GLYPH_CATEGORIES]


def glyph_classes(n: int, size: int = 16, min_fonts: int = 4, min_distance: float = 0.35, seed: int = 0,
                  fonts: Sequence[str] = GLYPH_FONTS) -> str:
    "`n` characters drawn by at least `min_fonts` fonts whose renderings differ (see above), as a string."
    cands = _candidates(fonts, min_fonts); have = set(cands)
    first = [c for c in GLYPHS if c in have]
    rest = [c for c in cands if c not in set(first)]
    order = first + [rest[i] for i in np.random.RandomState(seed).permutation(len(rest))]
    kept, vecs = [], np.zeros((0, size * size), np.float32)
    for ch in order:
        ink = 1 - render_glyph(ch, glyph_fonts(ch, fonts)[0], size).astype(np.float32) / 255
        if not 0.03 < ink.mean() < 0.6: continue                       # unreadably small, or a solid block
        v = (ink - ink.mean()).ravel(); v /= np.linalg.norm(v)
        if len(kept) and np.linalg.norm(vecs - v, axis=1).min() < min_distance: continue
        kept.append(ch); vecs = np.concatenate([vecs, v[None]])
        if len(kept) == n: break
    if len(kept) < n: raise ValueError(f"only {len(kept)} distinct characters at min_distance={min_distance}; ask for fewer")
    return ''.join(kept)


# %%
_gc = glyph_classes(300)
test_eq(len(_gc), 300); test_eq(len(set(_gc)), 300)
assert _gc.startswith('0123456789') and 'Α' not in _gc                  # Greek capital Alpha looks like A
assert all(len(glyph_fonts(c)) >= 4 for c in _gc)
test_eq(glyph_classes(300), _gc)                                        # deterministic
raises(lambda: glyph_classes(20, min_distance=5.0), 'distinct characters')


# %%
#| export
def make_offline_dataset(dst, per_class: int = 24, size: int = 32, seed: int = 0, chars: str | Sequence[str] = GLYPHS,
                         fonts: Sequence[str] = GLYPH_FONTS) -> dict[str, int]:
    "Write the glyph dataset flat into `dst/<class>/*.png` (atomic; a complete `dst` is reused); class -> images."
    dst = Path(dst)
    if (dst / 'glyphs.json').exists(): return json.loads((dst / 'glyphs.json').read_text())['classes']
    if dst.exists() and any(dst.iterdir()): raise FileExistsError(f"{dst} exists and is not a glyph dataset")
    rng = np.random.RandomState(seed)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(dst)
    counts = {}
    try:
        for ch in chars:
            if len(glyph_fonts(ch, fonts)) < 4: continue         # too few typefaces to be a class
            d = tmp / glyph_name(ch); d.mkdir()
            images, names = render_class(ch, per_class, size, rng, fonts)
            for i, (g, font) in enumerate(zip(images, names)):
                Image.fromarray(g).save(d / f"{i:02d}_{font}.png")   # gray PNG; `load_image` gives RGB
            counts[d.name] = per_class
        (tmp / 'glyphs.json').write_text(json.dumps(dict(per_class=per_class, size=size, seed=seed, classes=counts)))
        if dst.exists(): dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise
    return counts


# %% [markdown]
# The held-out classes come from the same `prepare` rule as miniImageNet's:
# `prepare(dst, split, **offline_split_sizes(n_classes))`, about 70/10/20% of the classes (130 -> 91/13/26).

# %%
#| export
def offline_split_sizes(n_classes: int) -> dict[str, int]:
    "train/val/test class counts for the offline dataset: about 70/10/20%, every class used."
    val, test = max(1, n_classes // 10), max(1, n_classes // 5)
    return dict(train=n_classes - val - test, val=val, test=test)


# %%
import time
_t0 = time.time()
_gl = make_offline_dataset(_root / 'glyphs', per_class=6, size=16, chars=GLYPHS[:4] + 'λ€')
test_eq(len(_gl), 6); test_eq(len(list_images(_root / 'glyphs' / glyph_name('λ'))), 6)
test_eq(load_image(next((_root / 'glyphs' / glyph_name('0')).iterdir())).shape, (16, 16, 3))
test_eq(make_offline_dataset(_root / 'glyphs'), _gl)                        # reused, not rebuilt
assert time.time() - _t0 < 10
m = prepare(_root / 'glyphs', _root / 'glyph_split', **offline_split_sizes(6), seed=0)
test_eq([len(m['classes'][k]) for k in SPLITS], [4, 1, 1])


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
@dataclasses.dataclass(frozen=True)
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
        x = x - x.mean(-1, keepdims=True)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        e = x @ jnp.asarray(self.matrix)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6)


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    "Pixel-space stand-in for the VAE: mean = the image resized to `size`, logvar = -30."
    size: int = 32
    channels: int = 3

    @property
    def name(self) -> str: return f"pixel-{self.size}x{self.channels}"

    def moments(self, images):
        "images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, size, size, channels)."
        import jax, jax.numpy as jnp
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (self.size, self.size):
            x = jax.image.resize(x, (x.shape[0], self.size, self.size, x.shape[-1]), 'linear', antialias=True)
        if self.channels == 1: x = x.mean(-1, keepdims=True)
        return x, jnp.full_like(x, -30.0)


# %%
pe, ps = PixelEncoder(dim=16), PixelSpace(size=16)
imgs = np.stack([load_image(p, 16) for p in list_images(_root / 'glyphs' / glyph_name('0'))])
e, mo = encode_images(imgs, pe.embed, ps.moments)
test_eq((e.shape, e.dtype, mo.shape), ((6, 16), np.float16, (6, 2, 2, 16, 16, 3)))
test_close(np.linalg.norm(e.astype(np.float32), axis=-1), 1, eps=1e-2)
test_close(mo[:, 0, 0], imgs / 127.5 - 1, eps=1e-2); test_close(mo[:, 1, 0], imgs[:, :, ::-1] / 127.5 - 1, eps=1e-2)
test_eq(float(mo[0, 0, 1].max()), -30.0)
test_close(np.asarray(pe.embed(imgs / 127.5 - 1)), np.asarray(pe.embed(imgs / 127.5 - 1)))   # deterministic

# %% [markdown]
# The online batch computed from the image files equals the batch gathered from a store of the same encoders:

# %%
_paths = [p for c in list_classes(_root / 'glyph_split' / 'train') for p in list_images(_root / 'glyph_split' / 'train' / c)]
_cr = [np.arange(6) + 6 * c for c in range(4)]
_idx = next(EpisodeBatches(_cr, 8, seed=0))
_E, _M = encode_images(np.stack([load_image(p, 16) for p in _paths]), pe.embed, ps.moments)
ob, sb = online_batch(_paths, _idx, pe.embed, ps.moments, 16), host_batch(_E, _M, _idx)
for k in sb: test_close(ob[k].astype(np.float32), sb[k].astype(np.float32), eps=2e-3)


# %% [markdown]
# A pixel-space model for the offline data: 32x32x3 images, patch 4 (64 tokens), the stand-in's width.

# %%
#| export
def offline_model_config(preset: str = 'mu', size: int = 32, channels: int = 3, embed_dim: int = 64, **overrides):
    "A `ModelConfig` for the pixel-space offline dataset (`PixelSpace(size, channels)`, `PixelEncoder(embed_dim)`)."
    from fsdit.config import model_config
    return model_config(preset, **{'input_size': size, 'in_channels': channels, 'patch': 4,
                                   'support_dim': embed_dim, **overrides})


# %%
c = offline_model_config(); test_eq((c.input_size, c.in_channels, c.tokens, c.support_dim), (32, 3, 64, 64))
test_eq(offline_model_config(patch=2).tokens, 256)


# %% [markdown]
# ## The trainer's episode source
#
# The trainer reads episodes through a small source object: `batches(position)` yields this process's
# share of each global batch together with the data position after it (`{'epoch', 'offset'}`, saved with
# every checkpoint), and `val_batches()` the fixed validation episodes. `EpisodeSource` builds both from
# store arrays — the feature store's memory-mapped files or arrays in memory — with the
# resumable stratified episodes above. Each process gathers only its own rows.

# %%
#| export
class EpisodeSource:
    "Train and validation episode batches gathered from store arrays, this process's share only."
    def __init__(self, embeds, moments, train_rows, val_rows, tc: TrainConfig, space: str = 'latent',
                 val_batches: int = 2, latents: bool = True, names: dict | None = None, latent_scale: float = 1.0):
        self.embeds, self.moments, self.train_rows, self.val_rows = embeds, moments, train_rows, val_rows
        self.tc, self.space, self.n_val, self.latents = tc, space, val_batches, latents
        self.latent_scale = latent_scale   # the VAE's scaling factor the store records (1 in pixel space)
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
        import jax                                   # this module loads without jax (`fsdit prepare`)
        return host_batch(self.embeds, self.moments, process_share(idx, jax.process_index(), jax.process_count()), self.latents)

    def batches(self, position: dict | None = None) -> Iterator[tuple[dict, dict]]:
        "(batch, position after it) forever, starting at `position` (None: the beginning)."
        tc = self.tc
        it = EpisodeBatches(self.train_rows, tc.batch_size, tc.shots, tc.episodes, tc.seed)
        if position: it.restore(position)
        for idx in it: yield self._gather(idx), it.state()

    def val_batches(self) -> list[dict]:
        "The fixed validation batches (the same episodes every call)."
        return [self._gather(i) for i in validation_batches(self.val_rows, self.tc.batch_size, self.n_val, self.tc.shots, seed=self.tc.seed)]


