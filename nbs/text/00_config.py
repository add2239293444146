# %% [markdown]
# # Config
#
# > Frozen dataclass configs for the model and the training run, a preset registry keyed the way the field names models (`'B/2'`), and validation with errors that say what to change.

# %%
#| default_exp config

# %%
#| export
from __future__ import annotations
import math
from dataclasses import dataclass, fields, asdict
from typing import Any

# %%
import json
from dataclasses import replace
from fastcore.test import test_eq, test_fail

# %% [markdown]
# ## The model
#
# A DiT sees a `input_size x input_size x in_channels` grid: SD-VAE latents (28x28x4 at 224 px) or, in
# pixel mode, the images themselves. It cuts the grid into `patch x patch` patches (196 tokens for
# 28x28 with patch 2). `cond` picks how the support set enters:
#
# - `'support'` — the seed's conditioning: the mean of the 5 L2-normalised SigLIP2 embeddings goes
#   through an MLP and is added to the timestep embedding that drives adaLN (the default and the reference);
# - `'class'` — the seed's class-label mode (a label embedder with a null class): an oracle baseline
#   for seen classes, useless for unseen ones by construction;
# - `'context'` — the support images' latents also enter every block as extra tokens;
# - `'aligned'` — the supports' per-position mean and spread enter beside the noisy target as extra input
#   channels of the patch embedding (no extra tokens: the cheapest way for the supports' pixels to reach
#   the model), and the mean embedding drives adaLN as in `'support'`.

# %%
#| export
CONDS = ('support', 'class', 'context', 'aligned', 'xattn')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION = ('xla', 'cudnn')


@dataclass(frozen=True)
class ModelConfig:
    "The DiT's shape and conditioning; defaults are the seed's B/2 on 28x28x4 SD-VAE latents."
    hidden: int = 768            # token width
    depth: int = 12              # number of DiT blocks
    heads: int = 12              # attention heads
    patch: int = 2               # patch size on the input grid
    mlp_ratio: float = 4.0
    input_size: int = 28         # latent (or pixel) grid side
    in_channels: int = 4         # 4 for SD-VAE latents, 3 (or 1) in pixel mode
    cond: str = 'support'        # 'support' | 'class' | 'context' | 'aligned' | 'xattn'
    support_dim: int = 768       # SigLIP2 B/16 embedding width
    num_classes: int = 0         # only for cond='class'
    context_patch: int = 4       # patch of the support latents for cond='context' / 'xattn' (49 tokens each at 28x28)
    cfg_drop: float = 0.1        # probability the condition is replaced by the null condition in training
    dtype: str = 'float32'       # compute dtype; parameters are always float32
    attention: str = 'xla'       # jax.nn.dot_product_attention implementation
    remat: bool = False          # rematerialise each block in the backward pass
    conv: int = 0                # channels of 3x3 convolutions around the transformer (a stem before the patch
                                 # embedding, a head after the readout); 0: the seed's linear embedding and readout
    align_depth: int = 0         # after this many blocks, an MLP head maps the mean target token to the support
                                 # embedding's space, for the representation loss (`TrainConfig.align_weight`); 0: no head
    support_rms: bool = False    # scale the mean support embedding to unit RMS before its MLP; off: the seed's unit-norm
                                 # vector, whose entries (RMS 1 / sqrt(support_dim)) reach adaLN far weaker than t's

    def __post_init__(self): validate_model(self)

    @property
    def tokens(self) -> int:
        "Number of target tokens."
        return (self.input_size // self.patch) ** 2

    @property
    def head_dim(self) -> int: return self.hidden // self.heads


def _require(ok: bool, msg: str):
    if not ok: raise ValueError(msg)


def validate_model(c: ModelConfig):
    "Raise `ValueError` naming the field and the fix if `c` cannot be built."
    for name in ('hidden', 'depth', 'heads', 'patch', 'input_size', 'in_channels', 'support_dim', 'context_patch'):
        _require(getattr(c, name) > 0, f"ModelConfig.{name} must be positive, got {getattr(c, name)}")
    _require(c.conv >= 0, f"ModelConfig.conv must be 0 (no convolutions) or a channel count, got {c.conv}")
    _require(0 <= c.align_depth <= c.depth,
             f"ModelConfig.align_depth must be 0 (no head) or a block count up to depth {c.depth}, got {c.align_depth}")
    _require(c.input_size % c.patch == 0,
             f"patch {c.patch} does not divide the input size {c.input_size}: pick a patch in "
             f"{[p for p in range(1, c.input_size + 1) if c.input_size % p == 0]}")
    _require(c.hidden % c.heads == 0,
             f"heads {c.heads} does not divide hidden {c.hidden}: use a width that is a multiple of the heads")
    _require(c.hidden % 4 == 0, f"hidden {c.hidden} must be a multiple of 4 for the 2-D sin-cos positions")
    _require(c.cond in CONDS, f"cond must be one of {CONDS}, got {c.cond!r}")
    _require(c.cond != 'class' or c.num_classes > 0, "cond='class' needs num_classes > 0")
    _require(c.cond not in ('context', 'xattn') or c.input_size % c.context_patch == 0,
             f"context_patch {c.context_patch} does not divide the input size {c.input_size}")
    _require(0.0 <= c.cfg_drop < 1.0, f"cfg_drop must be in [0, 1), got {c.cfg_drop}")
    _require(c.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {c.dtype!r}")
    _require(c.attention in ATTENTION, f"attention must be one of {ATTENTION}, got {c.attention!r}")


# %% [markdown]
# Impossible settings fail when the config is made, with the fix in the message — not deep inside a
# traced function. (The seed's `debug` preset used patch 8, which does not divide 28.)

# %%
c = ModelConfig()
test_eq((c.tokens, c.head_dim), (196, 64))
test_eq(ModelConfig(input_size=32, patch=4, in_channels=3).tokens, 64)
test_fail(lambda: ModelConfig(patch=8), contains='does not divide the input size 28')
test_fail(lambda: ModelConfig(cond='xattn', context_patch=3), contains='context_patch 3')

# %% [markdown]
# ## Model presets
#
# The DiT family's sizes (Peebles & Xie, Table 1) at patch 2, the seed's `debug` size, and `mu`, a
# model small enough that every notebook runs on a CPU in seconds. `B/2` is the seed's "big" model.

# %%
#| export
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    'mu':    dict(hidden=32, depth=2, heads=2, patch=2),
    # the seed's debug size; its patch 8 does not divide 28, so patch 4 (49 tokens)
    'debug': dict(hidden=64, depth=2, heads=2, patch=4),
    'S/2':   dict(hidden=384, depth=12, heads=6, patch=2),
    'B/2':   dict(hidden=768, depth=12, heads=12, patch=2),
    'L/2':   dict(hidden=1024, depth=24, heads=16, patch=2),
    'XL/2':  dict(hidden=1152, depth=28, heads=16, patch=2),
}


def _preset(registry: dict, kind: str, name: str) -> dict:
    if name not in registry:
        raise KeyError(f"unknown {kind} preset {name!r}; choose one of {sorted(registry)}")
    return dict(registry[name])


def _check_fields(cls, overrides: dict):
    names = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad: raise TypeError(f"{cls.__name__} has no field(s) {bad}; fields are {sorted(names)}")


def model_config(name: str = 'B/2', **overrides) -> ModelConfig:
    "The preset `name` with `overrides` applied last (an override always wins)."
    _check_fields(ModelConfig, overrides)
    return ModelConfig(**{**_preset(MODEL_PRESETS, 'model', name), **overrides})


# %%
test_eq((model_config('mu').hidden, model_config('mu').patch), (32, 2))
test_eq(model_config('S/2', depth=3, cond='context').depth, 3)
test_fail(lambda: model_config('C/2'), contains='unknown model preset')

# %% [markdown]
# ## The training run
#
# The seed's recipe is the default: AdamW (0.9, 0.99, weight decay 0.01), LR 1e-4 with 5k warmup and a
# cosine decay to 1e-6, global-norm clip 1.0, EMA 0.9999, global batch 128, 200k steps, samples at CFG
# 3.0 with 50 Euler steps. Short runs need their own warmup and EMA decay: with 0.9999 the EMA is still
# $0.9999^{1000} \approx 90\%$ the initial weights after 1,000 steps, so a short run's EMA model would
# sample noise.

# %%
#| export
T_SAMPLING = ('logit_normal', 'uniform')
EPISODES = ('disjoint', 'fixed')
WANDB_MODES = ('online', 'offline', 'disabled')


@dataclass(frozen=True)
class TrainConfig:
    "The training recipe; defaults are the seed's table."
    batch_size: int = 128        # global batch, split over every device of every process
    max_steps: int = 200_000
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup: int = 5_000
    weight_decay: float = 0.01   # on weight matrices only
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    t_sampling: str = 'logit_normal'  # t = sigmoid(N(0,1)), or 'uniform'
    t_shift: float = 1.0         # training times moved toward the noise, t -> t / (t + S (1 - t)) (SD3's resolution shift); 1: off
    align_weight: float = 0.0    # weight of the representation loss (REPA-style, on the pooled target embedding); 0: off
    self_cond: float = 0.0       # share of training episodes whose support embeddings are all the target's own (0: off)
    mirror: bool = True          # the seed's random horizontal flip of the target; off where a mirror image is another class
    fsdp: bool = False           # shard parameters, EMA and optimizer state over the devices (ZeRO-3); default: replicated
    fsdp_min_size: int = 16384   # FSDP: tensors with fewer elements stay replicated
    shots: int = 5               # supports per episode
    episodes: str = 'disjoint'   # 'disjoint' (every image once per epoch) | 'fixed' (the seed's table)
    cfg_scale: float = 3.0       # for sample grids and the few-shot metrics
    cfg_interval: tuple = (0.0, 1.0)  # guidance where lo <= t <= hi (t=0 noise, t=1 data); conditional elsewhere
    sample_steps: int = 50       # Euler steps for sample grids
    guide_scale: float = 0.0     # encoder guidance (`fsdit.sampler.encoder_guided`) of `fsdit sample` and `fsdit eval`; 0: off
                                 # (the trainer's own grids and val_fs metrics are unguided)
    guide_upto: float = 0.7      # ... acting where t <= guide_upto
    from_support: float = 0.0    # `fsdit sample` / `fsdit eval` start at this t from a support, noised (SDEdit); 0: from noise
    log_every: int = 100
    eval_every: int = 5_000
    sample_every: int = 10_000
    save_every: int = 5_000
    fewshot_every: int = 10_000  # few-shot metrics on val classes (fsdit.eval.quick_eval); 0: off
    fewshot_classes: int = 16    # val classes they use
    fewshot_n: int = 8           # images generated per class (real ones: 2 fewshot_n + shots)
    keep: int = 3                # checkpoints kept
    seed: int = 0
    wandb_mode: str = 'online'   # falls back to 'offline' when no API key is set
    wandb_project: str = 'fsdit'
    wandb_name: str | None = None

    def __post_init__(self):
        if isinstance(self.cfg_interval, list): object.__setattr__(self, 'cfg_interval', tuple(self.cfg_interval))  # from JSON
        validate_train(self)


# %% [markdown]
# Guidance intervals are checked in one place, for the config and for the sampler's callers:

# %%
#| export
def check_interval(interval) -> tuple[float, float]:
    "A guidance interval as two floats (lo, hi), or `ValueError` unless 0 <= lo <= hi <= 1 (t=0 noise, t=1 data)."
    try: lo, hi = map(float, interval)
    except (TypeError, ValueError): raise ValueError(f"a guidance interval is two times (lo, hi) in [0, 1], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"a guidance interval (lo, hi) needs 0 <= lo <= hi <= 1 (t=0 noise, t=1 data), got {interval!r}")
    return lo, hi


GUIDE_UPTO = 0.7   # encoder guidance acts where t <= 0.7 unless told otherwise (chosen on the unaligned demo's validation classes)


def check_guidance(scale: float, upto: float):
    "Raise `ValueError` unless the encoder guidance scale is >= 0 (0: off) and 0 <= upto < 1."
    if not math.isfinite(scale) or scale < 0: raise ValueError(f"the guidance scale must be >= 0 (0: off), got {scale}")
    if not 0 <= upto < 1: raise ValueError(f"guidance acts where t <= upto, so upto must be in [0, 1), got {upto}")


def check_start(t: float):
    "Raise `ValueError` unless sampling from a noised support can start at `t`: 0 <= t < 1 (0: from pure noise)."
    if not (math.isfinite(t) and 0 <= t < 1):
        raise ValueError(f"sampling from a support starts at a time t in [0, 1) (0: from pure noise; 0.4 keeps the "
                         f"support's layout and redraws the rest), got {t}")


def interval_text(interval) -> str:
    "' for t in [lo, hi]' to follow a CFG scale in messages and labels; '' for the whole path."
    lo, hi = check_interval(interval)
    return '' if (lo, hi) == (0.0, 1.0) else f' for t in [{lo:g}, {hi:g}]'


# %%
test_eq(check_interval([0.2, 1]), (0.2, 1.0))
test_eq((interval_text((0, 1)), interval_text((0.5, 1))), ('', ' for t in [0.5, 1]'))
test_fail(lambda: check_interval((0.7, 0.2)), contains='0 <= lo <= hi <= 1')


# %% [markdown]
# The run's validation, and the check that a global batch splits over the devices:

# %%
#| export
def validate_train(c: TrainConfig):
    "Raise `ValueError` naming the field and the fix if `c` cannot run."
    for name in ('batch_size', 'max_steps', 'shots', 'log_every', 'eval_every', 'sample_every', 'save_every', 'keep', 'sample_steps',
                 'fsdp_min_size'):
        _require(getattr(c, name) > 0, f"TrainConfig.{name} must be positive, got {getattr(c, name)}")
    _require(c.fewshot_every >= 0, f"TrainConfig.fewshot_every must be 0 (off) or positive, got {c.fewshot_every}")
    _require(c.fewshot_classes >= 2 and c.fewshot_n >= 1,
             f"few-shot metrics need fewshot_classes >= 2 and fewshot_n >= 1, got {c.fewshot_classes}, {c.fewshot_n}")
    _require(0 <= c.warmup <= c.max_steps, f"warmup {c.warmup} must be between 0 and max_steps {c.max_steps}")
    _require(0 < c.min_lr <= c.lr, f"lr must be positive and at least min_lr: got lr {c.lr}, min_lr {c.min_lr}")
    _require(0.0 <= c.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {c.ema_decay}")
    _require(c.grad_clip > 0, f"grad_clip must be positive, got {c.grad_clip}")
    try: check_interval(c.cfg_interval)
    except ValueError as e: raise ValueError(f"cfg_interval must be two times (lo, hi): {e}") from None
    try: check_guidance(c.guide_scale, c.guide_upto)
    except ValueError as e: raise ValueError(f"guide_scale / guide_upto: {e}") from None
    try: check_start(c.from_support)
    except ValueError as e: raise ValueError(f"from_support: {e}") from None
    _require(c.t_sampling in T_SAMPLING, f"t_sampling must be one of {T_SAMPLING}, got {c.t_sampling!r}")
    _require(math.isfinite(c.align_weight) and c.align_weight >= 0, f"align_weight must be >= 0 (0: off), got {c.align_weight}")
    _require(0 <= c.self_cond < 1, f"self_cond is a share of episodes in [0, 1) (0: off), got {c.self_cond}")
    _require(c.t_shift > 0, f"t_shift must be positive (1 is no shift; more than 1 moves training times toward the noise), got {c.t_shift}")
    _require(c.episodes in EPISODES, f"episodes must be one of {EPISODES}, got {c.episodes!r}")
    _require(c.wandb_mode in WANDB_MODES, f"wandb_mode must be one of {WANDB_MODES}, got {c.wandb_mode!r}")


def check_batch(batch_size: int, n_devices: int, n_processes: int = 1):
    "Raise `ValueError` unless the global batch splits evenly over processes and devices."
    _require(batch_size % n_devices == 0,
             f"batch size {batch_size} is not divisible by the {n_devices} devices: use a multiple of {n_devices} "
             f"(for example {max(n_devices, batch_size // n_devices * n_devices)})")
    _require(n_devices % n_processes == 0, f"{n_devices} devices do not split over {n_processes} processes")


def check_align(mc: ModelConfig, tc: TrainConfig):
    "Raise `ValueError` when the representation loss is on (`tc.align_weight`) but the model has no head for it."
    _require(not tc.align_weight or mc.align_depth > 0,
             f"align_weight {tc.align_weight} needs a model with an alignment head: set model.align_depth to a block "
             f"count in 1..{mc.depth} (a third of the depth is usual), or align_weight 0")


# %%
t = TrainConfig(cfg_interval=[0.1, 0.9])
test_eq((t.batch_size, t.cfg_interval), (128, (0.1, 0.9)))
test_fail(lambda: TrainConfig(warmup=10**6), contains='warmup')
test_fail(lambda: TrainConfig(guide_upto=1.0), contains='guide_upto')
test_fail(lambda: TrainConfig(from_support=1.0), contains='from_support')
check_batch(128, 8, 2)
test_fail(lambda: check_batch(100, 8), contains='not divisible by the 8 devices')
test_fail(lambda: TrainConfig(align_weight=-1), contains='align_weight')
test_fail(lambda: TrainConfig(self_cond=1.0), contains='self_cond')
test_fail(lambda: ModelConfig(depth=4, align_depth=5), contains='align_depth')
check_align(ModelConfig(depth=4, align_depth=2), TrainConfig(align_weight=0.5)); check_align(ModelConfig(), TrainConfig())
test_fail(lambda: check_align(ModelConfig(depth=4), TrainConfig(align_weight=0.5)), contains='model.align_depth')

# %% [markdown]
# ## Training presets
#
# `seed` is the table above. `short` is for runs of a few thousand steps (the offline demo), `test`
# for runs of tens of steps in tests: both warm up quickly and use an EMA decay whose horizon
# ($1/(1-d)$ steps) fits inside the run.

# %%
#| export
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    'seed':  dict(),
    'short': dict(batch_size=64, max_steps=3_000, lr=3e-4, warmup=200, ema_decay=0.999, log_every=50,
                  eval_every=500, sample_every=1_000, save_every=500, fewshot_every=1_000, wandb_mode='offline'),
    'test':  dict(batch_size=8, max_steps=20, lr=1e-3, warmup=2, ema_decay=0.9, log_every=5, eval_every=10,
                  sample_every=20, save_every=10, sample_steps=4, fewshot_every=0, wandb_mode='disabled'),
}


def train_config(name: str = 'seed', **overrides) -> TrainConfig:
    "The training preset `name` with `overrides` applied last."
    _check_fields(TrainConfig, overrides)
    return TrainConfig(**{**_preset(TRAIN_PRESETS, 'train', name), **overrides})


# %% [markdown]
# Overrides win over presets — the seed's code silently replaced them:

# %%
c = model_config('B/2', depth=6, dtype='bfloat16')
test_eq((c.hidden, c.depth, c.heads, c.dtype, c.tokens, c.head_dim), (768, 6, 12, 'bfloat16', 196, 64))
t = train_config('short', warmup=7)
test_eq((t.warmup, t.ema_decay, t.batch_size), (7, 0.999, 64))
test_eq(train_config().ema_decay, 0.9999)
for name in MODEL_PRESETS: assert model_config(name).tokens > 0

# %% [markdown]
# Impossible settings are refused with the fix in the message:

# %%
from fsdit.testing import raises

print(raises(lambda: model_config('B/2', patch=8), 'does not divide the input size 28'))
print(raises(lambda: model_config('B/2', heads=7), 'heads 7 does not divide hidden 768'))
print(raises(lambda: check_batch(100, 8), 'not divisible by the 8 devices'))
raises(lambda: model_config('C/2'), "unknown model preset 'C/2'")
raises(lambda: model_config('mu', widht=3), "no field(s) ['widht']")
raises(lambda: model_config('mu', cond='class'), 'num_classes')
raises(lambda: train_config(warmup=10**6), 'warmup')
raises(lambda: train_config(cfg_interval=(0.7, 0.2)), 'cfg_interval must be two times')
check_batch(128, 8); check_batch(128, 8, 2)


# %% [markdown]
# ## Saving and reading configs
#
# A run directory stores its configs as JSON so that `sample`, `eval` and a resumed run rebuild exactly
# the same model.

# %%
#| export
def config_to_dict(c) -> dict:
    "A JSON-ready dict of a config dataclass."
    return asdict(c)


def config_from_dict(cls, d: dict):
    "Rebuild a config of type `cls` from `config_to_dict` output, refusing unknown keys."
    _check_fields(cls, d)
    return cls(**d)


# %%
c = model_config('S/2', cond='context', dtype='bfloat16')
test_eq(config_from_dict(ModelConfig, json.loads(json.dumps(config_to_dict(c)))), c)
t = train_config('test', seed=3, cfg_interval=(0.6, 1.0))
test_eq(config_from_dict(TrainConfig, json.loads(json.dumps(config_to_dict(t)))), t)   # the interval comes back a tuple
