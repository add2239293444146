# %% [markdown]
# # Command line
#
# > `fsdit <command>`: a thin layer over the functions the notebooks define.
#
# The commands are a layer over the library: each lives in its own module of `fsdit.commands`
# (`fsdit.commands.train`, ...; the explorer's web app, `fsdit.app`, is one too), written in a notebook
# beside the component it drives. A command module imports the library; the library never imports a command.
# This module only routes `argv` to the command and holds what the commands share, so importing the CLI costs
# nothing until a command runs.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import argparse, importlib, sys, tempfile
from pathlib import Path

from fsdit.utils import CLIError

# %%
#| export
COMMANDS: dict[str, tuple[str, str, str]] = {
    # command: (module, function, one-line help)
    'prepare':    ('fsdit.commands.prepare', 'prepare_cli', 'split a flat class-folder dataset into train/val/test by class'),
    'precompute': ('fsdit.commands.precompute', 'precompute_cli', 'run every image once through the frozen encoders into a feature store'),
    'train':      ('fsdit.commands.train', 'train_cli', 'train (or resume) a run on a feature store, data-parallel over all devices'),
    'sample':     ('fsdit.commands.sample', 'sample_cli', 'generate images of a class from a few support images'),
    'eval':       ('fsdit.commands.eval', 'eval_cli', 'few-shot metrics on unseen (and seen) classes -> JSON + plots'),
    'export':     ('fsdit.commands.export', 'export_cli', 'a run as a folder to share: safetensors weights, JSON configs, a model card'),
    'demo':       ('fsdit.commands.demo', 'demo_cli', 'the whole chain offline on a small real dataset a dependency ships'),
    'bench':      ('fsdit.commands.bench', 'bench_cli', 'benchmarks: train step, store vs online encoders, sampling, memory'),
    'explore':    ('fsdit.app', 'explore_cli', "the explorer of a run as a web app in the browser (needs fsdit[app])"),
}


def usage() -> str:
    "The top-level help text."
    width = max(map(len, COMMANDS))
    rows = '\n'.join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return f"usage: fsdit <command> [options]\n\ncommands:\n{rows}\n\n`fsdit <command> --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    "Entry point of the `fsdit` console script."
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help', 'help'):
        print(usage()); return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fsdit: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr); return 2
    module, func, _ = COMMANDS[cmd]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


# %% [markdown]
# Every command resolves to a function of its command module:

# %%
import contextlib, io
from fastcore.test import test_eq
for name, (module, func, _) in COMMANDS.items():
    assert callable(getattr(importlib.import_module(module), func)), name
buf = io.StringIO()
with contextlib.redirect_stdout(buf): test_eq(main([]), 0)
assert 'precompute' in buf.getvalue() and 'fsdit <command> --help' in buf.getvalue()
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(main(['trian']), 2)
assert "unknown command 'trian'" in err.getvalue()

# %% [markdown]
# ## Refusing clearly
#
# Every command ends either in success or in exit status 1 with **one line** on stderr, `fsdit <command>: ...`,
# that names what was wrong and what to do — never a traceback, and nothing written that a corrected rerun
# would trip over. The commands share the pieces for that: `CLIError` for a refusal (defined in `fsdit.utils`,
# since library code raises it too, and offered here as well), `fail` to print one,
# `Parser` whose argument errors are one line too (exit status 2), `positive_int` for counts, and
# `check_out_dir` / `check_out_file`, which look at an output path before anything is computed or written.

# %%
#| export
_all_ = ['CLIError']   # from fsdit.utils, where library code raising it finds it


def fail(cmd: str, e: BaseException | str) -> int:
    "Print `fsdit CMD: MESSAGE` as one line on stderr; returns 1 (the exit status of a refusal)."
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e   # KeyError's str() quotes its message
    print(f"fsdit {cmd}: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1


class Parser(argparse.ArgumentParser):
    "argparse with one-line errors: `fsdit CMD: argument --x: ... (see fsdit CMD --help)`, exit status 2."
    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    "An argparse type: an integer >= 1."
    try: v = int(text)
    except ValueError: raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1: raise argparse.ArgumentTypeError(f"must be 1 or more, got {v}")
    return v


# %% [markdown]
# A refusal is one line with the command's name; argparse's errors are one line too:

# %%
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(fail('sample', CLIError('bad\nthing')), 1)
test_eq(err.getvalue(), 'fsdit sample: bad thing\n')
with contextlib.redirect_stderr(io.StringIO()) as err: fail('train', KeyError("unknown model preset 'C/2'"))
test_eq(err.getvalue(), "fsdit train: unknown model preset 'C/2'\n")
p = Parser(prog='fsdit x'); p.add_argument('--n', type=positive_int)
test_eq(p.parse_args(['--n', '3']).n, 3)
for bad in ('0', '-2', 'x'):
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try: p.parse_args(['--n', bad]); raise AssertionError('accepted')
        except SystemExit as e: test_eq(e.code, 2)
    test_eq(len(err.getvalue().splitlines()), 1); assert err.getvalue().startswith('fsdit x: argument --n: ')


# %% [markdown]
# An output path is checked where it will be written: it must not be a file where a folder is wanted (or the
# reverse), and the folder that holds it — or the nearest one that exists, for a path to be created — must
# take a new file. Writing a throwaway file is the test, so a read-only mount is caught as well as a
# read-only folder. Nothing is created.

# %%
#| export
def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent: p = p.parent
    return p


def _writable(folder: Path) -> str | None:
    "None if a file can be created in `folder`, else why not."
    try:
        with tempfile.TemporaryFile(dir=folder): return None
    except OSError as e: return e.strerror or type(e).__name__


def _check_parent(p: Path, start: Path, flag: str):
    "Refuse `p` when the nearest existing folder at or above `start` is a file or cannot be written."
    q = _existing_ancestor(start)
    if not q.is_dir(): raise CLIError(f"{flag} {p} lies under the file {q}: no folder can be made there; give another path")
    why = _writable(q)
    if why: raise CLIError(f"{flag} {p}: cannot write in {q} ({why}): give a writable folder")


def check_out_dir(path, flag: str = '--out') -> Path:
    "Refuse (`CLIError`) an output folder that is a file, lies under a file or cannot be written; creates nothing."
    p = Path(path)
    if p.exists() and not p.is_dir(): raise CLIError(f"{flag} {p} is a file, not a folder: give a folder path")
    _check_parent(p, p, flag)
    return p


def check_out_file(path, flag: str = '--out') -> Path:
    "Refuse (`CLIError`) an output file that is a folder, lies under a file or cannot be written; creates nothing."
    p = Path(path)
    if p.is_dir(): raise CLIError(f"{flag} {p} is a folder: give a file name")
    _check_parent(p, p.parent, flag)
    return p


# %% [markdown]
# An output path under a file, or a folder given for a file, is refused before anything is made:

# %%
import tempfile as _tf
d = Path(_tf.mkdtemp()); (d / 'f').write_text('x')
test_eq(check_out_dir(d / 'new' / 'run'), d / 'new' / 'run'); assert not (d / 'new').exists()
test_eq(check_out_file(d / 'new' / 'grid.png'), d / 'new' / 'grid.png')
for f, path, msg in ((check_out_dir, d / 'f', 'is a file'), (check_out_dir, d / 'f' / 'run', 'lies under the file'),
                     (check_out_file, d, 'is a folder'), (check_out_file, d / 'f' / 'g.png', 'lies under the file')):
    try: f(path); raise AssertionError(path)
    except CLIError as e: assert msg in str(e) and str(path) in str(e), e
