# %% [markdown]
# # fsdit export
#
# > The `fsdit export RUN OUT` command: a run as a folder to share, written by `fsdit.export.export_run`.
#
# The notebook of `fsdit.export` runs the command on a trained run, an export and a folder that is neither;
# here are its arguments and the refusal of an output path that is a file.

# %%
#| default_exp commands.export

# %%
#| export
from __future__ import annotations
import sys

from fsdit.cli import Parser, check_out_dir, fail
from fsdit.export import export_run

# %%
import contextlib, io, tempfile
from pathlib import Path
from fastcore.test import test_eq


# %%
#| export
def export_cli(argv: list[str]) -> int:
    "`fsdit export RUN OUT`: a run as a folder to share (safetensors, JSON, a model card; no pickle)."
    p = Parser(prog='fsdit export', description=export_cli.__doc__)
    p.add_argument('run', help='run directory of `fsdit train` (or an export, or its hub id user/name)')
    p.add_argument('out', help='folder to write; must not exist, or be empty')
    a = p.parse_args(argv)
    say = lambda msg: print(f"fsdit export: {msg}", file=sys.stderr)
    try:
        check_out_dir(a.out)
        got = export_run(a.run, a.out, log=say)
    except (ValueError, OSError) as e:
        return fail('export', e)
    c = got['codecs']
    print(f"{a.out}: step {got['step']}, encoder {c['encoder']}" + (' (carried)' if 'encoder' in got['carried'] else '')
          + f", figures: {got['figures'] or 'none'}, held-out grid: {'yes' if got['grid'] else 'none'}")
    return 0


# %% [markdown]
# The arguments, and an output path that is a file refused in one line before the run is read:

# %%
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit): export_cli(['--help'])
assert 'run directory of `fsdit train`' in ' '.join(out.getvalue().split())
_d = Path(tempfile.mkdtemp()); (_d / 'f').write_text('x')
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(export_cli([str(_d / 'none'), str(_d / 'f')]), 1)
test_eq(err.getvalue(), f"fsdit export: --out {_d / 'f'} is a file, not a folder: give a folder path\n")
