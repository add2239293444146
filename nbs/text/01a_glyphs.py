# %% [markdown]
# # Glyphs
#
# > A small real dataset that runs offline: characters as classes, the fonts matplotlib ships as images, rendered with a little jitter and laid out like miniImageNet.

# %%
#| default_exp glyph.data

# %%
#| export
from __future__ import annotations
import functools, json, os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from fsdit.utils import l2_normalize
from fsdit.files import building

# %%
import tempfile as _tf
from fastcore.test import test_eq
from fsdit.data import SPLITS, list_images, load_image, prepare

from fsdit.testing import raises

_root = Path(_tf.mkdtemp())

# %% [markdown]
# ## Why glyphs
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


def _glyph_ink(ch: str, font: str, size: int, shift=(0.0, 0.0), scale: float = 1.0, angle: float = 0.0,
               stroke: int = 0) -> np.ndarray:
    "The ink of one character: uint8 (size, size), 255 where the stroke is, rendered at 4x and downsampled."
    from PIL import ImageDraw, ImageFont
    S = 4 * size                                            # render large, then downsample (antialiasing)
    f = ImageFont.truetype(_font_path(font), int(0.6 * S * scale))
    im = Image.new('L', (S, S), 0)
    ImageDraw.Draw(im).text((S / 2 + shift[0] * S, S / 2 + shift[1] * S), ch, fill=255, font=f, anchor='mm')
    if stroke: im = im.filter(ImageFilter.MaxFilter(2 * stroke + 1))
    im = im.rotate(angle, resample=Image.BICUBIC)
    return np.asarray(im.resize((size, size), Image.LANCZOS), np.uint8)


def render_glyph(ch: str, font: str, size: int = 32, shift=(0.0, 0.0), scale: float = 1.0, angle: float = 0.0,
                 stroke: int = 0, ink=None, paper=None) -> np.ndarray:
    """One character in one matplotlib font, jittered as asked: uint8 (size, size) dark on white, or with `ink` and
    `paper` colours (RGB triples, 0..255) uint8 (size, size, 3)."""
    a = _glyph_ink(ch, font, size, shift, scale, angle, stroke)
    if ink is None and paper is None: return 255 - a
    a = a[..., None].astype(np.float32) / 255
    rgb = (1 - a) * np.asarray(paper, np.float32) + a * np.asarray(ink, np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# %% [markdown]
# A rendered glyph is dark on white, and a heavier stroke inks more pixels:

# %%
g = render_glyph('A', 'DejaVuSans', 32)
test_eq((g.shape, g.dtype), ((32, 32), np.uint8))
assert g.min() < 50 and g[0, 0] == 255 and (g < 128).mean() > 0.05        # dark glyph on white
assert (render_glyph('A', 'DejaVuSans', 32, stroke=2) < 128).sum() > (g < 128).sum()


# %% [markdown]
# A class folder is named after its character and gives it back; not every font draws every character:

# %%
#| export
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


# %%
test_eq(glyph_name('λ'), 'u03bb_greek_small_letter_lamda'); test_eq(glyph_char(glyph_name('λ')), 'λ')
assert 'DejaVuSans' in glyph_fonts('λ') and set(glyph_fonts('A')) == set(GLYPH_FONTS)


# %% [markdown]
# Each image of a class gets its own random jitter, and the images cycle through the fonts that draw the character:

# %%
#| export
def glyph_jitter(rng: np.random.RandomState) -> dict:
    "One image's random jitter: shift, scale, rotation and (a quarter of the time) a heavier stroke."
    return dict(shift=tuple(rng.uniform(-0.06, 0.06, 2)), scale=rng.uniform(0.85, 1.1),
                angle=rng.uniform(-10, 10), stroke=int(rng.rand() < 0.25))


def _luma(rgb) -> float: return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def unaligned_jitter(rng: np.random.RandomState, min_contrast: float = 96.0) -> dict:
    """One image of the unaligned style: the character anywhere in the frame at about half to the full side,
    rotated up to 25 degrees either way, in a random ink on a random paper whose brightness differs by `min_contrast`."""
    scale = rng.uniform(0.85, 1.6)                          # font size 0.5-0.96 of the side (1.0 = the aligned style)
    room = max(0.0, 0.5 - 0.3 * scale)                      # the centre may move this far (of the side) and keep the glyph in
    shift = tuple(rng.uniform(-room, room, 2))
    angle, stroke = rng.uniform(-25, 25), int(rng.rand() < 0.25)
    while True:
        ink, paper = rng.randint(0, 256, 3), rng.randint(0, 256, 3)
        if abs(_luma(ink) - _luma(paper)) >= min_contrast: break
    return dict(shift=shift, scale=scale, angle=angle, stroke=stroke, ink=tuple(map(int, ink)), paper=tuple(map(int, paper)))


GLYPH_STYLES = {'aligned': glyph_jitter, 'unaligned': unaligned_jitter}


def render_class(ch: str, n: int, size: int, rng: np.random.RandomState, fonts: Sequence[str] = GLYPH_FONTS,
                 style: str = 'aligned'):
    """`n` images of `ch` in `style`, cycling through the fonts that draw it, and their fonts: 'aligned' gives
    (n, size, size) gray, centred; 'unaligned' gives (n, size, size, 3) RGB, placed and coloured at random."""
    if style not in GLYPH_STYLES: raise ValueError(f"unknown glyph style {style!r}; choose one of {sorted(GLYPH_STYLES)}")
    have = glyph_fonts(ch, fonts)
    names = [have[i % len(have)] for i in range(n)]
    return np.stack([render_glyph(ch, f, size, **GLYPH_STYLES[style](rng)) for f in names]), names


def render_set(chars: str, per_class: int, size: int, seed: int, style: str = 'unaligned') -> tuple[np.ndarray, np.ndarray]:
    "`per_class` images in [-1, 1] of each of `chars` in `style` from one seeded stream, and their class indices."
    rng = np.random.RandomState(seed)
    X = np.concatenate([render_class(ch, per_class, size, rng, GLYPH_FONTS, style)[0] for ch in chars])
    return X.astype(np.float32) / 127.5 - 1, np.repeat(np.arange(len(chars)), per_class)


# %%
_j = glyph_jitter(np.random.RandomState(0))
test_eq(sorted(_j), ['angle', 'scale', 'shift', 'stroke'])
_a, _f = render_class('A', 3, 16, np.random.RandomState(0), fonts=GLYPH_FONTS[:2])
test_eq((_a.shape, _f), ((3, 16, 16), ['DejaVuSans', 'DejaVuSans-Bold', 'DejaVuSans']))
_X, _y = render_set('AB', 2, 24, seed=0)                         # a training set for the stand-in towers
test_eq((_X.shape, _X.dtype, list(_y)), ((4, 24, 24, 3), np.float32, [0, 0, 1, 1]))
assert -1 <= _X.min() and _X.max() <= 1

# %% [markdown]
# Photographs of one class do not line up: the object sits at different places and sizes, on different
# backgrounds. The `'unaligned'` style gives the glyphs the same trouble: each image puts its character
# anywhere in the frame, at half to the full side, turned up to 25 degrees, in a random ink on a random paper
# (their brightness at least 96 levels apart, so the character stays legible). Five supports of a class then
# share no pixel layout, and their per-position mean is a blur:

# %%
_u, _ = render_class('A', 64, 24, np.random.RandomState(0), style='unaligned')
test_eq((_u.shape, _u.dtype), ((64, 24, 24, 3), np.uint8))
_c = np.array([_u[i, 0, 0] for i in range(64)], np.float32)                 # the corners are paper
assert _c.std(0).min() > 40                                                 # papers differ from image to image
_al, _ = render_class('A', 64, 24, np.random.RandomState(0))
_ink = lambda x: np.abs(x.astype(np.float32) - x[:, :1, :1].astype(np.float32)).mean(-1) if x.ndim == 4 else 255. - x
_corr = lambda x: np.corrcoef(_ink(x).reshape(len(x), -1))[np.triu_indices(len(x), 1)].mean()
assert _corr(_u) < 0.6 * _corr(_al), (_corr(_al), _corr(_u))                # unaligned inks overlap far less than aligned ones
raises(lambda: render_class('A', 2, 32, np.random.RandomState(0), style='tilted'), 'unknown glyph style')

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
        v = l2_normalize((ink - ink.mean()).ravel())
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
                         fonts: Sequence[str] = GLYPH_FONTS, style: str = 'aligned') -> dict[str, int]:
    "Write the glyph dataset in `style` flat into `dst/<class>/*.png` (atomic; a complete `dst` is reused); class -> images."
    dst = Path(dst)
    if (dst / 'glyphs.json').exists():
        meta = json.loads((dst / 'glyphs.json').read_text())
        if meta.get('style', 'aligned') != style:
            raise FileExistsError(f"{dst} holds {meta.get('style', 'aligned')} glyphs, not {style}: choose another folder")
        return meta['classes']
    if style not in GLYPH_STYLES: raise ValueError(f"unknown glyph style {style!r}; choose one of {sorted(GLYPH_STYLES)}")
    if dst.exists() and any(dst.iterdir()): raise FileExistsError(f"{dst} exists and is not a glyph dataset: choose another folder")
    rng, counts = np.random.RandomState(seed), {}
    with building(dst) as tmp:                                    # a complete dataset or none
        for ch in chars:
            if len(glyph_fonts(ch, fonts)) < 4: continue         # too few typefaces to be a class
            d = tmp / glyph_name(ch); d.mkdir()
            images, names = render_class(ch, per_class, size, rng, fonts, style)
            for i, (g, font) in enumerate(zip(images, names)):
                Image.fromarray(g).save(d / f"{i:02d}_{font}.png")   # gray or RGB PNG; `load_image` gives RGB
            counts[d.name] = per_class
        (tmp / 'glyphs.json').write_text(json.dumps(dict(per_class=per_class, size=size, seed=seed, style=style, classes=counts)))
    return counts


# %% [markdown]
# Six classes of six 16 px images take a second; the same call again reuses the complete dataset, and a
# folder that holds something else is refused rather than written into:

# %%
import time
_t0 = time.time()
_gl = make_offline_dataset(_root / 'glyphs', per_class=6, size=16, chars=GLYPHS[:4] + 'λ€')
test_eq(len(_gl), 6); test_eq(len(list_images(_root / 'glyphs' / glyph_name('λ'))), 6)
test_eq(load_image(next((_root / 'glyphs' / glyph_name('0')).iterdir())).shape, (16, 16, 3))
test_eq(make_offline_dataset(_root / 'glyphs'), _gl)                        # reused, not rebuilt
assert time.time() - _t0 < 10
(_root / 'notes').mkdir(); (_root / 'notes' / 'todo.txt').write_text('x')
raises(lambda: make_offline_dataset(_root / 'notes'), 'is not a glyph dataset')
test_eq(sorted(p.name for p in _root.iterdir()), ['glyphs', 'notes'])        # no partial folder left
raises(lambda: make_offline_dataset(_root / 'glyphs', style='unaligned'), 'holds aligned glyphs')
_ug = make_offline_dataset(_root / 'glyphs_u', per_class=6, size=24, chars='AB', style='unaligned')
_im = load_image(next((_root / 'glyphs_u' / glyph_name('B')).iterdir()))
test_eq(_im.shape, (24, 24, 3)); assert _im.std((0, 1)).max() > 10          # colour on colour


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
test_eq(offline_split_sizes(130), dict(train=91, val=13, test=26))
m = prepare(_root / 'glyphs', _root / 'glyph_split', **offline_split_sizes(6), seed=0)
test_eq([len(m['classes'][k]) for k in SPLITS], [4, 1, 1])
