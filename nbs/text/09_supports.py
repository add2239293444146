# %% [markdown]
# # Sampling from support images
#
# > New images of a class from a few support images: read the image files, encode them with the run's codecs, generate with the compiled sampler (spread over every local device), and write a grid with the supports on top — `fsdit sample`.

# %%
#| default_exp supports

# %%
#| export
from __future__ import annotations
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from fsdit.codecs import Codecs
from fsdit.export import codecs_of
from fsdit.images import save_png, support_grid, to_uint8
from fsdit.run import Run, load_run
from fsdit.config import check_interval, interval_text
from fsdit.sampler import generate, check_supports
from fsdit.cli import Parser, positive_int, check_out_file, fail
from fsdit.data import check_image, load_image, list_images

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config
from fsdit.run import write_run_config, checkpoint_manager, save_checkpoint
from fsdit.state import create_state
from fsdit.codecs import offline_model_config

tmp = Path(tempfile.mkdtemp())                                   # a freshly initialised run, saved as `fsdit train` saves one
mc, tc, run_dir = offline_model_config('mu', size=8, channels=3, embed_dim=16), train_config('test', shots=3), tmp / 'run'
write_run_config(run_dir, mc, tc, 'pixel')
with checkpoint_manager(run_dir, keep=1) as mngr: save_checkpoint(mngr, create_state(mc, tc), {})
run = load_run(run_dir)
write_run_config(tmp / 'empty', mc, tc, 'pixel')                 # a run with no checkpoint yet
r = np.random.default_rng(0)



# %% [markdown]
# ## Supports from files
#
# Support images are read at the store's image size by the store's resize rule (`fsdit.data.load_image`);
# every unreadable file is named in one error.

# %%
#| export
def read_supports(paths: Sequence, size: int) -> np.ndarray:
    "uint8 images (K, size, size, 3) from image files; `ValueError` naming every file that cannot be read."
    bad = {str(p): ('no such file' if not Path(p).is_file() else check_image(p)) for p in paths}
    bad = {p: why for p, why in bad.items() if why}
    if bad: raise ValueError("cannot read support image(s): " + '; '.join(f"{p} ({why})" for p, why in bad.items()))
    return np.stack([load_image(p, size) for p in paths])


def class_dir_supports(d, k: int, seed: int = 0) -> list[Path]:
    "`k` image files drawn at random (seeded) from the folder `d`."
    if not Path(d).is_dir(): raise ValueError(f"--class-dir {d} is not a folder")
    files = list_images(d)
    if len(files) < k: raise ValueError(f"{d} holds {len(files)} images; {k} supports were asked for: use --shots {len(files)} or less")
    return [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), k, replace=False))]


def sample_from_supports(run: Run, codecs: Codecs, images, n: int = 16, *, cfg_scale: float = 3.0, steps: int = 50,
                         seed: int = 0, method: str = 'euler', batch_size: int = 256, cfg_interval=(0.0, 1.0)) -> np.ndarray:
    "`n` images in [-1, 1] (n, H, W, C) of the class shown by the uint8 support images (K, H, W, 3); CFG as `fsdit.sampler.sample`."
    emb, lat = codecs.encode(images)
    check_supports(run.mc, len(emb))
    tile = lambda a: np.repeat(a[None], n, 0)                      # every episode has the same K supports
    z = generate(run.params, run.mc, tile(emb), tile(lat), scaling=run.scaling, seed=seed, steps=steps,
                 cfg_scale=cfg_scale, method=method, batch_size=batch_size, cfg_interval=cfg_interval)
    return np.asarray(codecs.decode(z), np.float32)



# %%
from PIL import Image
(tmp / 'sup').mkdir()
Image.fromarray(np.full((10, 14, 3), 200, np.uint8)).save(tmp / 'sup' / 'a.png')
test_eq(read_supports([tmp / 'sup' / 'a.png'], 8).shape, (1, 8, 8, 3))
test_fail(lambda: read_supports([tmp / 'sup' / 'a.png', tmp / 'sup' / 'none.png'], 8), contains='none.png (no such file)')
test_eq(len(class_dir_supports(tmp / 'sup', 1)), 1)


# %% [markdown]
# ## Command line
#
# `fsdit sample --run RUN --support a.jpg b.jpg ... --n 16 --cfg 3.0 --steps 15 --seed 0 --out grid.png`, or
# `--class-dir DIR` (with `--shots K`, default the run's training shots) to draw the supports from a
# folder. `--cfg`, `--cfg-interval LO HI` (guidance only where LO <= t <= HI) and `--steps` default to the run's own
# (`TrainConfig.cfg_scale`, `cfg_interval`, `sample_steps`). Writes the grid, and with `--npz` the raw samples; folders that do not exist yet are made. Every input
# and output path is checked before the run loads, and nothing is written until the samples exist: a refusal
# prints one line, exits 1 and leaves no file behind. (A negative `--cfg` is guidance *away* from the
# supports, $v_u + s\,(v_c - v_u)$ with $s < 0$: well defined, so accepted.)
#
# `RUN` is the `--out` folder of `fsdit train`, a folder of `fsdit export` or the hub id (`user/name`) of one
# (`fsdit.run.load_run` reads all three). An export samples with the codecs it recorded and carries
# (`fsdit.export.codecs_of`), so it needs no feature store, and its samples are the run's, seed for seed.

# %%
#| export
def sample_parser() -> Parser:
    "The options of `fsdit sample`."
    p = Parser(prog='fsdit sample', description=sample_cli.__doc__)
    p.add_argument('--run', required=True, help='run directory of `fsdit train`, a folder of `fsdit export` or its hub id (user/name)')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--support', nargs='+', help='support image files')
    g.add_argument('--class-dir', help='folder of images of one class to draw the supports from')
    p.add_argument('--shots', type=positive_int, default=None, help="supports drawn from --class-dir (default: the run's shots)")
    p.add_argument('--n', type=positive_int, default=16, help='images to generate')
    p.add_argument('--cfg', type=float, default=None,
                   help="classifier-free guidance scale (negative: away from the supports; default: the run's)")
    p.add_argument('--cfg-interval', type=float, nargs=2, default=None, metavar=('LO', 'HI'),
                   help="guide only where LO <= t <= HI (t=0 noise, t=1 data; default: the run's)")
    p.add_argument('--steps', type=positive_int, default=None, help="sampler steps (default: the run's)")
    p.add_argument('--method', default='euler', choices=('euler', 'heun'))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='grid.png', help='grid image to write')
    p.add_argument('--npz', default=None, help='also save the samples (uint8) to this .npz')
    p.add_argument('--feats', default=None, help="feature store of the run (names its encoders; an export records its own)")
    p.add_argument('--encoder', default=None, help='support encoder id or folder (overrides the store)')
    p.add_argument('--vae', default=None, help='VAE id or folder (overrides the store)')
    p.add_argument('--raw', action='store_true', help='live instead of EMA parameters')
    return p


def sample_cli(argv: list[str]) -> int:
    "`fsdit sample`: images of a class from a few support images, as a grid with the supports on top."
    a = sample_parser().parse_args(argv)
    say = lambda msg: print(f"fsdit sample: {msg}", file=sys.stderr)
    try:
        outs = [check_out_file(a.out)] + ([check_out_file(a.npz, '--npz')] if a.npz else [])
        if a.support: read_supports(a.support, 8)             # every file readable, before the run loads
        interval = None if a.cfg_interval is None else check_interval(a.cfg_interval)
        run = load_run(a.run, ema=not a.raw, warn=say)
        check_supports(run.mc, 1)                             # a class-conditioned run takes no supports
        files = a.support or class_dir_supports(a.class_dir, a.shots or run.tc.shots, a.seed)
        codecs = codecs_of(run, a.feats, a.encoder, a.vae)
        sup = read_supports(files, codecs.image_size)
        cfg = run.tc.cfg_scale if a.cfg is None else a.cfg
        interval = interval or check_interval(run.tc.cfg_interval)
        steps = a.steps or run.tc.sample_steps
        x = sample_from_supports(run, codecs, sup, a.n, cfg_scale=cfg, steps=steps, seed=a.seed, method=a.method,
                                 cfg_interval=interval)
        if len(sup) != run.tc.shots:
            say(f"note: the run was trained on {run.tc.shots}-shot episodes; sampled from {len(sup)} supports")
        for o in outs: o.parent.mkdir(parents=True, exist_ok=True)
        if a.npz: np.savez_compressed(a.npz, samples=to_uint8(x, rgb=True), supports=sup)
        save_png(support_grid(sup, x), a.out)
    except (ValueError, OSError) as e:
        return fail('sample', e)
    print(f"{a.out}: {len(x)} samples from {len(sup)} supports (step {run.step}, cfg {cfg}{interval_text(interval)}, {steps} steps)")
    return 0


# %% [markdown]
# End to end on the saved run: three support files, a grid with them on the top row and the samples
# below; an unreadable support and a run without checkpoint each end in a one-line error.

# %%
import contextlib, io
from PIL import Image
(tmp / 'cls').mkdir()
files = [tmp / 'cls' / f's{i}.png' for i in range(3)]
for f in files: Image.fromarray(r.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(f)
(tmp / 'broken.jpg').write_bytes(b'not an image')
cli = lambda *a: sample_cli(['--run', str(run_dir), '--steps', '2', '--n', '5', '--out', str(tmp / 'grid.png'), *map(str, a)])
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(cli('--support', *files), 0)
    test_eq(cli('--class-dir', tmp / 'cls', '--shots', '2'), 0)
    test_eq(cli('--class-dir', tmp / 'cls', '--shots', '4'), 1)   # only 3 images there
    test_eq(cli('--support', files[0], tmp / 'broken.jpg', tmp / 'missing.png'), 1)
    test_eq(sample_cli(['--run', str(tmp / 'empty'), '--support', str(files[0])]), 1)
    test_eq(cli('--support', *files, '--cfg-interval', '0.9', '0.1'), 1)  # refused before the run loads
    test_eq(cli('--support', *files, '--cfg-interval', '0.5', '1'), 0)
    test_eq(sample_cli(['--run', str(run_dir), '--n', '2', '--out', str(tmp / 'grid2.png'), '--support', *map(str, files)]), 0)
test_eq((sample_parser().parse_args(['--run', 'r', '--support', 'a.png']).n, sample_parser().parse_args(['--run', 'r', '--class-dir', 'd']).steps), (16, None))
grid = np.asarray(Image.open(tmp / 'grid.png'))
test_eq(grid.shape, (2 * (8 + 2), 5 * (8 + 2), 3))             # supports row + one row of 5 samples
assert 'broken.jpg' in err.getvalue() and 'missing.png (no such file)' in err.getvalue() and 'no checkpoint' in err.getvalue()
assert 'holds 3 images' in err.getvalue() and '0 <= lo <= hi <= 1' in err.getvalue()
assert 'cfg 3.0, 2 steps' in out.getvalue() and 'cfg 3.0 for t in [0.5, 1], 2 steps' in out.getvalue()
assert f'cfg 3.0, {tc.sample_steps} steps' in out.getvalue()      # no --steps: the run's own sampler steps
