# %% [markdown]
# # Demo
#
# > `fsdit demo --out DEMO`: the whole chain offline in minutes on a CPU — a glyph dataset rendered from the fonts matplotlib ships, split by class, a pixel-space feature store, a short training run, sample grids for seen and held-out classes, and the few-shot metrics beside real images and trivial baselines.
#
# Our machines reach no model hub and no dataset site, so the demo runs on data a dependency ships:
# **characters as classes, fonts as images** (`fsdit.glyph.data.make_offline_dataset`: 1,000 visually distinct
# characters of the fonts matplotlib ships, 20 images each). It is the same code path as a miniImageNet
# run — `prepare`, `precompute`, `train`, `sample`, `eval` — with two stand-ins: the images themselves are
# the "latents" (pixel space, gray), and the support encoder is a fixed random projection of downsampled
# pixels (`fsdit.codecs.PixelEncoder`), **not SigLIP2**. Its referee is a glyph classifier trained on every
# class (`fsdit.glyph.judge`): class consistency is the judge's verdict, glyph-FD is measured in its features.
#
# Each stage writes its output completely or not at all, and is skipped when its output is already
# there: running the demo again reuses what is done (an interrupted training run resumes from its last
# checkpoint).

# %%
#| default_exp glyph.demo

# %%
#| export
from __future__ import annotations
import json, math, threading, time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fsdit.config import GUIDE_UPTO, model_config, train_config, TrainConfig, ModelConfig, interval_text
from fsdit.codecs import PixelEncoder, PixelSpace, load_encoder, run_codecs
from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderSpec, is_glyph_encoder, train_glyph_encoder, prototype_accuracy
from fsdit.glyph.vae import GlyphVAESpec, glyph_vae
from fsdit.data import prepare
from fsdit.eval import FewShotHook, evaluate
from fsdit.features import precompute, store_source
from fsdit.glyph.data import make_offline_dataset, offline_split_sizes, glyph_classes, glyph_char
from fsdit.images import class_rows_grid, to_uint8, save_png
from fsdit.glyph.judge import glyph_judge
from fsdit.launch import lazy, lazy_vae_decode
from fsdit.files import write_atomic
from fsdit.run import load_run, saved_steps, last_logged_step, run_records
from fsdit.supports import sample_from_supports
from fsdit.train import train

# %%
import tempfile
from fastcore.test import test_eq, test_fail


# %% [markdown]
# ## Sizes
#
# `full` is the README's demo: 1,000 glyph classes at 16x16 gray (700 train / 100 val / 200 held-out
# test classes), a DiT of width 128 and depth 4 on 64 patch tokens (patch 2) between 3x3 convolutions of 32
# channels (`ModelConfig.conv`: without them each 2x2 patch is drawn on its own and the strokes came out blotched,
# with a grey rim; with them a reader trained only on the real images reads 64% of validation samples as their
# class against 58%, BENCHMARKS §8) with the supports aligned
# beside the target (`cond='aligned'`, `fsdit.dit.support_stats`), 2,200 steps of 32 episodes at
# lr 2e-3 (warmup 200 steps, EMA decay 0.9975: the EMA averages over the same number of episodes as 0.995 did at
# batch 64, and a step of 32 costs half of one of 64 on a 2-core CPU, so the budget is unchanged), 15 Euler steps with guidance at scale 8 for 0.6 <= t <= 0.8 (`fsdit.sampler`)
# for samples (all of it chosen on validation classes), and the evaluation on 40 of the 200 held-out classes and on
# 40 seen ones. `long` trains a wider and deeper model (width 192, depth 6) 6,000 steps of 64 at lr 1e-3 with a slower
# EMA (about 92 minutes of training on a quiet 2-core machine, 0.92 s a step; no convolutions: its figures were
# measured without them) and guides at scale 4 over the last half
# of the path (0.5 <= t <= 1; width, depth, scale and interval chosen on its validation classes). `tiny` runs the same stages in seconds (this
# notebook, the tests and the explorer's notebook use it). `cond` picks another conditioning (`'support'`
# is the seed's: the mean support embedding through adaLN only).
#
# Targets are not mirrored (`mirror=False`): the seed flips half of its targets, which suits photographs, but a
# mirrored character is another character or none. With the flip on, a model given the supports of 'c' learned
# to draw 'c' and its mirror about equally often (the grid of the long run with the flip on showed it).

# %%
#| export
@dataclass(frozen=True)
class DemoSize:
    "Everything the demo's size decides."
    per_class: int = 20                   # images per glyph class
    image_size: int = 16                  # pixels (the model's input grid)
    classes: int = 1000                   # glyph classes (`fsdit.glyph.data.glyph_classes`), unless `chars` is given
    chars: str | None = None              # the characters themselves
    channels: int = 1                     # 1: gray pixels; 3: RGB
    data: str = 'aligned'                 # glyph style (`fsdit.glyph.data.GLYPH_STYLES`): centred gray, or placed and coloured at random
    embed_dim: int = 64                   # stand-in support embedding width
    encoder: dict | None = None           # `train_glyph_encoder` settings of a trained stand-in encoder; None: the random projection
    vae: dict | None = None               # `GlyphVAESpec` fields and `train_glyph_vae` settings of a glyph VAE; None: pixel space
    cond: str = 'aligned'                 # the conditioning (see `fsdit.config.CONDS`)
    # `fsdit train`'s settings: `model` is `--model PRESET --model.FIELD VALUE ...`, `train` is `--preset PRESET --FIELD VALUE ...`
    model: dict = field(default_factory=lambda: dict(preset='mu', hidden=128, depth=4, heads=4, patch=2, conv=32))
    train: dict = field(default_factory=lambda: dict(
        preset='short', mirror=False, batch_size=32, max_steps=2200, lr=2e-3, warmup=200, ema_decay=0.9975, log_every=100,
        eval_every=1100, sample_every=2200, save_every=1100, fewshot_every=1100, fewshot_classes=16, fewshot_n=6, keep=2))
    judge: dict = field(default_factory=lambda: dict(per_class=16, epochs=10))   # `fsdit.glyph.judge.train_judge`
    cfg: float = 8.0                      # CFG of the grids and the headline (chosen on validation classes)
    cfg_interval: tuple = (0.6, 0.8)      # ... applied where 0.6 <= t <= 0.8 (chosen with it on validation classes: guiding
                                          # the end of the path too leaves grey speckle on the paper, 7.5% of paper pixels
                                          # off up to 0.9 and 6.5% up to 0.8, real 5.5%, at the same consistency)
    grid_classes: int = 8                 # classes in each sample grid
    grid_samples: int = 8                 # samples per class in the grids
    eval_classes: int = 40                # classes of each split in the eval (drawn at random)
    eval_per_class: int = 10              # generated images per class (half a class's real images: see glyph-FD)
    eval_cfg: tuple = (8.0,)              # CFG scales evaluated (over `cfg_interval`)
    sample_steps: int = 15                # Euler steps for grids and eval (the seed samples with 50; chosen on val)
    guide: float = 0.0                    # encoder guidance of grids and eval (`fsdit.sampler.encoder_guided`); 0: off
    guide_upto: float = GUIDE_UPTO        # ... where t <= guide_upto
    from_support: float = 0.0             # grids and eval start at this t from a support, noised (SDEdit); 0: from noise


# %%
test_eq((DemoSize().image_size, DemoSize().cfg_interval, DemoSize(cfg=2.0).cfg), (16, (0.6, 0.8), 2.0))
test_fail(lambda: setattr(DemoSize(), 'cfg', 1.0))                  # frozen: a size is changed with `replace`

# %% [markdown]
# The sizes, what the unaligned data changes, and the configs a size makes:

# %%
#| export
DEMO_SIZES = {
    'full': DemoSize(),
    'long': DemoSize(model={**DemoSize().model, 'hidden': 192, 'depth': 6, 'conv': 0},
                     train={**DemoSize().train, **dict(batch_size=64, max_steps=6000, lr=1e-3, warmup=100, ema_decay=0.999, log_every=100, eval_every=1500,
                                                      sample_every=6000, save_every=1000, fewshot_every=1000)},
                     cfg=4.0, cfg_interval=(0.5, 1.0), eval_cfg=(4.0,)),
    'tiny': DemoSize(per_class=6, chars='0123456789ABCDEFGHIJKLMN', embed_dim=16, model=dict(preset='mu', patch=4),
                     train=dict(preset='test', mirror=False, batch_size=8, max_steps=30, log_every=10, eval_every=30,
                                sample_every=30, save_every=30, keep=1),
                     judge=dict(per_class=8, epochs=4, batch_size=32), cfg=3.0, cfg_interval=(0.5, 1.0),
                     grid_classes=3, grid_samples=8, eval_classes=4, eval_per_class=2, eval_cfg=(3.0,), sample_steps=4),
}

# %%
#| export
# What the unaligned data changes at every size: 24 px RGB (a character at half the side is still legible), a
# trained stand-in encoder, a glyph VAE trained on its own renderings (the DiT models its 12x12x4 latents at patch 2,
# as a miniImageNet run models SD-VAE latents: in pixel space no model drew a character; BENCHMARKS §8),
# cross-attention to the supports' latents (3x3 patches: 16 tokens a support), and 3x3 convolutions of 32 channels
# around the transformer. The full size trains twice the aligned demo's steps: a latent step costs half a pixel one.
# Samples are steered by the encoder (encoder guidance at scale 1 for t <= 0.7, chosen on validation classes): the
# encoder knows every class's shape, the DiT at this budget only their texture. The encoder is trained on adversarial
# examples (L2 radius 0.5, chosen on validation classes against 0, 0.25 and 1), so that the gradient guidance follows
# is the strokes of a class, not a pattern only this encoder reads. Each sample starts at t = 0.3 from one of its
# supports, noised (SDEdit: the support's place, size and colours survive, its detail is redrawn); chosen on validation
# classes as the latest start whose samples sit no nearer their supports (in the judge's features) than unseen real
# images do, at 20 Euler steps and CFG 4: as consistent as 15 steps at CFG 8 from 0.4, nearer the data (BENCHMARKS §8).
UNALIGNED = dict(image_size=24, channels=3, cond='xattn', model=dict(patch=2, context_patch=3, conv=32), guide=1.0,
                 from_support=0.3,
                 vae=dict(blocks=(32, 64), latent_channels=4, groups=16, per_class=12, steps=1000),
                 encoder=dict(per_class=48, steps=2500, adv_eps=0.5), judge=dict(per_class=48, epochs=5))
UNALIGNED_TRAIN = {'full': dict(max_steps=4400, save_every=1100, eval_every=2200, sample_every=4400)}
_UNALIGNED_SAMPLER = dict(cfg=4.0, eval_cfg=(4.0,), cfg_interval=(0.6, 0.9), sample_steps=20)
UNALIGNED_SIZES = {   # per size, what differs from UNALIGNED; each sampler chosen on the size's own validation classes
    'full': _UNALIGNED_SAMPLER,
    'long': {**_UNALIGNED_SAMPLER, 'from_support': 0.2},   # its samples sit nearer their supports: the rule starts it earlier
    'tiny': dict(encoder=dict(per_class=8, steps=30, batch_size=32), judge=dict(per_class=8, epochs=4, batch_size=32),
                 vae=dict(blocks=(8, 16), latent_channels=4, groups=4, per_class=4, steps=20, batch_size=16))}


def demo_size(name: str = 'full', data: str = 'aligned', **overrides) -> DemoSize:
    "The demo size `name` on `data` ('aligned' or 'unaligned' glyphs) with `overrides` applied (an override always wins)."
    if name not in DEMO_SIZES: raise KeyError(f"unknown demo size {name!r}; choose one of {sorted(DEMO_SIZES)}")
    s = DEMO_SIZES[name]
    if data == 'unaligned':
        u = {**UNALIGNED, **UNALIGNED_SIZES.get(name, {})}
        s = replace(s, data=data, **{**u, 'model': {**s.model, **u['model']}, 'train': {**s.train, **UNALIGNED_TRAIN.get(name, {})}})
    elif data != 'aligned': raise ValueError(f"unknown demo data {data!r}; choose 'aligned' or 'unaligned'")
    return replace(s, **overrides)


def vae_settings(s: DemoSize) -> tuple[GlyphVAESpec, dict]:
    "The glyph VAE's shape and its training settings, from `s.vae`."
    spec_keys = set(GlyphVAESpec.__dataclass_fields__) - {'image_size'}
    v = dict(s.vae or {})
    return (GlyphVAESpec(image_size=s.image_size, **{k: v.pop(k) for k in list(v) if k in spec_keys}), v)


def demo_latent_shape(s: DemoSize) -> tuple[int, int, int]:
    "What the DiT models: the pixels (side, side, channels), or the glyph VAE's latent grid."
    if not s.vae: return (s.image_size, s.image_size, s.channels)
    c = vae_settings(s)[0].config()
    return (s.image_size // c.downsample_factor, s.image_size // c.downsample_factor, c.latent_channels)


def demo_configs(s: DemoSize, cond: str | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The model and the training recipe of a demo size, made as `fsdit train` makes them and by the same functions
    (`fsdit.config.model_config`, `train_config`): each preset with the size's settings, the store's shape (pixels,
    channels, embedding width) and the size's sampling (`cond`: the size's unless given). The only place they are made."""
    m, t = dict(s.model), dict(s.train)
    side, _, ch = demo_latent_shape(s)
    mc = model_config(m.pop('preset'), cond=cond or s.cond, **{'input_size': side, 'in_channels': ch, 'support_dim': s.embed_dim, **m})
    tc = train_config(t.pop('preset'), sample_steps=s.sample_steps, cfg_scale=s.cfg, cfg_interval=s.cfg_interval,
                      guide_scale=s.guide, guide_upto=s.guide_upto, from_support=s.from_support, wandb_mode='disabled', **t)
    return mc, tc


# %% [markdown]
# The configs the sizes make, through the same preset functions `fsdit train` calls:

# %%
mc, tc = demo_configs(DEMO_SIZES['full'])
test_eq((mc.input_size, mc.in_channels, mc.tokens, mc.support_dim, mc.cond), (16, 1, 64, 64, 'aligned'))
test_eq((tc.batch_size, tc.max_steps, tc.lr, tc.sample_steps, tc.cfg_scale, tc.cfg_interval), (32, 2200, 2e-3, 15, 8.0, (0.6, 0.8)))
test_eq((tc.warmup, tc.ema_decay), (200, 0.9975))
mc_l, tc_l = demo_configs(DEMO_SIZES['long'])
test_eq((mc_l.hidden, mc_l.depth, tc_l.batch_size, tc_l.max_steps, tc_l.warmup, tc_l.cfg_scale, tc_l.cfg_interval),
        (192, 6, 64, 6000, 100, 4.0, (0.5, 1.0)))
test_eq(demo_configs(DEMO_SIZES['full'], 'support')[0].cond, 'support')
mc_t, tc_t = demo_configs(demo_size('tiny'), cond='context')
test_eq((mc_t.input_size, mc_t.tokens, mc_t.cond, tc_t.max_steps), (16, 16, 'context', 30))
test_fail(lambda: demo_size('huge'), contains="unknown demo size 'huge'")
mc_u, tc_u = demo_configs(demo_size('full', 'unaligned'))
test_eq((mc_u.input_size, mc_u.in_channels, mc_u.patch, mc_u.tokens, mc_u.cond, mc_u.context_patch), (12, 4, 2, 36, 'xattn', 3))
test_eq((tc_u.batch_size, tc_u.lr, tc_u.max_steps), (tc.batch_size, tc.lr, 2 * tc.max_steps))   # the aligned recipe, twice the steps
test_eq(demo_latent_shape(demo_size('full', 'unaligned')), (12, 12, 4))
test_eq(demo_latent_shape(demo_size('full', 'unaligned', vae=None)), (24, 24, 3))                # pixel space, one override away
test_eq(demo_configs(demo_size('tiny', 'unaligned'))[1].max_steps, 30)
test_eq(demo_size('full', 'unaligned').encoder, dict(per_class=48, steps=2500, adv_eps=0.5))   # robust: its gradient guides
test_eq(demo_size('long', 'unaligned').model['hidden'], 192)
test_eq([demo_configs(demo_size(n))[0].conv for n in ('full', 'long')], [32, 0])          # 3x3 convolutions: the default's only
test_eq((tc_u.guide_scale, tc_u.guide_upto, tc.guide_scale), (1.0, 0.7, 0.0))        # encoder guidance: unaligned only
test_eq((tc_u.from_support, tc.from_support), (0.3, 0.0))                          # and the start from a support
test_eq((tc_u.cfg_scale, tc_u.sample_steps, demo_size('full', 'unaligned').eval_cfg), (4.0, 20, (4.0,)))   # its own sampler
test_eq([demo_size(n, 'unaligned').cfg_interval for n in ('full', 'long')], [(0.6, 0.9), (0.6, 0.9)])   # each chosen on its data
test_eq([demo_size(n, d).from_support for n in ('full', 'long') for d in ('aligned', 'unaligned')], [0.0, 0.3, 0.0, 0.2])
test_eq(demo_size('long').cfg_interval, (0.5, 1.0))                                # the aligned long size keeps its own
test_fail(lambda: demo_size('full', 'tilted'), contains="unknown demo data 'tilted'")

# %% [markdown]
# They are the configs `fsdit train` resolves from the same settings given as its flags on the demo's store
# (the store gives the pixels, channels and embedding width), for every size and data:

# %%
from fsdit.commands.train import parse_train_args, resolve_configs


def _flags(d: dict, prefix: str) -> list[str]:
    "`fsdit train` flags of a settings dict (`prefix` 'model.' or '')."
    show = lambda v: [str(v).lower()] if isinstance(v, bool) else list(map(str, v)) if isinstance(v, tuple) else [str(v)]
    return [a for k, v in d.items() for a in (f"--{prefix}{k}", *show(v))]


def _as_fsdit_train(s: DemoSize) -> tuple:
    m, t = dict(s.model), dict(s.train)
    argv = ['--out', str(Path(tempfile.mkdtemp()) / 'run'), '--model', m.pop('preset'), '--preset', t.pop('preset'),
            *_flags({**m, 'cond': s.cond}, 'model.'), *_flags({**t, 'sample_steps': s.sample_steps, 'cfg_scale': s.cfg,
                                                               'cfg_interval': s.cfg_interval, 'guide_scale': s.guide,
                                                               'guide_upto': s.guide_upto, 'from_support': s.from_support,
                                                               'wandb_mode': 'disabled'}, '')]
    return resolve_configs(parse_train_args(argv), {'latent_shape': list(demo_latent_shape(s)), 'embed_dim': s.embed_dim})


for _name in DEMO_SIZES:
    for _data in ('aligned', 'unaligned'): test_eq(demo_configs(demo_size(_name, _data)), _as_fsdit_train(demo_size(_name, _data)))


# %% [markdown]
# ## The stages
#
# Each stage is a function of the demo folder that returns what it made and says whether it reused it.
# The folder holds:
#
# ```
# DEMO/glyphs/         the flat dataset (class folders of PNGs)
# DEMO/split/          train / val / test class folders (symlinks)       fsdit prepare
# DEMO/encoder/        --data unaligned: the trained stand-in encoder     fsdit.glyph.encoder (safetensors + config.json)
# DEMO/feats/          the pixel-space feature store                     fsdit precompute --stand-in
# DEMO/judge/          the glyph classifier that scores the samples      fsdit.glyph.judge
# DEMO/run/            config.json, checkpoints/, metrics.jsonl, samples/   fsdit train
# DEMO/samples_seen.png, DEMO/samples_heldout.png    supports | samples, one class a row
# DEMO/eval/           eval.json and one figure per metric               fsdit eval
# DEMO/summary.json    the headline numbers
# ```

# %%
#| export
def _log(log: Callable | None, msg: str):
    if log is not None: log(msg)


def demo_data(out, s: DemoSize, log: Callable | None = None) -> Path:
    "Render the glyph dataset and split it by class (both reused when complete); returns the split folder."
    out = Path(out); t0 = time.time()
    reused = (out / 'glyphs' / 'glyphs.json').exists() and (out / 'split' / 'prepare.json').exists()
    chars = s.chars if s.chars or reused else glyph_classes(s.classes)
    counts = make_offline_dataset(out / 'glyphs', per_class=s.per_class, size=s.image_size, chars=chars, style=s.data)
    sizes = offline_split_sizes(len(counts))
    prepare(out / 'glyphs', out / 'split', **sizes, seed=0)
    _log(log, f"data:    {out / 'split'}  ({len(counts)} {s.data} glyph classes x {s.per_class} images: "
              f"{sizes['train']} train / {sizes['val']} val / {sizes['test']} held-out test; {'reused' if reused else f'{time.time() - t0:.0f} s'})")
    return out / 'split'


def _chars(out) -> str:
    "The characters of the demo's glyph classes."
    return ''.join(map(glyph_char, sorted(json.loads((Path(out) / 'glyphs' / 'glyphs.json').read_text())['classes'])))


# %%
ex_dir, ex_s, ex_log = Path(tempfile.mkdtemp()), demo_size('tiny'), []
test_eq(demo_data(ex_dir, ex_s, ex_log.append), ex_dir / 'split')
test_eq(sorted(p.name for p in (ex_dir / 'split').iterdir()), ['prepare.json', 'test', 'train', 'val'])
test_eq(_chars(ex_dir), ex_s.chars); assert '24 aligned glyph classes x 6 images' in ex_log[-1], ex_log


# %% [markdown]
# The support encoder: the random projection, or (unaligned data) a glyph encoder trained once and kept:

# %%
#| export
def demo_encoder(out, s: DemoSize, log: Callable | None = None):
    """The stand-in support encoder: with `s.encoder`, a `GlyphEncoder` trained on its own unaligned renderings of every
    class and kept in DEMO/encoder (reused when trained with these settings); else the random pixel projection."""
    if not s.encoder: return PixelEncoder(dim=s.embed_dim)
    folder, chars, t0 = Path(out) / 'encoder', _chars(out), time.time()
    want = dict(chars=chars, **s.encoder)
    if is_glyph_encoder(folder):
        enc = GlyphEncoder.from_pretrained(folder)
        if all(enc.info.get(k) == v for k, v in want.items()):
            _log(log, f"encoder: {folder}  (held-out nearest-prototype accuracy {enc.info.get('heldout_proto_acc', float('nan')):.1%}; reused)")
            return enc
    enc = train_glyph_encoder(chars, GlyphEncoderSpec(image_size=s.image_size, embed_dim=s.embed_dim), **s.encoder)
    enc.info['heldout_proto_acc'] = _heldout_proto_acc(enc, out)
    enc = GlyphEncoder.from_pretrained(enc.save_pretrained(folder))
    _log(log, f"encoder: {folder}  (a glyph encoder trained on its own renderings of {len(chars)} classes; held-out "
              f"nearest-prototype accuracy {enc.info['heldout_proto_acc']:.1%}; {time.time() - t0:.0f} s)")
    return enc


def _heldout_proto_acc(enc, out) -> float:
    "Nearest 5-shot prototype accuracy of `enc` on the dataset's images of the held-out (test) classes."
    from fsdit.data import folder_images
    return prototype_accuracy(enc, *folder_images(Path(out) / 'split' / 'test'))


# %%
ex_enc = demo_encoder(ex_dir, ex_s)                                 # the tiny size trains no encoder
test_eq(ex_enc.name, PixelEncoder(dim=16).name)
assert 0.25 < _heldout_proto_acc(ex_enc, ex_dir) <= 1               # 4 held-out classes: chance is 0.25


# %% [markdown]
# The glyph VAE (unaligned data: the DiT then models its latents, as on miniImageNet), the store, and the judge:

# %%
#| export
def demo_vae(out, s: DemoSize, log: Callable | None = None):
    """With `s.vae`, the glyph VAE trained on its own renderings of every class and kept in DEMO/vae (a diffusers
    `AutoencoderKL` folder; reused when trained with these settings); else None: the DiT works on pixels."""
    if not s.vae: return None
    spec, kw = vae_settings(s)
    return glyph_vae(Path(out).absolute() / 'vae', _chars(out), spec, log=log, **kw)


def demo_store(out, s: DemoSize, encoder=None, vae=None, log: Callable | None = None, progress: bool = True):
    "The feature store of the split with the stand-in encoder: the VAE's latents, else the pixels (reused when complete)."
    out = Path(out); t0 = time.time(); reused = (out / 'feats' / 'metadata.json').exists()
    space = PixelSpace(s.image_size, s.channels) if vae is None else vae
    st = precompute(out / 'split', out / 'feats', encoder or PixelEncoder(dim=s.embed_dim), space,
                    image_size=s.image_size, space='pixel' if vae is None else 'latent', chunk_size=1024, batch_size=256,
                    progress=progress)
    _log(log, f"store:   {out / 'feats'}  ({len(st.embeds)} images, stand-in encoder {st.meta['encoder']} "
              f"(not SigLIP2), {'pixels' if vae is None else 'glyph VAE latents'}; {'reused' if reused else f'{time.time() - t0:.0f} s'})")
    return st


def demo_judge(out, s: DemoSize, log: Callable | None = None):
    "The glyph judge of every class of the dataset in its style, trained once and kept in DEMO/judge (`fsdit.glyph.judge.glyph_judge`)."
    style = {} if s.data == 'aligned' else {'style': s.data}      # the aligned judge's settings as they were
    return glyph_judge(Path(out) / 'judge', _chars(out), s.image_size, log=log, **s.judge, **style)


# %%
ex_st = demo_store(ex_dir, ex_s, ex_enc, log=ex_log.append, progress=False)
test_eq((len(ex_st.embeds), ex_st.meta['encoder']), (144, ex_enc.name)); assert 'reused' not in ex_log[-1]
demo_store(ex_dir, ex_s, ex_enc, log=ex_log.append, progress=False); assert 'reused' in ex_log[-1]


# %% [markdown]
# Training goes through `fsdit.train.train` on episodes from the store. The trainer logs to
# `RUN/metrics.jsonl`; a thread follows that file to move a progress bar, so the trainer needs no hook.
# A run already at its last step is not touched. A run cut off resumes from its newest checkpoint, which may be
# behind the last line of its log (the trainer cuts the log back to it), so that is where the bar starts and what the
# stage's line counts from:

# %%
#| export
def _resume_step(run: Path) -> int:
    "The step a run resumes from: its newest checkpoint (0 when none). The log may run past it; the trainer cuts it back."
    return max(saved_steps(run), default=0)


class _Follow(threading.Thread):
    "Moves a tqdm bar to the last step logged in RUN/metrics.jsonl until stopped."
    def __init__(self, run: Path, total: int, enabled: bool):
        super().__init__(daemon=True)
        from tqdm.auto import tqdm
        self.path, self.bar, self.done = run, tqdm(total=total, desc='train', unit='step', disable=not enabled), threading.Event()
        self.bar.update(_resume_step(run))

    def run_once(self):
        s = last_logged_step(self.path)
        if s > self.bar.n: self.bar.update(s - self.bar.n)

    def run(self):
        while not self.done.wait(0.5): self.run_once()

    def stop(self):
        self.done.set(); self.join(); self.run_once(); self.bar.close()


def demo_train(out, s: DemoSize, store, cond: str | None = None, log: Callable | None = None, progress: bool = True,
               judge=None) -> Path:
    "Train (or resume, or reuse) the demo run in DEMO/run; returns its folder. With a `judge` the few-shot metrics score by it."
    out = Path(out); run = out / 'run'; mc, tc = demo_configs(s, cond)
    if tc.max_steps in saved_steps(run) and last_logged_step(run) >= tc.max_steps:
        _log(log, f"train:   {run}  (done: {tc.max_steps} steps, reused)"); return run
    t0, step0 = time.time(), _resume_step(run)
    feats = str(Path(store.path).absolute())
    follow = _Follow(run, tc.max_steps, progress); follow.start()
    source = store_source(feats, tc)
    decode = lazy_vae_decode(store.meta['vae']) if source.space == 'latent' else None      # the glyph VAE's decoder
    hook = FewShotHook(source, mc, tc, decode, load_encoder(store.meta['encoder']).embed, judge=judge)
    try: train(mc, tc, source, run, decode, extra={'feats': feats}, hooks=[hook])   # as `fsdit train --feats` does
    finally: follow.stop()
    last = run_records(run)[-1]
    _log(log, f"train:   {run}  ({mc.cond} conditioning, {tc.max_steps - step0} steps of {tc.batch_size}"
              f"{f' from step {step0}' if step0 else ''} in "
              f"{time.time() - t0:.0f} s; final train loss {last.get('train/loss', float('nan')):.4f}, "
              f"val loss {last.get('val/loss', float('nan')):.4f})")
    return run


# %%
_r = Path(tempfile.mkdtemp()) / 'run'; (_r / 'checkpoints' / '1000').mkdir(parents=True)
(_r / 'metrics.jsonl').write_text(''.join(json.dumps({'step': k, 'train/loss': 0.2}) + '\n' for k in (500, 1000, 1500)))
test_eq((_resume_step(_r), last_logged_step(_r), _resume_step(_r.parent / 'none')), (1000, 1500, 0))

# %%
import contextlib, io
with contextlib.redirect_stderr(io.StringIO()):                     # the bar's output
    ex_f = _Follow(_r, 2000, True); test_eq(ex_f.bar.n, 1000)         # starts at the newest checkpoint
    with open(_r / 'metrics.jsonl', 'a') as fh: fh.write(json.dumps({'step': 2000}) + '\n')
    ex_f.start(); ex_f.stop(); test_eq(ex_f.bar.n, 2000)


# %% [markdown]
# The grids show, one class a row, the 5 supports (left of the gap) and images generated from them at
# the run's CFG scale; the supports are drawn from the store, each class with its own seed. A grid is
# remade only when the run it shows has moved on (its step is recorded beside it).

# %%
#| export
def demo_grid(run, codecs, store, split: str, s: DemoSize, seed: int = 0) -> np.ndarray:
    "A grid of `s.grid_classes` classes of `split`: 5 supports from the store, `s.grid_samples` samples each."
    rng = np.random.default_rng(seed)
    crs = store.class_rows(split)
    pick = np.sort(rng.choice(len(crs), min(s.grid_classes, len(crs)), replace=False))
    sups, gens = [], []
    for c in pick:
        rows = np.sort(rng.choice(crs[c], run.tc.shots, replace=False))
        lat = store.latents(rows)                       # pixel space: the images; else VAE latents, decoded
        sup = to_uint8(lat if run.space == 'pixel' else codecs.decode(lat), rgb=True)
        gen = sample_from_supports(run, codecs, sup, s.grid_samples, cfg_scale=s.cfg, cfg_interval=s.cfg_interval,
                                   steps=s.sample_steps, seed=seed + int(c), guide_scale=s.guide, guide_upto=s.guide_upto,
                                   from_support=s.from_support)
        sups.append(sup); gens.append(to_uint8(gen, rgb=True))
    return class_rows_grid(sups, gens, scale=GRID_SCALE,
                           titles=(f"{run.tc.shots} supports", f"{s.grid_samples} samples, {_guidance(s)}"))


GRID_SCALE = 4   # the grids are written enlarged (nearest neighbour): a 16-pixel character is 64 screen pixels


def _stamp(s: DemoSize, step: int | None, stage: str) -> dict:
    "What a grid or the eval was made from: the run's step and the size's sampling settings (the stage is remade when one differs)."
    d = {'step': step, 'cfg': s.cfg, 'cfg_interval': list(s.cfg_interval), 'sample_steps': s.sample_steps}
    if s.guide: d['guide'] = [s.guide, s.guide_upto]                 # recorded only when on: unguided stamps stay as they were
    if s.from_support: d['from_support'] = s.from_support
    if stage == 'samples': return {**d, 'grid': [s.grid_classes, s.grid_samples, GRID_SCALE]}
    return {**d, 'eval': [s.eval_classes, s.eval_per_class, list(s.eval_cfg)]}


def _stamp_ok(meta: Path, want: dict) -> bool:
    "Whether the JSON `meta` records every setting of `want` as it is now."
    try: have = json.loads(meta.read_text())
    except (OSError, ValueError): return False
    return isinstance(have, dict) and all(have.get(k) == v for k, v in want.items())


def _loader(run_dir) -> Callable:
    "A function that loads the run (EMA weights) at its first call and returns the same `Run` after."
    return lazy(lambda: load_run(run_dir))


def _guidance(s: DemoSize) -> str:
    return (f"CFG {s.cfg:g}{interval_text(s.cfg_interval)}" + (f", encoder guidance {s.guide:g} for t <= {s.guide_upto:g}" if s.guide else '')
            + (f", from a support at t = {s.from_support:g}" if s.from_support else ''))


# %%
test_eq(_stamp(ex_s, 30, 'samples'), {'step': 30, 'cfg': 3.0, 'cfg_interval': [0.5, 1.0], 'sample_steps': 4, 'grid': [3, 8, 4]})
test_eq(_stamp(ex_s, 30, 'eval')['eval'], [4, 2, [3.0]])
ex_meta = ex_dir / 'stamp.json'
assert not _stamp_ok(ex_meta, {'step': 30})                         # no file, no stamp
ex_meta.write_text(json.dumps(_stamp(ex_s, 30, 'samples')))
assert _stamp_ok(ex_meta, _stamp(ex_s, 30, 'samples')) and not _stamp_ok(ex_meta, _stamp(ex_s, 40, 'samples'))
test_eq(_guidance(ex_s), 'CFG 3 for t in [0.5, 1]')
test_fail(_loader(ex_dir / 'no-run'), contains='not a run directory')   # loaded when called, not before


# %% [markdown]
# The grids' stage:

# %%
#| export
def demo_samples(out, s: DemoSize, store, log: Callable | None = None, get_run: Callable | None = None) -> dict:
    "DEMO/samples_seen.png (train classes) and DEMO/samples_heldout.png (test classes), remade when stale."
    out = Path(out); step = max(saved_steps(out / 'run'), default=None)
    files = {'seen': out / 'samples_seen.png', 'heldout': out / 'samples_heldout.png'}
    if all(p.exists() and _stamp_ok(p.with_suffix('.json'), _stamp(s, step, 'samples')) for p in files.values()):
        _log(log, f"samples: {files['seen']}, {files['heldout']}  (reused)"); return files
    run = (get_run or _loader(out / 'run'))()
    codecs, t0 = run_codecs(run, store.path), time.time()
    for (name, path), split in zip(files.items(), ('train', 'test')):
        path.with_suffix('.json').unlink(missing_ok=True)   # a grid without its stamp is never taken for a finished one
        save_png(demo_grid(run, codecs, store, split, s), path)
        write_atomic(path.with_suffix('.json'), json.dumps({**_stamp(s, run.step, 'samples'), 'split': split}))
    _log(log, f"samples: {files['seen']}, {files['heldout']}  (supports | samples at {_guidance(s)}; "
              f"{time.time() - t0:.0f} s)")
    return files


# %% [markdown]
# The evaluation is `fsdit.eval.evaluate` on the held-out test classes and as many seen (train) classes,
# with the judge: its class consistency (`judge_acc`), glyph-FD (`glyph_fd`), diversity and distance to the
# nearest support in its features, for the model at each CFG scale, for real images (the judge never
# trained on them: they are its held-out accuracy and the FD floor), and for the two trivial baselines
# (*copy* returns a support, *mean* the supports' pixel mean). The stand-in embedding's numbers are in
# `eval.json` too. `summary.json` keeps the headline at the size's CFG: each figure of the model beside
# real images', and the ratios the demo is judged by (`vs_real`).

# %%
#| export
from fsdit.glyph.judge import JUDGE_METRICS as HEADLINE


def demo_summary(res: dict, cfg: float) -> dict:
    "Per split: the judge's metrics of real images, both baselines and the model at `cfg`, and model / real ratios."
    out = {}
    for r in res['records']:
        if r['cfg'] is not None and not math.isclose(r['cfg'], cfg): continue
        d = out.setdefault(r['split'], {'classes': r['classes'], 'judge_chance': r.get('judge_chance')})
        d[r['method']] = {k: r.get(k) for k in HEADLINE}
    for d in out.values():
        if 'model' in d and 'real' in d:
            d['vs_real'] = {k: d['model'][k] / d['real'][k] if d['real'][k] else None for k in HEADLINE}
    return out


def summary_table(summary: dict) -> str:
    "The headline as text: a row per split and method."
    rows = [['split', 'method', *HEADLINE]]
    for split, d in summary.items():
        if not isinstance(d, dict) or 'real' not in d: continue
        for m in ('real', 'copy', 'mean', 'model', 'vs_real'):
            if m in d: rows.append([split, m, *('-' if d[m][k] is None else f"{d[m][k]:.3f}" for k in HEADLINE)])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return '\n'.join(' '.join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


# %%
ex_res = {'records': [dict(split='test', method=m, cfg=c, classes=4, judge_chance=0.25, **{k: v for k in HEADLINE})
                      for m, c, v in (('real', None, 0.5), ('copy', None, 0.2), ('model', 3.0, 0.25), ('model', 2.0, 0.9))]}
ex_sum = demo_summary(ex_res, 3.0)
test_eq((ex_sum['test']['model']['judge_acc'], ex_sum['test']['vs_real']['glyph_fd']), (0.25, 0.5))
assert 'mean' not in ex_sum['test'] and ex_sum['test']['classes'] == 4
test_eq(summary_table(ex_sum).splitlines()[0].split(), ['split', 'method', *HEADLINE])
test_eq([l.split()[1] for l in summary_table(ex_sum).splitlines()[1:]], ['real', 'copy', 'model', 'vs_real'])


# %% [markdown]
# The eval's stage:

# %%
#| export
def demo_eval(out, s: DemoSize, store, log: Callable | None = None, get_run: Callable | None = None, judge=None) -> dict:
    "DEMO/eval/eval.json and figures (remade when the run moved on); returns the summary."
    out = Path(out); step = max(saved_steps(out / 'run'), default=None); ev = out / 'eval' / 'eval.json'
    if ev.exists() and _stamp_ok(out / 'summary.json', _stamp(s, step, 'eval')):
        _log(log, f"eval:    {ev}  (reused)")
        return json.loads((out / 'summary.json').read_text())
    (out / 'summary.json').unlink(missing_ok=True)
    run, t0 = (get_run or _loader(out / 'run'))(), time.time()
    res = evaluate(run, store, split='test', seen_split='train', n_per_class=s.eval_per_class,
                   shots=(run.tc.shots,), cfg_scales=s.eval_cfg, steps=s.sample_steps, max_real_per_class=None,
                   judge=judge, n_classes=s.eval_classes, out=out / 'eval', cfg_interval=s.cfg_interval,
                   guide_scale=s.guide, guide_upto=s.guide_upto, from_support=s.from_support)
    summary = {**_stamp(s, run.step, 'eval'), 'cond': run.mc.cond, **demo_summary(res, s.cfg)}
    write_atomic(out / 'summary.json', json.dumps(summary, indent=1))
    _log(log, f"eval:    {ev}  ({time.time() - t0:.0f} s; {_guidance(s)}, the judge's metrics; vs_real = model / real)\n"
              + summary_table(summary))
    return summary


# %% [markdown]
# The stages in order, and the demo that runs them:

# %%
#| export
STAGES = ('data', 'encoder', 'vae', 'store', 'judge', 'train', 'samples', 'eval')


def demo(out='demo', size: str | DemoSize = 'full', cond: str | None = None, until: str = 'eval',
         log: Callable | None = None, progress: bool = True) -> dict:
    "Run the demo's stages into `out` up to `until` (each reused when done); returns what each made and `timings`."
    if until not in STAGES: raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    s = demo_size(size) if isinstance(size, str) else size
    if cond: s = replace(s, cond=cond)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    _log(log, f"fsdit demo -> {out.resolve()}")
    res: dict[str, Any] = {'timings': {}}
    def stage(name, key, fn, *args):                # res[key]: what the stage made; True once `until` is reached
        t0 = time.time(); res[key] = fn(*args); res['timings'][name] = round(time.time() - t0, 1)
        return STAGES.index(name) >= STAGES.index(until)
    get_run = _loader(out / 'run')                  # loaded once, only if a later stage has work to do
    (stage('data', 'split', demo_data, out, s, log) or stage('encoder', 'encoder', demo_encoder, out, s, log)
            or stage('vae', 'vae', demo_vae, out, s, log)
            or stage('store', 'store', demo_store, out, s, res['encoder'], res['vae'], log, progress)
            or stage('judge', 'judge', demo_judge, out, s, log)
            or stage('train', 'run', demo_train, out, s, res['store'], s.cond, log, progress, res['judge'])
            or stage('samples', 'samples', demo_samples, out, s, res['store'], log, get_run)
            or stage('eval', 'summary', demo_eval, out, s, res['store'], log, get_run, res['judge']))
    _log(log, 'minutes: ' + ', '.join(f"{k} {v / 60:.1f}" for k, v in res['timings'].items()))
    _keep_timings(out / 'timings.json', res['timings'])
    return res


def _keep_timings(path: Path, now: dict):
    "DEMO/timings.json: the seconds of each stage the last time it did work (a reused stage keeps its figure)."
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **{k: v for k, v in now.items() if v >= 1.0 or k not in old}}, indent=1))


# %%
test_fail(lambda: demo(ex_dir, 'tiny', until='deploy'), contains='until must be one of')
ex_t = ex_dir / 'timings.json'
_keep_timings(ex_t, {'data': 5.0, 'train': 60.0}); _keep_timings(ex_t, {'data': 0.1, 'train': 30.0, 'eval': 0.2})
test_eq(json.loads(ex_t.read_text()), {'data': 5.0, 'train': 30.0, 'eval': 0.2})   # a reused stage keeps its seconds

# %% [markdown]
# ## The whole chain

# %% [markdown]
# At the `tiny` size the whole chain takes seconds. Stopped after the store (`until='store'`), the next call
# resumes there: the data and the store are reused, the rest is made.

# %%
d = Path(tempfile.mkdtemp()) / 'demo'
demo(d, 'tiny', until='store', progress=False)
assert (d / 'feats' / 'metadata.json').exists() and not (d / 'run').exists()
t0, msgs = time.time(), []
r = demo(d, 'tiny', log=msgs.append, progress=False)
first = time.time() - t0
ms = [m for m in msgs if not m.startswith('judge epoch')]                             # the judge's progress lines
test_eq(ms[0], f"fsdit demo -> {d.resolve()}")
test_eq([m.split(':')[0] for m in ms[1:7]], ['data', 'store', 'judge', 'train', 'samples', 'eval'])
assert 'reused' in ms[1] and 'reused' in ms[2] and 'reused' not in ms[3]            # resumed after the store
assert 'not SigLIP2' in ms[2] and ms[-1].startswith('minutes: data ')                # honest about the stand-in
test_eq(sorted(p.name for p in d.iterdir()),
        ['eval', 'feats', 'glyphs', 'judge', 'run', 'samples_heldout.json', 'samples_heldout.png', 'samples_seen.json',
         'samples_seen.png', 'split', 'summary.json', 'timings.json'])
for f in ('eval/eval.json', 'eval/fig_judge_acc.png', 'eval/fig_glyph_fd.png', 'judge/judge.json'): assert (d / f).exists(), f
sm = json.loads((d / 'summary.json').read_text())
test_eq((sm['step'], sm['cond'], sm['cfg'], set(sm)),
        (30, 'aligned', 3.0, {'step', 'cond', 'cfg', 'cfg_interval', 'sample_steps', 'eval', 'test', 'train'}))
for split in ('test', 'train'):
    test_eq((sm[split]['classes'], sm[split]['judge_chance']), (4, 1 / 24))           # the judge reads all 24 classes
    assert {'real', 'copy', 'mean', 'model', 'vs_real'} <= set(sm[split])
    assert all(0 <= sm[split][m]['judge_acc'] <= 1 for m in ('real', 'copy', 'mean', 'model'))
    assert sm[split]['copy']['nn_support_judge'] < 1e-6 < sm[split]['real']['nn_support_judge']
ev = json.loads((d / 'eval' / 'eval.json').read_text())
test_eq((ev['step'], set(ev['classes']), ev['settings']['judge']['classes']), (30, {'test', 'train'}, 24))
assert not set(ev['classes']['test']) & set(ev['classes']['train'])                   # held-out means unseen
test_eq(list(r['timings']), list(STAGES)); test_eq(r['run'], d / 'run')
print('\n'.join(msgs)); print(f"{first:.1f} s")

# %%
msgs2 = []
t0 = time.time(); demo(d, 'tiny', log=msgs2.append, progress=False)
assert all('reused' in m for m in msgs2[1:-1]) and len(msgs2) == 8, msgs2
assert time.time() - t0 < first
test_eq(json.loads((d / 'summary.json').read_text()), sm)

# %% [markdown]
# A grid and the eval are stamped with what they were made from (the run's step, the guidance, the sampler's steps,
# how many classes and images): asked for other settings, the demo remakes them and reuses the rest. A stage cut
# short leaves no stamp, so it is never taken for a finished one.

# %%
msgs3 = []
demo(d, replace(demo_size('tiny'), cfg=2.0, eval_cfg=(2.0,)), log=msgs3.append, progress=False)
test_eq([('reused' in m) for m in msgs3[1:7]], [True] * 4 + [False] * 2)
test_eq([json.loads((d / f).read_text())['cfg'] for f in ('samples_heldout.json', 'summary.json')], [2.0, 2.0])
(d / 'summary.json').write_text('{"step": 30, "cfg"')            # a summary cut off while it was written
msgs4 = []; demo(d, replace(demo_size('tiny'), cfg=2.0, eval_cfg=(2.0,)), log=msgs4.append, progress=False)
assert 'reused' in msgs4[5] and 'reused' not in msgs4[6], msgs4
msgs5 = []; demo(d, 'tiny', log=msgs5.append, progress=False)          # back to the size's own guidance
test_eq([('reused' in m) for m in msgs5[1:7]], [True] * 4 + [False] * 2)
test_eq(json.loads((d / 'summary.json').read_text())['cfg'], 3.0)

# %% [markdown]
# The grid of held-out classes (tiny: 30 training steps, so noise is what it should show). At the tiny
# size every batch of generated images has 8 episodes (the trainer's grid, these grids, and the eval's
# 4 classes x 2), so the sampler compiles once.

# %%
from PIL import Image
g = np.asarray(Image.open(d / 'samples_heldout.png'))
assert 10 <= g.shape[0] - GRID_SCALE * 3 * (16 + 2) <= 40          # 3 classes enlarged 4x, under a header naming the parts
assert g.shape[1] > GRID_SCALE * (5 + 3) * 16                      # 5 supports | 3 samples
Image.open(d / 'samples_heldout.png')

# %% [markdown]
# ## Command line
#
# `fsdit demo --out DEMO` (default `demo`) runs the `full` size; `--size tiny` the seconds-long one;
# `--cond support` the seed's conditioning (`context`: supports as tokens); `--until STAGE` stops early.
# The command is `fsdit.commands.demo`; run again on the folder above, it reuses every stage:

# %%
from fsdit.commands.demo import demo_cli
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()) as o: test_eq(demo_cli(['--out', str(d), '--size', 'tiny', '--no-progress']), 0)
assert o.getvalue().startswith('fsdit demo -> ') and o.getvalue().count('reused') == 6
