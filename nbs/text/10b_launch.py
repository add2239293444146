# %% [markdown]
# # Launch
#
# > `fsdit train` from the command line: every setting a flag, configs from the saved run, the presets and the store, the store's codecs loaded only when first used, the few-shot evaluation hook, then `fsdit.train.train`.

# %%
#| default_exp launch

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
from fsdit.run import run_json, read_run_config, ignore_closed_loops
from fsdit.train import train
from fsdit.codecs import load_encoder
from fsdit.vae import SDVAE

# %%
import numpy as np
from fastcore.test import test_eq, test_fail
from fsdit.codecs import PixelEncoder

# %% [markdown]
# ## Command line
#
# `fsdit train --feats FEATS --out RUN` trains on a feature store. Every `TrainConfig` field is a flag
# (`--batch-size` or the seed's `--batch_size`; `--wandb.name`, `--log_interval` and the seed's other
# names also work), every `ModelConfig` field is `--model.<field>`, and `--model` / `--preset` pick the
# presets. The store decides the model's input shape and embedding width. Running the same command again
# resumes: when `RUN/config.json` exists its configs are the base and only the flags given override them.
# `--distributed` calls `jax.distributed.initialize()` first (TPU pods, several hosts).

# %%
#| export
SEED_ALIASES = {'log_every': ['--log_interval'], 'eval_every': ['--eval_interval'], 'save_every': ['--save_interval'],
                'sample_every': ['--sample_interval'], 'wandb_name': ['--wandb.name'], 'wandb_project': ['--wandb.project'],
                'wandb_mode': ['--wandb.mode'], 'lr': ['--model.lr'], 'warmup': ['--model.warmup_steps']}


def _flag_type(f: dataclasses.Field):
    if isinstance(f.default, bool): return lambda v: v.lower() in ('1', 'true', 'yes')
    return str if f.default is None else type(f.default)


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
        p.add_argument(f"--{f.name.replace('_', '-')}", f"--{f.name}", *SEED_ALIASES.get(f.name, []), dest=f"train.{f.name}",
                       type=_flag_type(f), metavar=f.name.upper(), help=f"TrainConfig.{f.name} (preset default {f.default})")
    for f in dataclasses.fields(ModelConfig):
        p.add_argument(f"--model.{f.name}", dest=f"model.{f.name}", type=_flag_type(f), metavar=f.name.upper(), help=argparse.SUPPRESS)
    return p


def resolve_configs(args, store_meta: dict | None) -> tuple[ModelConfig, TrainConfig]:
    "Configs from the saved run (if any) or the presets, then the given flags, then the store's shapes."
    given = {k: v for k, v in vars(args).items() if v is not None}
    pick = lambda prefix: {k.split('.', 1)[1]: v for k, v in given.items() if k.startswith(prefix + '.')}
    saved = read_run_config(args.out)
    mc0 = config_to_dict(saved[0]) if saved and not args.model else config_to_dict(model_config(args.model or 'B/2'))
    tc0 = config_to_dict(saved[1]) if saved and not args.preset else config_to_dict(train_config(args.preset or 'seed'))
    m = store_meta or {}
    shape = {} if 'latent_shape' not in m else dict(input_size=m['latent_shape'][0], in_channels=m['latent_shape'][2])
    dim = {'support_dim': m['embed_dim']} if 'embed_dim' in m else {}
    mc = config_from_dict(ModelConfig, {**mc0, **shape, **dim, **pick('model')})
    return mc, config_from_dict(TrainConfig, {**tc0, **pick('train')})


def lazy(load: Callable[[], Any]) -> Callable[[], Any]:
    "A function returning `load()`, which runs at its first call only (nothing loads if it is never called)."
    got = []
    def get():
        if not got: got.append(load())
        return got[0]
    return get


def lazy_call(load: Callable[[], Any], method: str) -> Callable:
    "A callable running `load().<method>(...)`, loading at the first call only."
    get = lazy(load)
    return lambda *args, **kwargs: getattr(get(), method)(*args, **kwargs)


def lazy_vae_decode(name: str) -> Callable:
    "A decode callable that loads the SD-VAE `name` at its first call (only when a sample grid is drawn)."
    return lazy_call(lambda: SDVAE.from_pretrained(name), 'decode')


def store_embed(meta: dict) -> Callable | None:
    "The store's support encoder as images -> embeddings, loaded at its first call; None for an unknown stand-in."
    name = meta.get('encoder')
    if not name or (meta.get('space') == 'pixel' and not str(name).startswith('stand-in/')): return None
    return lazy_call(lambda: load_encoder(name), 'embed')


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    "`fsdit train`'s flags; an unknown `--model.<field>` is refused naming the fields there are."
    p = train_parser()
    args, rest = p.parse_known_args(argv)
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
calls = []
get = lazy(lambda: calls.append(1) or {'x': 1})
test_eq(calls, []); test_eq(get(), {'x': 1}); test_eq(get(), {'x': 1}); test_eq(calls, [1])   # loaded once, when first used
test_eq(lazy_call(lambda: 'a-b', 'split')('-'), ['a', 'b'])

# %% [markdown]
# The store names its encoder: a stand-in is rebuilt from its name, SigLIP2 loads at the first use, and a name
# that is neither (a hand-made store) leaves the few-shot metrics off.

# %%
e = store_embed({'encoder': PixelEncoder(dim=32, grid=4).name, 'space': 'pixel'})
test_eq(e(np.zeros((3, 16, 16, 3), np.uint8)).shape, (3, 32))
test_eq(store_embed({'encoder': 'hand-made', 'space': 'pixel'}), None)
assert callable(store_embed({'encoder': 'google/siglip2-base-patch16-224', 'space': 'latent'}))   # nothing loaded yet

# %% [markdown]
# The flags: seed names and new names reach the same field, a preset is the base, flags win:

# %%
a = train_parser().parse_args(['--out', '/nonexistent/run', '--model', 'mu', '--preset', 'test', '--batch_size', '16',
                               '--wandb.name', 'r1', '--ema-decay', '0.5', '--model.remat', 'true'])
m_, t_ = resolve_configs(a, {'latent_shape': [16, 16, 3], 'embed_dim': 64})
test_eq((t_.batch_size, t_.wandb_name, t_.ema_decay, t_.warmup), (16, 'r1', 0.5, 2))
test_eq((m_.hidden, m_.input_size, m_.in_channels, m_.support_dim, m_.remat), (32, 16, 3, 64, True))
