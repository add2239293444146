# %% [markdown]
# # Sampling from support images
#
# > New images of a class from a few support images: read the image files, encode them with the run's codecs, generate with the compiled sampler (spread over every local device), and write a grid with the supports on top — `fsdit sample`.

# %%
#| default_exp supports

# %%
#| export
from __future__ import annotations
from pathlib import Path
from typing import Sequence

import numpy as np

from fsdit.codecs import Codecs
from fsdit.run import Run
from fsdit.config import GUIDE_UPTO
from fsdit.sampler import generate, check_supports
from fsdit.data import check_image, load_image, list_images

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config
from fsdit.run import load_run, write_run_config, checkpoint_manager, save_checkpoint
from fsdit.state import create_state
from fsdit.codecs import offline_model_config
from fsdit.utils import l2_normalize

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
                         seed: int = 0, method: str = 'euler', batch_size: int = 256, cfg_interval=(0.0, 1.0),
                         guide_scale: float = 0.0, guide_upto: float = GUIDE_UPTO, from_support: float = 0.0) -> np.ndarray:
    """`n` images in [-1, 1] (n, H, W, C) of the class shown by the uint8 support images (K, H, W, 3); CFG as `fsdit.sampler.sample`,
    encoder guidance (`guide_scale > 0`) through `codecs.guide`; `from_support > 0`: image i starts from support i mod K, noised."""
    emb, lat = codecs.encode(images)
    check_supports(run.mc, len(emb))
    tile = lambda a: np.repeat(a[None], n, 0)                      # every episode has the same K supports
    z = generate(run.params, run.mc, tile(emb), tile(lat), scaling=run.scaling, seed=seed, steps=steps,
                 cfg_scale=cfg_scale, method=method, batch_size=batch_size, cfg_interval=cfg_interval,
                 guide=codecs.guide, guide_scale=guide_scale, guide_upto=guide_upto, from_support=from_support)
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
# The command is `fsdit.commands.sample`.

# %% [markdown]
# End to end on the saved run: three support files, a grid with them on the top row and the samples
# below; an unreadable support and a run without checkpoint each end in a one-line error.

# %%
from fsdit.commands.sample import sample_cli, sample_parser
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

# %% [markdown]
# `--guide S` adds encoder guidance (`fsdit.sampler.encoder_guided`) through the run's own encoder: the guided samples'
# embeddings sit closer to the supports' mean embedding. A negative scale, or guidance reaching t = 1, is refused
# before the run loads.

# %%
from fsdit.codecs import run_codecs
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(cli('--support', *files, '--guide', '2', '--guide-upto', '0.9'), 0)
    test_eq(cli('--support', *files, '--guide', '-1'), 1)
    test_eq(cli('--support', *files, '--guide', '1', '--guide-upto', '1'), 1)
assert 'encoder guidance 2 for t <= 0.9, 2 steps' in out.getvalue()
assert 'must be >= 0' in err.getvalue() and 'upto must be in [0, 1)' in err.getvalue()
_c, _sup = run_codecs(run), read_supports(files, 8)
_t = np.asarray(l2_normalize(_c.embed(_sup / 127.5 - 1).mean(0)))
_cos = lambda x: float((np.asarray(_c.embed(np.clip(x, -1, 1))) @ _t).mean())
_plain = sample_from_supports(run, _c, _sup, 4, steps=4)
_guided = sample_from_supports(run, _c, _sup, 4, steps=4, guide_scale=2.0, guide_upto=0.9)
assert _cos(_guided) > _cos(_plain) + 0.1, (_cos(_guided), _cos(_plain))

# %% [markdown]
# `--from-support T` starts each sample at time T from one of the supports, noised (SDEdit; `fsdit.sampler.start_noise`):
# sample i from support i mod K. Late starts keep the support: each sample sits far nearer its own support (in pixels)
# than a sample from noise does. A start outside [0, 1) is refused before the run loads.

# %%
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(cli('--support', *files, '--from-support', '0.5'), 0)
    test_eq(cli('--support', *files, '--from-support', '1'), 1)
assert 'from a support at t = 0.5, 2 steps' in out.getvalue() and 'starts at a time t in [0, 1)' in err.getvalue()
_own = lambda x: float(np.abs(np.clip(x, -1, 1) - (_sup[np.arange(4) % len(_sup)] / 127.5 - 1)).mean())
_from = sample_from_supports(run, _c, _sup, 4, steps=4, from_support=0.75)
assert _own(_from) < 0.5 * _own(_plain), (_own(_from), _own(_plain))
