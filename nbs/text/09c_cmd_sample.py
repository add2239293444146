# %% [markdown]
# # fsdit sample
#
# > The `fsdit sample` command: images of a class from a few support images, with `fsdit.supports.sample_from_supports`.
#
# The guidance, its interval and the sampler steps default to the run's own. The notebook of `fsdit.supports` runs
# the command end to end on a saved run; here are its options and the refusals that come before any run loads.

# %%
#| default_exp commands.sample

# %%
#| export
from __future__ import annotations
import sys

import numpy as np

from fsdit.cli import Parser, positive_int, check_out_file, fail
from fsdit.config import GUIDE_UPTO, check_guidance, check_interval, check_start, interval_text
from fsdit.export import codecs_of
from fsdit.images import save_png, support_grid, to_uint8
from fsdit.run import load_run
from fsdit.sampler import check_supports
from fsdit.supports import read_supports, class_dir_supports, sample_from_supports

# %%
import contextlib, io, tempfile
from pathlib import Path
from fastcore.test import test_eq


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
    p.add_argument('--guide', type=float, default=None,
                   help="encoder guidance scale: steer towards the supports' embedding through the encoder (0: off; default: the run's)")
    p.add_argument('--guide-upto', type=float, default=None, help="encoder guidance acts where t <= this (default: the run's)")
    p.add_argument('--from-support', type=float, default=None, metavar='T',
                   help="start at time T from a support, noised (SDEdit: keeps its layout, redraws the rest; 0: from noise; default: the run's)")
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
        if a.guide is not None or a.guide_upto is not None: check_guidance(a.guide or 0.0, GUIDE_UPTO if a.guide_upto is None else a.guide_upto)
        if a.from_support is not None: check_start(a.from_support)
        run = load_run(a.run, ema=not a.raw, warn=say)
        check_supports(run.mc, 1)                             # a class-conditioned run takes no supports
        files = a.support or class_dir_supports(a.class_dir, a.shots or run.tc.shots, a.seed)
        codecs = codecs_of(run, a.feats, a.encoder, a.vae)
        sup = read_supports(files, codecs.image_size)
        cfg = run.tc.cfg_scale if a.cfg is None else a.cfg
        interval = interval or check_interval(run.tc.cfg_interval)
        steps = a.steps or run.tc.sample_steps
        guide = run.tc.guide_scale if a.guide is None else a.guide
        upto = run.tc.guide_upto if a.guide_upto is None else a.guide_upto
        start = run.tc.from_support if a.from_support is None else a.from_support
        x = sample_from_supports(run, codecs, sup, a.n, cfg_scale=cfg, steps=steps, seed=a.seed, method=a.method,
                                 cfg_interval=interval, guide_scale=guide, guide_upto=upto, from_support=start)
        if len(sup) != run.tc.shots:
            say(f"note: the run was trained on {run.tc.shots}-shot episodes; sampled from {len(sup)} supports")
        for o in outs: o.parent.mkdir(parents=True, exist_ok=True)
        if a.npz: np.savez_compressed(a.npz, samples=to_uint8(x, rgb=True), supports=sup)
        save_png(support_grid(sup, x), a.out)
    except (ValueError, OSError) as e:
        return fail('sample', e)
    gtext = (f", encoder guidance {guide:g} for t <= {upto:g}" if guide else '') + (f", from a support at t = {start:g}" if start else '')
    print(f"{a.out}: {len(x)} samples from {len(sup)} supports (step {run.step}, cfg {cfg}{interval_text(interval)}{gtext}, {steps} steps)")
    return 0


# %% [markdown]
# The options and their defaults, and a grid path that is a folder refused in one line:

# %%
_a = sample_parser().parse_args(['--run', 'r', '--support', 'a.png', 'b.png'])
test_eq((_a.support, _a.n, _a.cfg, _a.steps, _a.out), (['a.png', 'b.png'], 16, None, None, 'grid.png'))
_d = Path(tempfile.mkdtemp())
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(sample_cli(['--run', str(_d), '--support', 'a.png', '--out', str(_d)]), 1)
test_eq(err.getvalue(), f"fsdit sample: --out {_d} is a folder: give a file name\n")
with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit): sample_parser().parse_args(['--run', 'r'])
assert err.getvalue().startswith('fsdit sample: ') and len(err.getvalue().splitlines()) == 1
