# %% [markdown]
# # fsdit prepare
#
# > The `fsdit prepare` command: a flat class-folder dataset split into train/val/test by class with `fsdit.data.prepare`.
#
# The flags are `prepare`'s arguments. The notebook of `fsdit.data` runs the command on a small dataset with
# the usual defects; here are its options and its refusal of a missing source.

# %%
#| default_exp commands.prepare

# %%
#| export
from __future__ import annotations

from fsdit.cli import Parser, fail
from fsdit.data import prepare

# %%
import contextlib, io, tempfile
from pathlib import Path
from fastcore.test import test_eq


# %%
#| export
def prepare_cli(argv: list[str]) -> int:
    "`fsdit prepare`: split a flat class-folder dataset by class; a refusal is one line on stderr and exit status 1."
    p = Parser(prog='fsdit prepare', description=prepare.__doc__)
    p.add_argument('--src', required=True, help='folder of class folders (flat miniImageNet)')
    p.add_argument('--dst', required=True, help='output: DST/{train,val,test}/<class>/')
    p.add_argument('--train', type=int, default=60); p.add_argument('--val', type=int, default=16)
    p.add_argument('--test', type=int, default=20); p.add_argument('--seed', type=int, default=42)
    p.add_argument('--split', choices=('seed', 'ravi'), default='seed',
                   help="'seed': the seed's RandomState permutation; 'ravi': the standard 64/16/20 lists")
    p.add_argument('--copy', action='store_true', help='copy the images instead of symlinking them')
    a = p.parse_args(argv)
    try: m = prepare(a.src, a.dst, a.train, a.val, a.test, a.seed, a.split, a.copy)
    except (ValueError, OSError) as e:                  # FileExistsError, an unreadable --src: OSError
        return fail('prepare', e)
    for k, v in m['counts'].items(): print(f"{k}: {len(v)} classes, {sum(v.values())} images")
    for path, why in m['skipped']: print(f"skipped {path}: {why}")
    return 0


# %% [markdown]
# The options, and a source that does not exist refused in one line, with nothing written:

# %%
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit): prepare_cli(['--help'])
assert '--split {seed,ravi}' in out.getvalue() and '--copy' in out.getvalue()
_d = Path(tempfile.mkdtemp())
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(prepare_cli(['--src', str(_d / 'none'), '--dst', str(_d / 'split')]), 1)
test_eq(len(err.getvalue().splitlines()), 1); assert err.getvalue().startswith('fsdit prepare: ')
assert not (_d / 'split').exists()
