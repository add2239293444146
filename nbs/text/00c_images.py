# %% [markdown]
# # Images
#
# > One way to turn model outputs into pictures: float images in [-1, 1] to uint8, grids of rows, PNG files.

# %%
#| default_exp images

# %%
#| export
from __future__ import annotations
from pathlib import Path
import numpy as np

# %%
import tempfile
from fastcore.test import test_eq, test_fail


# %% [markdown]
# ## From [-1, 1] to uint8
#
# Every image the package produces (decoded latents, pixel-space samples) lives in [-1, 1]. `to_uint8` maps
# it to 0..255 with rounding and clipping; uint8 input passes through, so callers need not know which they
# hold. `rgb=True` is for pictures: a gray image is repeated to three channels, and a latent with another
# channel count (4 for the SD-VAE) shows its first three, min-max scaled per image.

# %%
#| export
def to_uint8(images, rgb: bool = False) -> np.ndarray:
    "Images (N, H, W, C), float in [-1, 1] or uint8 -> uint8; `rgb`: three channels for display."
    x = np.asarray(images)
    if rgb and x.shape[-1] not in (1, 3):
        x = x[..., :3].astype(np.float32); lo, hi = x.min((1, 2, 3), keepdims=True), x.max((1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-6) * 2 - 1
    if x.dtype != np.uint8: x = np.round((np.clip(x.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)
    return np.repeat(x, 3, -1) if rgb and x.shape[-1] == 1 else x


# %%
x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], np.float32).reshape(1, 1, 6, 1)
test_eq(to_uint8(x).ravel().tolist(), [0, 64, 128, 191, 255, 255])       # rounded, clipped
test_eq(to_uint8(x).shape, (1, 1, 6, 1)); test_eq(to_uint8(x, rgb=True).shape, (1, 1, 6, 3))
u = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
assert to_uint8(u) is not None and np.array_equal(to_uint8(u), u)          # uint8 passes through
lat = np.random.default_rng(0).normal(size=(2, 4, 4, 4))                   # an SD-VAE latent: first 3 channels, min-max
r = to_uint8(lat, rgb=True); test_eq(r.shape, (2, 4, 4, 3)); test_eq((r.min(), r.max()), (0, 255))


# %% [markdown]
# ## Grids
#
# `image_grid` lays rows of equally sized images out on white, with a gap after each image. The two
# layouts the package shows are built on it: `support_grid` (the supports on top, the samples below, as
# `fsdit sample` writes them) and `class_rows_grid` (one row per class: its supports, a gap, its samples; the demo writes it enlarged 4x under a
# header that names the two parts, so a character is not 16 screen pixels).

# %%
#| export
def image_grid(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    "Rows of uint8 images [(N, H, W, 3), ...] -> one (R*(H+gap), N*(W+gap), 3) picture."
    padded = [np.pad(r, ((0, 0), (0, gap), (0, gap), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate([np.concatenate(list(r), 1) for r in padded], 0)


def support_grid(supports, samples, ncol: int | None = None) -> np.ndarray:
    "uint8 grid: the supports (K, H, W, 3) uint8 on the top row, the samples (N, H, W, C) in [-1, 1] below."
    from PIL import Image
    s = to_uint8(samples, rgb=True)                                          # (N, H, W, 3)
    H, W = s.shape[1:3]
    sup = np.stack([np.asarray(Image.fromarray(im).resize((W, H), Image.BICUBIC)) if im.shape[:2] != (H, W) else im
                    for im in to_uint8(supports, rgb=True)])
    ncol = ncol or max(len(sup), min(len(s), 8))
    white = lambda k: np.full((k, H, W, 3), 255, np.uint8)
    rows = [np.concatenate([sup[:ncol], white(max(0, ncol - len(sup)))])]
    for i in range(0, len(s), ncol): rows.append(np.concatenate([s[i:i + ncol], white(ncol - len(s[i:i + ncol]))]))
    return image_grid(rows)


def class_rows_grid(supports: list, samples: list, gap: int = 8, scale: int = 1,
                    titles: tuple[str, str] | None = None) -> np.ndarray:
    """One row per class: supports (K, H, W, 3) uint8, a white gap, samples (N, H, W, 3) uint8; enlarged `scale`
    times (nearest neighbour) and, with `titles`, a header naming the supports' part and the samples' part."""
    rows = []
    for sup, gen in zip(supports, samples):
        H, W = sup.shape[1:3]
        row = np.concatenate([np.concatenate(list(sup), 1), np.full((H, gap, 3), 255, np.uint8),
                              np.concatenate(list(gen), 1)], 1)
        rows.append(row[None])
    grid = enlarge(image_grid(rows), scale)
    if titles is None: return grid
    K, W = len(supports[0]), supports[0].shape[2]
    return titled(grid, [(0, titles[0]), (scale * (K * W + gap), titles[1])])


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    "`image` (H, W, C) shown `scale` times larger, each pixel a `scale` x `scale` block (no smoothing)."
    return np.repeat(np.repeat(image, scale, 0), scale, 1) if scale > 1 else image


def titled(grid: np.ndarray, parts: list[tuple[int, str]], size: int = 16) -> np.ndarray:
    "`grid` (H, W, 3) uint8 under a white header band that writes each `(x, text)` of `parts` starting at column x."
    from PIL import Image, ImageDraw, ImageFont
    try: font = ImageFont.load_default(size=size)            # scalable with FreeType (Pillow >= 10.1)
    except TypeError: font = ImageFont.load_default()
    band = Image.new('RGB', (grid.shape[1], size + 10), 'white')
    draw = ImageDraw.Draw(band)
    for x, text in parts: draw.text((x + 2, 4), text, fill='black', font=font)
    return np.concatenate([np.asarray(band), grid], 0)


# %%
ims = np.zeros((3, 4, 5, 3), np.uint8)
test_eq(image_grid([ims, ims]).shape, (2 * (4 + 2), 3 * (5 + 2), 3))
g = support_grid(np.zeros((2, 8, 8, 3), np.uint8), -np.ones((5, 4, 4, 1)), ncol=4)   # supports resized to the samples
test_eq(g.shape, (3 * (4 + 2), 4 * (4 + 2), 3))
test_eq(g[:4, :4].max(), 0); test_eq(g[:4, 12:16].min(), 255)      # the top row: 2 supports, then white
test_eq(class_rows_grid([ims[:2]], [ims]).shape, (4 + 2, 5 * 5 + 8 + 2, 3))
big = class_rows_grid([ims[:2]], [ims], scale=4, titles=('supports', 'samples'))   # as the demo writes its grids
test_eq(big.shape[1:], (4 * (5 * 5 + 8 + 2), 3)); assert big.shape[0] > 4 * (4 + 2)   # 4x, plus the header band
test_eq(big[-4 * 6:-4 * 2, :4 * 5].max(), 0)                         # the first support: one black 20x16 block
hdr = big[:-4 * 6]
assert hdr[:, :4 * 12].min() < 128 and hdr[:, 4 * 18:].min() < 128   # ink in the header over each part
test_eq(enlarge(np.arange(4, dtype=np.uint8).reshape(2, 2, 1), 2)[:, :, 0].tolist(), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


# %% [markdown]
# `label_rows` writes a name beside each row of a grid (PIL's built-in font), so a picture says what each
# row is without a caption.

# %%
#| export
def label_rows(grid: np.ndarray, labels: list[str], row_height: int) -> np.ndarray:
    "`grid` (H, W, 3) uint8 with a white column on its left naming each `row_height`-pixel row."
    from PIL import Image, ImageDraw
    col = Image.new('RGB', (6 * max(map(len, labels), default=0) + 6, grid.shape[0]), 'white')
    draw = ImageDraw.Draw(col)
    for i, text in enumerate(labels): draw.text((2, i * row_height + max(0, row_height // 2 - 6)), text, fill='black')
    return np.concatenate([np.asarray(col), grid], 1)


# %%
lg = label_rows(image_grid([ims, ims]), ['target', 'CFG 3'], 4 + 2)
test_eq(lg.shape[0], 12); assert lg.shape[1] > 21 and (lg[:, :lg.shape[1] - 21] < 255).any()   # text drawn in the column


# %% [markdown]
# `save_png` writes a uint8 picture, making its folder first.

# %%
#| export
def save_png(image: np.ndarray, path) -> Path:
    "Write a uint8 image to `path` (parents made)."
    from PIL import Image
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# %%
from PIL import Image
with tempfile.TemporaryDirectory() as d:
    p = save_png(g, Path(d) / 'a' / 'grid.png')
    test_eq(np.asarray(Image.open(p)), g)
