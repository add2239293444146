# %% [markdown]
# # fsdit train
#
# > `fsdit train` from the command line: every setting a flag, configs from the saved run, the presets and the store, the store's codecs loaded only when first used (`fsdit.launch`), the few-shot evaluation hook, then `fsdit.train.train`.
#
# `fsdit train --feats FEATS --out RUN` trains on a feature store. Every `TrainConfig` field is a flag
# (`--batch-size` or the seed's `--batch_size`; `--wandb.name`, `--log_interval` and the seed's other
# names also work), every `ModelConfig` field is `--model.<field>`, and `--model` / `--preset` pick the
# presets. A tuple setting takes its numbers space-separated, as `--help` shows them: `--cfg-interval LO HI`
# (`0.6,1` is read the same); a wrong count or a non-number is refused in one line naming the form. The
# store decides the model's input shape and embedding width. Running the same command again
# resumes: when `RUN/config.json` exists its configs are the base and only the flags given override them.
# `--distributed` calls `jax.distributed.initialize()` first (TPU pods, several hosts).

# %%
#| default_exp commands.train

# %%
#| export
from __future__ import annotations
import argparse, dataclasses, sys
from pathlib import Path
from typing import Any, Callable

import jax

from fsdit.cli import CLIError, Parser, positive_int, check_out_dir, fail
from fsdit.config import (ModelConfig, TrainConfig, model_config, train_config, config_to_dict, config_from_dict,
                          MODEL_PRESETS, TRAIN_PRESETS)
from fsdit.eval import FewShotHook
from fsdit.features import open_store, store_source
from fsdit.launch import lazy_vae_decode, store_embed
from fsdit.run import run_json, read_run_config, ignore_closed_loops
from fsdit.train import train

# %%
from fastcore.test import test_eq, test_fail

# %%
#| export
SEED_ALIASES = {'log_every': ['--log_interval'], 'eval_every': ['--eval_interval'], 'save_every': ['--save_interval'],
                'sample_every': ['--sample_interval'], 'wandb_name': ['--wandb.name'], 'wandb_project': ['--wandb.project'],
                'wandb_mode': ['--wandb.mode'], 'lr': ['--model.lr'], 'warmup': ['--model.warmup_steps']}


def _train_flags(f: dataclasses.Field) -> list[str]:
    "A TrainConfig field's flags: `--batch-size`, the seed's `--batch_size` and its other seed names."
    return [f"--{f.name.replace('_', '-')}", f"--{f.name}", *SEED_ALIASES.get(f.name, [])]


TUPLE_NAMES = {'cfg_interval': ('LO', 'HI')}   # how --help and messages name a tuple setting's numbers


def _flag_type(f: dataclasses.Field):
    if isinstance(f.default, bool): return lambda v: v.lower() in ('1', 'true', 'yes')
    if isinstance(f.default, tuple): return type(f.default[0])   # one of its numbers (nargs: as many as the default has)
    return str if f.default is None else type(f.default)


def _flag_kwargs(f: dataclasses.Field) -> dict:
    "type and metavar of a config field's flag; a tuple field takes as many space-separated numbers as its default has."
    if not isinstance(f.default, tuple): return dict(type=_flag_type(f), metavar=f.name.upper())
    names = TUPLE_NAMES.get(f.name, tuple(f"{f.name.upper()}{i + 1}" for i in range(len(f.default))))
    return dict(type=_flag_type(f), nargs=len(f.default), metavar=names)


def _shown(v) -> str: return ' '.join(map(str, v)) if isinstance(v, tuple) else str(v)


# %%
_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
test_eq(_train_flags(_fields['log_every']), ['--log-every', '--log_every', '--log_interval'])
test_eq(_flag_kwargs(_fields['cfg_interval'])['metavar'], ('LO', 'HI')); test_eq(_flag_kwargs(_fields['cfg_interval'])['nargs'], 2)
test_eq(_flag_type(_fields['batch_size']), int); test_eq(_shown((0.0, 1.0)), '0.0 1.0')


# %% [markdown]
# The numbers of a tuple setting are checked before argparse sees them (a negative number is a value, not a flag):

# %%
#| export
def _is_flag(a: str) -> bool:
    "An option such as `--lr`, not a (negative) number."
    try: float(a); return False
    except ValueError: return a.startswith('-')


def _parses(kind: type, text: str) -> bool:
    try: kind(text); return True
    except ValueError: return False


def check_tuple_args(argv: list[str], error: Callable[[str], Any]) -> list[str]:
    """`argv` with every tuple setting's numbers checked -- as many as the field's default has, each of its kind --
    and `error` (the parser's) naming the form otherwise. Comma-separated numbers are split: `--cfg-interval 0.6,1`
    and `--cfg-interval=0.6,1` read as `--cfg-interval 0.6 1`."""
    tuples = {n: f for f in dataclasses.fields(TrainConfig) if isinstance(f.default, tuple) for n in _train_flags(f)}
    tuples |= {f"--model.{f.name}": f for f in dataclasses.fields(ModelConfig) if isinstance(f.default, tuple)}
    out, i = [], 0
    while i < len(argv):
        flag, eq, val = argv[i].partition('=')
        f = tuples.get(flag) if argv[i].startswith('--') else None
        if f is None: out.append(argv[i]); i += 1; continue
        j = i + 1
        while j < len(argv) and not _is_flag(argv[j]): j += 1        # its values: up to the next flag
        given = ([val] if eq else []) + argv[i + 1:j]
        nums = [v.strip() for g in given for v in g.split(',') if v.strip()]
        kind, n = _flag_type(f), len(f.default)
        if len(nums) != n or not all(_parses(kind, v) for v in nums):
            error(f"argument {flag}: expected {n} {'whole numbers' if kind is int else 'numbers'} "
                  f"{' '.join(_flag_kwargs(f)['metavar'])}, as in `{flag} {_shown(f.default)}`; "
                  + (f"got {' '.join(given)!r}" if given else 'got none'))
        out += [flag, *nums]; i = j
    return out


# %%
test_eq(check_tuple_args(['--cfg-interval=0.6,1', '--lr', '-1'], print), ['--cfg-interval', '0.6', '1', '--lr', '-1'])
assert not _is_flag('-1') and _is_flag('--lr') and _parses(int, '3') and not _parses(int, 'x')
test_fail(lambda: check_tuple_args(['--cfg-interval', '0.6'], lambda m: 1 / 0), exc=ZeroDivisionError)


# %% [markdown]
# The parser, and the configs it resolves:

# %%
#| export
def train_parser() -> argparse.ArgumentParser:
    "The parser of `fsdit train` (flags default to None: only given flags override)."
    p = Parser(prog='fsdit train', description='Train (or resume) a few-shot DiT on a feature store.')
    p.add_argument('--feats', '--data_dir', help='feature store (output of `fsdit precompute`); default: the one the run used')
    p.add_argument('--out', '--save_dir', required=True, help='run directory; an existing run resumes from its latest checkpoint')
    p.add_argument('--model', help="model preset (default B/2): " + ', '.join(MODEL_PRESETS))
    p.add_argument('--preset', help="training preset (default seed): " + ', '.join(TRAIN_PRESETS))
    p.add_argument('--vae', help='VAE for decoding sample grids (default: the store\'s)')
    p.add_argument('--val-batches', type=positive_int, help='fixed validation batches per evaluation (default 4)')
    p.add_argument('--distributed', action='store_true', help='call jax.distributed.initialize() (multi-host)')
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(*_train_flags(f), dest=f"train.{f.name}", **_flag_kwargs(f),
                       help=f"TrainConfig.{f.name} (preset default {_shown(f.default)})")
    for f in dataclasses.fields(ModelConfig):
        p.add_argument(f"--model.{f.name}", dest=f"model.{f.name}", **_flag_kwargs(f), help=argparse.SUPPRESS)
    return p


def resolve_configs(args, store_meta: dict | None) -> tuple[ModelConfig, TrainConfig]:
    "Configs from the saved run (if any) or the presets, then the given flags, then the store's shapes."
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if v is not None}   # nargs: a list
    pick = lambda prefix: {k.split('.', 1)[1]: v for k, v in given.items() if k.startswith(prefix + '.')}
    saved = read_run_config(args.out)
    mc0 = config_to_dict(saved[0]) if saved and not args.model else config_to_dict(model_config(args.model or 'B/2'))
    tc0 = config_to_dict(saved[1]) if saved and not args.preset else config_to_dict(train_config(args.preset or 'seed'))
    m = store_meta or {}
    shape = {} if 'latent_shape' not in m else dict(input_size=m['latent_shape'][0], in_channels=m['latent_shape'][2])
    dim = {'support_dim': m['embed_dim']} if 'embed_dim' in m else {}
    mc = config_from_dict(ModelConfig, {**mc0, **shape, **dim, **pick('model')})
    return mc, config_from_dict(TrainConfig, {**tc0, **pick('train')})


# %% [markdown]
# The flags: seed names and new names reach the same field, a preset is the base, flags win:

# %%
a = train_parser().parse_args(['--out', '/nonexistent/run', '--model', 'mu', '--preset', 'test', '--batch_size', '16',
                               '--wandb.name', 'r1', '--ema-decay', '0.5', '--model.remat', 'true'])
m_, t_ = resolve_configs(a, {'latent_shape': [16, 16, 3], 'embed_dim': 64})
test_eq((t_.batch_size, t_.wandb_name, t_.ema_decay, t_.warmup), (16, 'r1', 0.5, 2))
test_eq((m_.hidden, m_.input_size, m_.in_channels, m_.support_dim, m_.remat), (32, 16, 3, 64, True))


# %% [markdown]
# Parsing the flags, and the command:

# %%
#| export
def parse_train_args(argv: list[str]) -> argparse.Namespace:
    "`fsdit train`'s flags; an unknown `--model.<field>` or a malformed tuple setting is refused naming what is expected."
    p = train_parser()
    args, rest = p.parse_known_args(check_tuple_args(list(argv), p.error))
    bad = [a.split('=')[0] for a in rest if a.startswith('--model.')]
    if bad: p.error(f"unknown model field(s) {bad}: fields are {[f.name for f in dataclasses.fields(ModelConfig)]}")
    if rest: p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def train_cli(argv: list[str]) -> int:
    "`fsdit train`: check every setting, open the store, train or resume; 1 with a one-line message when refused."
    args = parse_train_args(argv)
    sys.unraisablehook = ignore_closed_loops()
    try:
        if args.distributed: jax.distributed.initialize()
        check_out_dir(args.out)
        saved = run_json(args.out)                 # the run's config.json ({} for a new run)
        feats, n_val = args.feats or saved.get('feats'), args.val_batches or saved.get('val_batches', 4)
        if feats is None: raise CLIError("--feats is required for a new run: the folder `fsdit precompute` wrote")
        store = open_store(feats)
        mc, tc = resolve_configs(args, store.meta)
        source = store_source(store, tc, n_val)
        decode = lazy_vae_decode(args.vae or store.meta.get('vae')) if source.space == 'latent' else None
        embed = store_embed(store.meta)
        hooks = [FewShotHook(source, mc, tc, decode, embed)] if embed else []
        train(mc, tc, source, args.out, decode, extra={'feats': str(Path(feats).absolute()), 'val_batches': n_val}, hooks=hooks)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:   # NonFiniteLoss, RunInUse: RuntimeError
        return fail('train', e)
    return 0


# %%
import contextlib, io, tempfile
_hook = sys.unraisablehook
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(train_cli(['--out', str(Path(tempfile.mkdtemp()) / 'run')]), 1)
sys.unraisablehook = _hook
assert err.getvalue().startswith('fsdit train: --feats is required'), err.getvalue()

# %% [markdown]
# A tuple setting takes as many numbers as its default has, as `--help` names them; a wrong count or a
# non-number is refused naming the form:

# %%
import contextlib, io
parse = lambda *flags: resolve_configs(parse_train_args(['--out', '/nonexistent/run', '--preset', 'test', *flags]), None)[1]
for flags in (['--cfg-interval', '0.6', '1'], ['--cfg_interval', '0.6,1'], ['--cfg-interval=0.6,1', '--lr', '0.01']):
    test_eq(parse(*flags).cfg_interval, (0.6, 1.0))
assert '--cfg-interval LO HI' in train_parser().format_help()
for bad in (['0.6'], ['0.6', 'x'], ['[0.6,', '1.0]'], ['0.6', '1', '0.2']):
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit): parse('--cfg-interval', *bad)
    assert 'argument --cfg-interval: expected 2 numbers LO HI, as in `--cfg-interval 0.0 1.0`' in err.getvalue(), err.getvalue()
test_fail(lambda: parse('--cfg-interval', '0.9', '0.1'), contains='0 <= lo <= hi <= 1')   # the range: TrainConfig's own check
