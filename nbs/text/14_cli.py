# %% [markdown]
# # Command line
#
# > `fsdit <command>`: a thin layer over the functions the notebooks define.
#
# Each command is owned by the module that implements it; this module only routes `argv` to it, so
# `fsdit train --help` is written next to the trainer, and importing the CLI costs nothing until a
# command runs.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import importlib, sys

# %%
#| export
COMMANDS: dict[str, tuple[str, str, str]] = {
    # command: (module, function, one-line help)
    'prepare':    ('fsdit.data', 'prepare_cli', 'split a flat class-folder dataset into train/val/test by class'),
    'precompute': ('fsdit.features', 'precompute_cli', 'run every image once through the frozen encoders into a feature store'),
    'train':      ('fsdit.train', 'train_cli', 'train (or resume) a run on a feature store, data-parallel over all devices'),
    'sample':     ('fsdit.sample', 'sample_cli', 'generate images of a class from a few support images'),
    'eval':       ('fsdit.eval', 'eval_cli', 'few-shot metrics on unseen (and seen) classes -> JSON + plots'),
    'demo':       ('fsdit.demo', 'demo_cli', 'the whole chain offline on a small real dataset a dependency ships'),
    'bench':      ('fsdit.bench', 'bench_cli', 'benchmarks: train step, store vs online encoders, sampling, memory'),
}


def usage() -> str:
    "The top-level help text."
    width = max(map(len, COMMANDS))
    rows = '\n'.join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return f"usage: fsdit <command> [options]\n\ncommands:\n{rows}\n\n`fsdit <command> --help` for a command's options."


# %%
#| export
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
# Every command resolves to a function of the module that owns it:

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
