# %% [markdown]
# # fsdit eval
#
# > The `fsdit eval` command: few-shot metrics of a run on unseen and seen classes with `fsdit.eval.evaluate` -> eval.json + figures.
#
# `fsdit eval --run RUN --feats FEATS --split test --shots 1 3 5 --cfg 0 1 3 --n 128 --out DIR` (default
# `RUN/eval`); `--fid` adds FID (`--fid-weights FILE` offline), `--no-seen` skips the seen classes. The
# store defaults to the one the run's `config.json` names.

# %%
#| default_exp commands.eval

# %%
#| export
from __future__ import annotations
import sys
from pathlib import Path

from fsdit.cli import Parser, positive_int, check_out_dir, fail
from fsdit.config import GUIDE_UPTO, check_guidance, check_interval, check_start
from fsdit.eval import evaluate, results_table
from fsdit.export import codecs_of
from fsdit.run import load_run

# %%
import tempfile
from fastcore.test import test_eq


# %%
#| export
def eval_cli(argv: list[str]) -> int:
    "`fsdit eval`: few-shot metrics of a run on unseen and seen classes -> eval.json + figures."
    p = Parser(prog='fsdit eval', description=eval_cli.__doc__)
    p.add_argument('--run', required=True, help='run directory of `fsdit train`')
    p.add_argument('--feats', default=None, help="feature store (default: the one the run's config.json names)")
    p.add_argument('--split', default='test', help='unseen split to evaluate')
    p.add_argument('--seen-split', default='train', help='split of the seen classes')
    p.add_argument('--no-seen', action='store_true', help='skip the seen classes')
    p.add_argument('--shots', type=positive_int, nargs='+', default=[5])
    p.add_argument('--cfg', type=float, nargs='+', default=None, help="CFG scales (default: the run's)")
    p.add_argument('--cfg-interval', type=float, nargs=2, default=None, metavar=('LO', 'HI'),
                   help="guide only where LO <= t <= HI (t=0 noise, t=1 data; default: the run's)")
    p.add_argument('--guide', type=float, default=None, help="encoder guidance scale (0: off; default: the run's)")
    p.add_argument('--guide-upto', type=float, default=None, help="encoder guidance acts where t <= this (default: the run's)")
    p.add_argument('--from-support', type=float, default=None, metavar='T',
                   help="start at time T from a support, noised (0: from noise; default: the run's)")
    p.add_argument('--n', type=positive_int, default=128, help='generated images per class (per shots and cfg)')
    p.add_argument('--max-real', type=int, default=128, help='real images per class (0: all)')
    p.add_argument('--steps', type=positive_int, default=50); p.add_argument('--method', default='euler', choices=('euler', 'heun'))
    p.add_argument('--seed', type=int, default=0); p.add_argument('--batch-size', type=positive_int, default=256)
    p.add_argument('--fid', action='store_true', help="add FID (needs pip install 'fsdit[fid]')")
    p.add_argument('--fid-weights', default='download', help='pytorch-fid Inception weights: download, or a .pth file')
    p.add_argument('--out', default=None, help='output folder (default RUN/eval)')
    a = p.parse_args(argv)
    if a.max_real < 0: p.error(f"argument --max-real: must be 0 (all) or more, got {a.max_real}")
    try:
        out = check_out_dir(a.out or Path(a.run) / 'eval')
        interval = None if a.cfg_interval is None else check_interval(a.cfg_interval)
        if a.guide is not None or a.guide_upto is not None: check_guidance(a.guide or 0.0, GUIDE_UPTO if a.guide_upto is None else a.guide_upto)
        if a.from_support is not None: check_start(a.from_support)
        run = load_run(a.run, warn=lambda msg: print(f"fsdit eval: {msg}", file=sys.stderr))
        feats = a.feats or run.config.get('feats')
        if feats is None: raise ValueError("no feature store: pass --feats FEATS")
        res = evaluate(run, feats, split=a.split, seen_split=None if a.no_seen else a.seen_split, n_per_class=a.n,
                       shots=a.shots, cfg_scales=a.cfg or [run.tc.cfg_scale], steps=a.steps, seed=a.seed, max_real_per_class=a.max_real or None,
                       fid=a.fid, fid_weights=a.fid_weights, method=a.method, batch_size=a.batch_size, out=out,
                       cfg_interval=interval or run.tc.cfg_interval, codecs=codecs_of(run, feats),
                       guide_scale=run.tc.guide_scale if a.guide is None else a.guide,
                       guide_upto=run.tc.guide_upto if a.guide_upto is None else a.guide_upto,
                       from_support=run.tc.from_support if a.from_support is None else a.from_support)
    except (ValueError, OSError, RuntimeError, ImportError, KeyError) as e:
        return fail('eval', e)
    print(results_table(res['records']))
    print(f"wrote {a.out or Path(a.run) / 'eval'}/eval.json and figures")
    return 0


# %% [markdown]
# A folder that is not a run is refused in one line on stderr, before anything loads:

# %%
import contextlib, io
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(eval_cli(['--run', str(Path(tempfile.mkdtemp()) / 'none')]), 1)
assert err.getvalue().startswith('fsdit eval: ') and 'not a run directory' in err.getvalue() and err.getvalue().count('\n') == 1
