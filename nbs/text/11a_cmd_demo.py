# %% [markdown]
# # fsdit demo
#
# > The `fsdit demo` command: the whole chain offline on the glyph dataset with `fsdit.glyph.demo.demo` — data, store, train, samples, eval.
#
# `fsdit demo --out DEMO` (default `demo`) runs the `full` size; `--size tiny` the seconds-long one; `--data unaligned`
# the harder glyphs; `--cond` another conditioning; `--steps N` a training length of its own; `--until STAGE` stops early.
# The notebook of `fsdit.glyph.demo` runs the command on a finished tiny demo; here are its options and a refusal.

# %%
#| default_exp commands.demo

# %%
#| export
from __future__ import annotations
from dataclasses import replace

from fsdit.cli import Parser, positive_int, fail
from fsdit.glyph.demo import DEMO_SIZES, STAGES, demo, demo_size

# %%
import contextlib, io, tempfile
from pathlib import Path
from fastcore.test import test_eq


# %%
#| export
def demo_cli(argv: list[str]) -> int:
    "`fsdit demo`: the whole chain offline on the glyph dataset — data, store, train, samples, eval."
    p = Parser(prog='fsdit demo', description=demo_cli.__doc__)
    p.add_argument('--out', default='demo', help='demo folder (reused: finished stages are skipped)')
    p.add_argument('--size', default='full', choices=sorted(DEMO_SIZES),
                   help="'full' (minutes on a CPU), 'long' (about 1.6 hours on a 2-core CPU) or 'tiny' (seconds)")
    p.add_argument('--data', default='aligned', choices=('aligned', 'unaligned'),
                   help="'aligned': centred dark characters; 'unaligned': each placed, sized, turned and coloured at random "
                        "(RGB), with a trained stand-in encoder and a glyph VAE whose latents the DiT models")
    p.add_argument('--cond', default=None, choices=('aligned', 'support', 'context', 'xattn'),
                   help="default (the data's): 'aligned', the supports' pixels beside the target; 'xattn': cross-attention "
                        "to the supports' patches; 'support': the seed's mean embedding via adaLN only; 'context': supports also as tokens")
    p.add_argument('--steps', type=positive_int, default=None, help='training steps (default: the size\'s)')
    p.add_argument('--until', default='eval', choices=STAGES, help='last stage to run')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    a = p.parse_args(argv)
    s = demo_size(a.size, a.data)
    if a.steps is not None:
        t = {**s.train, 'max_steps': a.steps}
        if 'warmup' in t: t['warmup'] = min(t['warmup'], a.steps)
        s = replace(s, train=t)
    try: demo(a.out, s, a.cond, a.until, log=print, progress=not a.no_progress)
    except (ValueError, FileExistsError, OSError) as e:
        return fail('demo', e)
    return 0


# %% [markdown]
# The options, and a demo folder that is a file refused in one line before any stage runs:

# %%
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit): demo_cli(['--help'])
assert "--size {full,long,tiny}" in out.getvalue() and '--until' in out.getvalue()
_f = Path(tempfile.mkdtemp()) / 'f'; _f.write_text('x')
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(demo_cli(['--out', str(_f), '--size', 'tiny', '--no-progress']), 1)
test_eq(len(err.getvalue().splitlines()), 1); assert err.getvalue().startswith('fsdit demo: ')
