# %% [markdown]
# # Eval
#
# > The few-shot evaluation of a run on classes it never saw — generated images beside real images, seen classes and two trivial baselines, scored with `fsdit.metrics` (and FID, the glyph judge) — its records, figures and command, and the hook that runs it during training.

# %%
#| default_exp eval

# %%
#| export
from __future__ import annotations
import json, math, sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fsdit.data import latents_at
from fsdit.features import open_store
from fsdit.fid import fid_inception, inception_features
from fsdit.images import to_uint8
from fsdit.metrics import (frechet_distance, kernel_distance, heldout_prototype_accuracy, loo_prototype_accuracy,
                           class_diversity, nearest_support_distance)
from fsdit.run import load_run
from fsdit.codecs import run_codecs
from fsdit.config import GUIDE_UPTO, check_interval
from fsdit.sampler import generate
from fsdit.conds import conditioning
from fsdit.utils import LatentScaling

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail
from fsdit.utils import l2_normalize
rng = np.random.default_rng(0)


# %% [markdown]
# ## The protocol
#
# The classes evaluated together form a `ClassSet`: their images as the feature store holds them
# (posterior-mean latents, or pixels in pixel mode) with class labels. For every class, `n_per_class`
# episodes draw `shots` supports at random and one more real image of the class as a held-out
# reference. Every image — real, generated, or a baseline's — takes the same path: latents -> decoder ->
# uint8 (as a saved PNG) -> the embedding encoder and, for FID, Inception. So real images are VAE
# reconstructions: this measures the generator net of the VAE, and needs nothing but the feature store
# (a deliberate deviation from FID on original files; in pixel mode the two are the same).
#
# Two baselines take the same path: **copy** outputs one of its supports, **mean** decodes the mean
# of the support latents (the support pixels' mean in pixel mode). A model worth having beats the mean
# and is far from the copy on the copying check.

# %%
#| export
@dataclass
class ClassSet:
    "Real images of the classes evaluated together: latents (N, h, w, c), labels (N,) in 0..C-1, class names."
    latents: np.ndarray
    labels: np.ndarray
    names: list
    embeds: np.ndarray | None = None   # (N, D) the store's support embeddings (the model's condition)
    rows: np.ndarray | None = None     # (N,) rows in the feature store

    @property
    def n_classes(self) -> int: return len(self.names)

    def take(self, idx) -> ClassSet:
        "The images `idx`, classes kept."
        pick = lambda a: None if a is None else a[idx]
        return ClassSet(self.latents[idx], self.labels[idx], self.names, pick(self.embeds), pick(self.rows))

    def limit(self, per_class: int | None, seed: int = 0) -> ClassSet:
        "At most `per_class` images of each class, drawn at random."
        if per_class is None: return self
        r = np.random.default_rng(seed)
        idx = [r.permutation(np.flatnonzero(self.labels == c))[:per_class] for c in range(self.n_classes)]
        return self.take(np.sort(np.concatenate(idx)))


def draw_episodes(labels, n_per_class: int, shots: int, seed: int = 0):
    "Per class `n_per_class` episodes: supports (M, shots) and a held-out real image (M,), indices into labels."
    labels, r = np.asarray(labels), np.random.default_rng(seed)
    sup, held, lab = [], [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots + 1:
            raise ValueError(f"class {c} has {len(members)} images; {shots}-shot episodes need at least {shots + 1}")
        for _ in range(n_per_class):
            pick = r.choice(members, shots + 1, replace=False)
            held.append(pick[0]); sup.append(pick[1:]); lab.append(c)
    return np.array(sup).reshape(-1, shots), np.array(held), np.array(lab)


# %%
cs = ClassSet(np.zeros((12, 2, 2, 1)), np.repeat(np.arange(3), 4), ['a', 'b', 'c'])
sup, held, lab = draw_episodes(cs.labels, 5, 3, seed=1)
test_eq((sup.shape, held.shape, lab.shape), ((15, 3), (15,), (15,)))
assert (cs.labels[sup] == lab[:, None]).all() and (cs.labels[held] == lab).all()
assert all(h not in s for h, s in zip(held, sup))
test_eq(cs.limit(2).labels, np.repeat(np.arange(3), 2))
test_fail(lambda: draw_episodes(cs.labels, 1, 4), contains='need at least 5')


# %% [markdown]
# The images of a method (generated, a baseline, or real) reduce to a record of numbers. Distances to
# supports are computed in chunks: the support pixels of a whole evaluation do not fit in memory.

# %%
#| export
@dataclass
class Images:
    "One method's images on a class set: uint8 pixels (M, H, W, 3), embeddings (M, D), labels (M,)."
    pixels: np.ndarray
    embeds: np.ndarray
    labels: np.ndarray
    inception: np.ndarray | None = None     # (M, 2048) when FID is on
    judge_logits: np.ndarray | None = None  # (M, n_judge_classes) when a judge is on
    judge_feats: np.ndarray | None = None   # (M, F) the judge's penultimate features

    def take(self, idx) -> Images:
        pick = lambda a: None if a is None else a[idx]
        return Images(self.pixels[idx], self.embeds[idx], self.labels[idx], pick(self.inception),
                      pick(self.judge_logits), pick(self.judge_feats))


def _px(u8) -> np.ndarray: return u8.astype(np.float32) / 127.5 - 1


def _nn_support(x, pool, supports, metric: str, chunk: int = 64) -> float:
    "Mean over i of the distance from x[i] to the nearest of pool[supports[i]]."
    d = [nearest_support_distance(x[i:i + chunk], pool[supports[i:i + chunk]], metric) for i in range(0, len(x), chunk)]
    return float(np.concatenate(d).mean())


def _halves(labels, seed: int = 0):
    "Two disjoint halves of every class (the real-vs-real floor of a Fréchet distance)."
    r, a, b = np.random.default_rng(seed), [], []
    for c in np.unique(labels):
        m = r.permutation(np.flatnonzero(labels == c)); a.append(m[: len(m) // 2]); b.append(m[len(m) // 2:])
    return np.concatenate(a), np.concatenate(b)


# %%
im4 = Images(np.zeros((4, 2, 2, 3), np.uint8), np.eye(4), np.array([0, 0, 1, 1]))
test_eq(im4.take([1, 3]).labels, [0, 1]); assert im4.take([0]).inception is None
test_eq(_px(np.array([0, 255], np.uint8)), [-1, 1])
ha, hb = _halves(np.repeat(np.arange(3), 4))
test_eq((len(ha), len(hb)), (6, 6)); assert not set(ha) & set(hb)
test_close(_nn_support(np.ones((2, 3)), np.stack([np.ones(3), np.zeros(3)]), np.array([[0, 1], [1, 1]]), 'rms'), 0.5)


# %% [markdown]
# A record: the few-shot metrics of one method's images against the real images of the same classes
# (with a judge, also the judge's class consistency, glyph-FD and -KID).

# %%
#| export
def judge_record(im: Images, real: Images, supports, judge_labels, real_ref: bool = False) -> dict:
    """The judge's metrics of `im`: class consistency (its verdict against the supports' class `judge_labels[label]`),
    glyph-FD to half `b` of every real class (real half `a` against `b` is the floor), diversity and nearest support."""
    a, b = _halves(real.labels)
    x = real.take(a) if real_ref else im
    rec = {'judge_acc': float((x.judge_logits.argmax(1) == np.asarray(judge_labels)[x.labels]).mean()),
           'glyph_fd': frechet_distance(x.judge_feats, real.judge_feats[b]),
           'glyph_kid': kernel_distance(x.judge_feats, real.judge_feats[b]),
           'judge_chance': 1.0 / im.judge_logits.shape[1]}
    div = real if real_ref else im
    rec['diversity_judge'] = class_diversity(div.judge_feats, div.labels, 'rms')
    rec['nn_support_judge'] = _nn_support(im.judge_feats, real.judge_feats, supports, 'rms')
    return rec


def image_record(im: Images, real: Images, supports, n_classes: int, real_ref: bool = False,
                 judge_labels=None) -> dict:
    "Few-shot metrics of images `im` against the real images of the same classes; supports (M, K) index real."
    rec = {'n': int(len(im.labels))}
    if real_ref:  # real images: leave-one-out prototypes, Fréchet distances between two halves
        a, b = _halves(real.labels)
        rec['proto_acc'] = loo_prototype_accuracy(real.embeds, real.labels, n_classes)
        rec['fd_embed'] = frechet_distance(real.embeds[a], real.embeds[b])
        if real.inception is not None: rec['fid'] = frechet_distance(real.inception[a], real.inception[b])
    else:
        rec['proto_acc'] = heldout_prototype_accuracy(im.embeds, im.labels, real.embeds, real.labels, supports, n_classes)
        rec['fd_embed'] = frechet_distance(im.embeds, real.embeds)
        if im.inception is not None and real.inception is not None:
            rec['fid'] = frechet_distance(im.inception, real.inception)
    div = real if real_ref else im   # real diversity over all real images, not the (repeating) held-out draws
    rec['diversity_embed'] = class_diversity(div.embeds, div.labels, 'cosine')
    rec['diversity_pixel'] = class_diversity(_px(div.pixels), div.labels, 'rms')
    rec['nn_support_embed'] = _nn_support(im.embeds, real.embeds, supports, 'cosine')
    rec['nn_support_pixel'] = _nn_support(_px(im.pixels), _px(real.pixels), supports, 'rms')
    rec['chance'] = 1.0 / n_classes
    if judge_labels is not None and im.judge_feats is not None:
        rec.update(judge_record(im, real, supports, judge_labels, real_ref))
    return rec


# %%
r1, lab12 = np.random.default_rng(1), np.repeat(np.arange(3), 4)
real12 = Images(r1.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8), l2_normalize(r1.normal(size=(12, 4))), lab12,
                judge_logits=np.eye(3)[lab12], judge_feats=r1.normal(size=(12, 4)))
sup12, held12, _ = draw_episodes(lab12, 2, 2)
rec_copy = image_record(real12.take(sup12[:, 0]), real12, sup12, 3, judge_labels=[0, 1, 2])
rec_real = image_record(real12.take(held12), real12, sup12, 3, real_ref=True, judge_labels=[0, 1, 2])
test_eq((rec_copy['n'], rec_copy['chance'], rec_copy['judge_acc'], rec_copy['judge_chance']), (6, 1 / 3, 1.0, 1 / 3))
test_close(rec_copy['nn_support_pixel'], 0.0, eps=1e-6)
assert rec_real['nn_support_pixel'] > 0 and 'fid' not in rec_copy and 'glyph_fd' in rec_real


# %% [markdown]
# A `Pipeline` says how images are made and measured; `evaluate_classes` runs the protocol on one class
# set for every shot count and CFG scale, the real images and both baselines beside the model.

# %%
#| export
@dataclass
class Pipeline:
    "decode: latents (B, h, w, c) -> images in [-1, 1]; embed: images -> (B, D); generate: see `evaluate_classes`."
    decode: Callable
    embed: Callable
    generate: Callable | None = None   # (support_embeds (M,K,D), support_latents (M,K,h,w,c), cfg_scale, seed) -> latents
    fid_model: Any = None              # pytorch-fid InceptionV3, or None to skip FID
    batch_size: int = 64
    judge: Any = None                  # images -> (logits, features), with .index(class names): `fsdit.glyph.judge.GlyphJudge`


def images_of(latents, labels, pipe: Pipeline) -> Images:
    "Decode latents in batches, quantise to uint8, embed (and Inception features when FID is on)."
    bs = pipe.batch_size
    px = np.concatenate([to_uint8(pipe.decode(latents[i:i + bs])) for i in range(0, len(latents), bs)])
    emb = np.concatenate([np.asarray(pipe.embed(_px(px[i:i + bs])), np.float64) for i in range(0, len(px), bs)])
    inc = None if pipe.fid_model is None else inception_features(px, pipe.fid_model, bs)
    jl, jf = (None, None) if pipe.judge is None else pipe.judge(_px(px))
    return Images(px, emb, np.asarray(labels), inc, jl, jf)


def evaluate_classes(pipe: Pipeline, cs: ClassSet, *, n_per_class: int = 128, shots: Sequence[int] = (5,),
                     cfg_scales: Sequence[float] = (3.0,), seed: int = 0, split: str = 'test',
                     baselines: bool = True, real: Images | None = None) -> list[dict]:
    """Records {split, method, shots, cfg, metrics...} of real images, baselines and the model on one class set.
    `real`: the class set's images through `pipe` (`images_of(cs.latents, cs.labels, pipe)`) when already at hand."""
    real = images_of(cs.latents, cs.labels, pipe) if real is None else real
    C, out = cs.n_classes, []
    jl = None if pipe.judge is None else pipe.judge.index(cs.names)
    tag = lambda method, k, cfg=None: dict(split=split, method=method, shots=int(k), cfg=cfg, classes=C)
    record = lambda im, sup, **kw: image_record(im, real, sup, C, judge_labels=jl, **kw)
    for k in shots:
        sup, held, lab = draw_episodes(cs.labels, n_per_class, k, seed + 1000 * k)
        out.append({**tag('real', k), **record(real.take(held), sup, real_ref=True)})
        if baselines:
            out.append({**tag('copy', k), **record(real.take(sup[:, 0]), sup)})
            out.append({**tag('mean', k), **record(images_of(cs.latents[sup].mean(1), lab, pipe), sup)})
        if pipe.generate is None: continue
        emb = None if cs.embeds is None else cs.embeds[sup]
        for cfg in cfg_scales:
            lat = pipe.generate(emb, cs.latents[sup], float(cfg), seed + k)
            out.append({**tag('model', k, float(cfg)), **record(images_of(lat, lab, pipe), sup)})
    return out


# %% [markdown]
# On toy data — four "classes" of 8x8 images around four templates, decoded by the identity and embedded
# by their flattened pixels — a generator that copies its first support scores exactly as the copy
# baseline, and every copy sits at distance 0 from its supports; the support mean is closer to its
# class than a copy and less diverse.

# %%
def toy_classset(n_classes=4, per_class=12, size=8, seed=0):
    r = np.random.default_rng(seed)
    templates = r.uniform(-1, 1, (n_classes, size, size, 3))
    lab = np.repeat(np.arange(n_classes), per_class)
    x = np.clip(templates[lab] + 0.3 * r.normal(size=(len(lab), size, size, 3)), -1, 1)
    return ClassSet(x.astype(np.float32), lab, [f'c{i}' for i in range(n_classes)], embeds=x.reshape(len(x), -1))

toy = toy_classset()
copy_gen = lambda emb, lat, cfg, seed: lat[:, 0]
pipe = Pipeline(decode=lambda z: z, embed=lambda x: l2_normalize(x.reshape(len(x), -1)), generate=copy_gen)
recs = evaluate_classes(pipe, toy, n_per_class=6, shots=(1, 3), cfg_scales=(1.0, 3.0))
by = {(r['method'], r['shots'], r['cfg']): r for r in recs}
test_eq(len(recs), 2 * 5)
test_eq({k: v for k, v in by[('model', 3, 3.0)].items() if k not in ('method', 'cfg')},
        {k: v for k, v in by[('copy', 3, None)].items() if k not in ('method', 'cfg')})
test_close(by[('copy', 3, None)]['nn_support_pixel'], 0.0, eps=1e-6)
test_eq(by[('real', 3, None)]['proto_acc'], 1.0)
assert by[('mean', 3, None)]['diversity_pixel'] < by[('copy', 3, None)]['diversity_pixel']
assert by[('real', 3, None)]['nn_support_pixel'] > 0


# %% [markdown]
# ## Class sets from the feature store
#
# A class set takes the posterior means (mirror state 0) and embeddings of a split's classes from the
# store, at most `max_per_class` images of each (the real side of every metric). Seen classes are drawn
# from `train` as many as the unseen split has, so that prototype accuracies share their chance level.

# %%
#| export
def class_set_from_arrays(embeds, moments, class_rows: Sequence[np.ndarray], names: Sequence[str] | None = None,
                          max_per_class: int | None = None, classes: Sequence[int] | None = None, seed: int = 0) -> ClassSet:
    "A `ClassSet` from store arrays: embeds (N, D), moments (N, 2, 2, h, w, c) and each class's rows."
    classes = range(len(class_rows)) if classes is None else classes
    r, rows, labels = np.random.default_rng(seed), [], []
    for j, c in enumerate(classes):
        rc = np.asarray(class_rows[c])
        rc = np.sort(r.permutation(rc)[:max_per_class]) if max_per_class else rc
        rows.append(rc); labels.append(np.full(len(rc), j))
    rows = np.concatenate(rows)
    names = [str(c) for c in classes] if names is None else [names[c] for c in classes]
    return ClassSet(np.asarray(latents_at(moments, rows), np.float32), np.concatenate(labels), names,
                    np.asarray(embeds[rows], np.float32), rows)


def class_set(store, split: str, max_per_class: int | None = None, n_classes: int | None = None, seed: int = 0) -> ClassSet:
    "The classes of `split` of a `fsdit.features.Store` (n_classes of them drawn at random when given)."
    cr, names = store.class_rows(split), store.classes(split)
    if not cr: raise ValueError(f"the feature store has no {split!r} split")
    classes = None
    if n_classes is not None and n_classes < len(cr):
        classes = np.sort(np.random.default_rng(seed).choice(len(cr), n_classes, replace=False))
    return class_set_from_arrays(store.embeds, store.moments, cr, names, max_per_class, classes, seed)


# %%
emb_a = rng.normal(size=(30, 4)).astype(np.float16)
mom_a = rng.normal(size=(30, 2, 2, 2, 2, 1)).astype(np.float16)
crs = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
cs2 = class_set_from_arrays(emb_a, mom_a, crs, ['x', 'y', 'z'], max_per_class=4, classes=[0, 2])
test_eq((cs2.names, cs2.latents.shape, cs2.n_classes), (['x', 'z'], (8, 2, 2, 1), 2))
test_eq(cs2.labels, np.repeat([0, 1], 4)); assert (cs2.rows[4:] >= 20).all()
test_eq(cs2.latents, mom_a[cs2.rows, 0, 0].astype(np.float32))

# %% [markdown]
# ## Evaluating a run
#
# `evaluate` runs the protocol on the unseen split and on seen classes with the run's own encoders
# (`fsdit.codecs.run_codecs`) and the EMA weights, and writes `eval.json` and one figure per metric: the
# model against the CFG scale for every shot count, with real images and both baselines as horizontal
# lines. FID needs `fid=True` (the `fsdit[fid]` extra and its weights: `fid_weights` a local file offline).

# %%
#| export
METRICS = {'proto_acc': 'prototype accuracy (class consistency)', 'fd_embed': 'Fréchet distance, embedding space',
           'fid': 'FID (Inception, pytorch-fid)', 'diversity_embed': 'diversity: mean pairwise cosine distance',
           'diversity_pixel': 'diversity: mean pairwise pixel RMS', 'nn_support_embed': 'distance to nearest support (cosine)',
           'nn_support_pixel': 'distance to nearest support (pixel RMS)',
           'judge_acc': 'class consistency by the judge (its verdict = the supports\' class)',
           'glyph_fd': 'glyph-FD: Fréchet distance in the judge\'s features',
           'glyph_kid': 'glyph-KID: kernel distance in the judge\'s features (no sample-size bias)', 'diversity_judge': 'diversity: judge features, RMS',
           'nn_support_judge': 'distance to nearest support (judge features, RMS)'}


def model_pipeline(run, codecs, *, steps: int = 50, method: str = 'euler', batch_size: int = 256, fid_model=None,
                   judge=None, cfg_interval=(0.0, 1.0), guide_scale: float = 0.0, guide_upto: float = GUIDE_UPTO,
                   from_support: float = 0.0) -> Pipeline:
    "A `Pipeline` that samples a loaded `fsdit.run.Run` (guidance where t is in `cfg_interval`) and decodes/embeds with its codecs."
    if not conditioning(run.mc).takes_supports:
        raise ValueError(f"a class-conditioned run (cond={run.mc.cond!r}) cannot generate unseen classes from supports")
    gen = lambda emb, lat, cfg, seed: generate(run.params, run.mc, emb, lat, scaling=run.scaling, seed=seed,
                                               steps=steps, cfg_scale=cfg, method=method, batch_size=batch_size,
                                               cfg_interval=cfg_interval, guide=codecs.guide, guide_scale=guide_scale,
                                               guide_upto=guide_upto, from_support=from_support)
    return Pipeline(codecs.decode, codecs.embed, gen, fid_model, batch_size=min(batch_size, 64), judge=judge)


def evaluate(run, store, *, split: str = 'test', seen_split: str | None = 'train', n_per_class: int = 128,
             shots: Sequence[int] = (5,), cfg_scales: Sequence[float] = (3.0,), steps: int = 50, seed: int = 0,
             max_real_per_class: int | None = 128, fid: bool = False, fid_weights: str | None = 'download',
             method: str = 'euler', batch_size: int = 256, codecs=None, judge=None, n_classes: int | None = None,
             out=None, cfg_interval=(0.0, 1.0), guide_scale: float = 0.0, guide_upto: float = GUIDE_UPTO,
             from_support: float = 0.0) -> dict:
    "Few-shot metrics of a run (dir or `Run`) on `split` (`n_classes` of them, drawn at random; default all) and as many seen classes; writes eval.json + figures to `out`."
    run = load_run(run) if isinstance(run, (str, Path)) else run
    store = open_store(store) if isinstance(store, (str, Path)) else store
    codecs = codecs or run_codecs(run, store.path)
    cfg_interval = check_interval(cfg_interval)
    pipe = model_pipeline(run, codecs, steps=steps, method=method, batch_size=batch_size,
                          fid_model=fid_inception(fid_weights) if fid else None, judge=judge, cfg_interval=cfg_interval,
                          guide_scale=guide_scale, guide_upto=guide_upto, from_support=from_support)
    unseen = class_set(store, split, max_real_per_class, n_classes, seed=seed)
    sets = {split: unseen}
    if seen_split: sets[seen_split] = class_set(store, seen_split, max_real_per_class, unseen.n_classes, seed)
    records = []
    for name, cs in sets.items():
        records += evaluate_classes(pipe, cs, n_per_class=n_per_class, shots=shots, cfg_scales=cfg_scales,
                                    seed=seed, split=name)
    res = dict(run=str(run.path), step=run.step, store=str(store.path), space=run.space, cond=run.mc.cond,
               trained_shots=run.tc.shots, codecs=codecs.names, classes={k: v.names for k, v in sets.items()},
               settings=dict(n_per_class=n_per_class, shots=list(shots), cfg_scales=list(map(float, cfg_scales)),
                             cfg_interval=list(cfg_interval), guide_scale=float(guide_scale), guide_upto=float(guide_upto),
                             from_support=float(from_support), steps=steps, method=method, seed=seed, max_real_per_class=max_real_per_class, fid=fid,
                             judge=None if judge is None else dict(classes=len(judge.chars), accuracy=judge.accuracy)),
               records=records)
    if out is not None: write_results(res, out)
    return res


# %%
from types import SimpleNamespace
from fsdit.config import model_config
from fsdit.glyph.judge import JUDGE_METRICS
assert set(JUDGE_METRICS) <= set(METRICS)
test_fail(lambda: model_pipeline(SimpleNamespace(mc=model_config('mu', cond='class', num_classes=3)), None),
          contains='class-conditioned run')


# %% [markdown]
# The results as JSON (`_jsonable`: NaN as null, numpy scalars as numbers) and one figure per metric:

# %%
#| export
def _jsonable(x):
    if isinstance(x, dict): return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)): return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer): return int(x)
    return x


def plot_metric(records: list[dict], metric: str, path=None):
    "One figure of `metric`: a panel per split, model vs CFG per shot count, real and baselines as lines."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    recs = [r for r in records if r.get(metric) is not None]
    splits = list(dict.fromkeys(r['split'] for r in recs))
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(4.2 * max(1, len(splits)), 3.4), squeeze=False, sharey=True)
    styles = {'real': ':', 'copy': '--', 'mean': '-.'}
    for ax, split in zip(axes[0], splits):
        for i, k in enumerate(sorted({r['shots'] for r in recs if r['split'] == split})):
            col = f'C{i}'
            m = sorted((r['cfg'], r[metric]) for r in recs if (r['split'], r['shots'], r['method']) == (split, k, 'model'))
            if m: ax.plot(*zip(*m), 'o-', color=col, label=f'model, {k}-shot')
            for meth, ls in styles.items():
                for r in recs:
                    if (r['split'], r['shots'], r['method']) == (split, k, meth):
                        ax.axhline(r[metric], color=col, ls=ls, lw=1, label=f'{meth}, {k}-shot')
        if metric == 'proto_acc':
            ax.axhline(next(r['chance'] for r in recs if r['split'] == split), color='grey', lw=0.8, label='chance')
        ax.set_title(f"{split} ({recs[0]['classes'] if recs else '?'} classes)"); ax.set_xlabel('CFG scale')
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(METRICS.get(metric, metric), fontsize=8)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=100); plt.close(fig)
    return fig


# %%
test_eq(_jsonable({'a': [float('nan'), np.float32(0.5)], 'b': (np.int64(3),)}), {'a': [None, 0.5], 'b': [3]})
fig = plot_metric(recs, 'proto_acc')
test_eq(len(fig.axes), 1); test_eq(fig.axes[0].get_title(), 'test (4 classes)')
import matplotlib.pyplot as plt; plt.close(fig)


# %% [markdown]
# Writing them to a folder, and a plain-text table of the records:

# %%
#| export
def write_results(res: dict, out) -> list[Path]:
    "eval.json and one figure per metric in the folder `out`; returns the files written."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out / 'eval.json').write_text(json.dumps(_jsonable(res), indent=1))
    files = [out / 'eval.json']
    for m in METRICS:
        if any(r.get(m) is not None for r in res['records']):
            plot_metric(res['records'], m, out / f'fig_{m}.png'); files.append(out / f'fig_{m}.png')
    return files


def results_table(records: list[dict], metrics: Sequence[str] = tuple(METRICS)) -> str:
    "A plain-text table of the records (one row each)."
    ms = [m for m in metrics if any(r.get(m) is not None for r in records)]
    head = ['split', 'method', 'shots', 'cfg'] + ms
    fmt = lambda v: '-' if v is None else (f'{v:.3f}' if isinstance(v, float) else str(v))
    rows = [[fmt(r.get(h)) for h in head] for r in records]
    w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return '\n'.join(' '.join(c.rjust(w[i]) for i, c in enumerate(row)) for row in [head] + rows)


# %% [markdown]
# Results go to `eval.json` (NaN written as null) and `fig_<metric>.png`: one panel per split, the model's
# value against the CFG scale for each shot count, and horizontal lines for the real images (dotted),
# the copy baseline (dashed) and the support-mean baseline (dash-dot) in the same colour.

# %%
tmp_out = Path(tempfile.mkdtemp())
files = write_results({'records': recs}, tmp_out)
test_eq(sorted(f.name for f in files), sorted(['eval.json'] + [f'fig_{m}.png' for m in METRICS if m != 'fid' and m not in JUDGE_METRICS]))
back = json.loads((tmp_out / 'eval.json').read_text())['records']
test_eq(len(back), len(recs)); test_close(back[0]['proto_acc'], recs[0]['proto_acc'])
tbl = results_table(recs)
assert tbl.splitlines()[0].split()[:5] == ['split', 'method', 'shots', 'cfg', 'proto_acc'] and len(tbl.splitlines()) == len(recs) + 1


# %% [markdown]
# ## During training
#
# `quick_eval` is the cheap part for the trainer: a few episodes per validation class, the model at one
# CFG scale, no baselines, no Inception — prototype accuracy (with the real images' beside it), the
# Fréchet distance in embedding space and the copying check. The trainer builds the class set once
# (`class_set_from_arrays` over its validation rows) and passes its live or EMA parameters.

# %%
#| export
def quick_eval(params, mc, cs: ClassSet, decode: Callable, embed: Callable, *, scaling: LatentScaling = LatentScaling(),
               n_per_class: int = 8, shots: int = 5, cfg_scale: float = 3.0, steps: int = 20, seed: int = 0,
               prefix: str = 'val_fs', real: Images | None = None, judge=None, cfg_interval=(0.0, 1.0)) -> dict:
    "Cheap few-shot metrics of `params` on a class set: {prefix/proto_acc, .../fd_embed, ...}; `real` as in `evaluate_classes`."
    gen = lambda emb, lat, cfg, s: generate(params, mc, emb, lat, scaling=scaling, seed=s, steps=steps, cfg_scale=cfg,
                                            cfg_interval=cfg_interval)
    recs = evaluate_classes(Pipeline(decode, embed, gen, judge=judge), cs, n_per_class=n_per_class, shots=(shots,),
                            cfg_scales=(cfg_scale,), seed=seed, baselines=False, real=real)
    real, model = recs
    keys = ('proto_acc', 'fd_embed', 'diversity_embed', 'nn_support_embed', 'judge_acc', 'glyph_fd')
    return {**{f'{prefix}/{k}': model[k] for k in keys if k in model},
            **{f'{prefix}/real_{k}': real[k] for k in ('proto_acc', 'nn_support_embed', 'judge_acc', 'glyph_fd') if k in real},
            f'{prefix}/chance': model['chance']}


# %% [markdown]
# On the toy classes with a freshly initialised `mu` DiT (whose adaLN-Zero output is 0, so every sample
# is its starting noise): the numbers are finite, the generated images are no closer to their supports
# than noise is, and the real images' accuracy sits beside the model's.

# %%
import jax
from fsdit.config import model_config
from fsdit.dit import init_params
mc_toy = model_config('mu', input_size=8, in_channels=3, patch=4, support_dim=8 * 8 * 3)
q = quick_eval(init_params(mc_toy, jax.random.PRNGKey(0)), mc_toy, toy, lambda z: z, pipe.embed,
               n_per_class=3, shots=3, steps=2)
test_eq(q['val_fs/real_proto_acc'], 1.0); test_eq(q['val_fs/chance'], 0.25)
assert all(np.isfinite(v) for v in q.values()) and q['val_fs/nn_support_embed'] > q['val_fs/real_nn_support_embed']


# %% [markdown]
# `FewShotHook` runs `quick_eval` inside training, as one of the trainer's evaluation hooks
# (`fsdit.train.Trainer(hooks=...)`): called with the EMA parameters and the step, it returns the metrics to
# log under `val_fs/`. It draws `fewshot_classes` validation classes and their real images
# (`2 fewshot_n + shots` per class) once, so the numbers are comparable along a run, and decodes and embeds
# the real images once. With a glyph `judge` (`fsdit.glyph.judge.GlyphJudge`) the records include its class
# consistency and glyph-FD. An encoder that cannot load (an offline hub) switches the hook off with a
# message instead of ending the run.

# %%
#| export
class FewShotHook:
    "A trainer hook: `quick_eval` of the EMA parameters on fixed validation classes of `source`; {} once it cannot run."
    def __init__(self, source, mc, tc, decode: Callable, embed: Callable, judge=None):
        self.source, self.mc, self.tc, self.judge = source, mc, tc, judge
        self.decode, self.embed, self.cs, self.real = decode or (lambda z: z), embed, None, None

    def class_set(self) -> ClassSet:
        "The validation classes and real images, drawn once (seeded)."
        tc, rows, src = self.tc, self.source.val_rows, self.source
        classes = np.sort(np.random.default_rng(tc.seed).choice(len(rows), min(tc.fewshot_classes, len(rows)), replace=False))
        return class_set_from_arrays(src.embeds, src.moments, rows, src.names.get('val'),
                                     max_per_class=2 * tc.fewshot_n + tc.shots, classes=classes, seed=tc.seed)

    def __call__(self, params, step: int) -> dict:
        if self.embed is None: return {}
        tc = self.tc
        try:
            if self.cs is None:
                self.cs = self.class_set()
                self.real = images_of(self.cs.latents, self.cs.labels, Pipeline(self.decode, self.embed, judge=self.judge))
            return quick_eval(params, self.mc, self.cs, self.decode, self.embed, scaling=self.source.scaling,
                              n_per_class=tc.fewshot_n, shots=tc.shots, cfg_scale=tc.cfg_scale, steps=tc.sample_steps,
                              seed=tc.seed, real=self.real, judge=self.judge, cfg_interval=tc.cfg_interval)
        except (OSError, ValueError) as e:  # an encoder that cannot load (offline hub) must not end the run
            print(f"fsdit train: few-shot metrics are off for this run: {e}", file=sys.stderr)
            self.embed = None
            return {}


# %%
import json
from fsdit.codecs import PixelEncoder
from fsdit.config import train_config
from fsdit.testing import synthetic_source
from fsdit.train import train
mc_fs = model_config('mu')
src = synthetic_source(mc_fs, train_config('test'), space='pixel', n_classes=9)   # 6 train, 3 val classes
tc_fs = train_config('test', max_steps=4, log_every=2, eval_every=4, sample_every=4, save_every=4, sample_steps=2,
                     fewshot_every=2, fewshot_classes=3, fewshot_n=2)
hook = FewShotHook(src, mc_fs, tc_fs, None, PixelEncoder(dim=mc_fs.support_dim, grid=4).embed)
with tempfile.TemporaryDirectory() as run_dir:
    train(mc_fs, tc_fs, src, run_dir, hooks=[hook])
    recs = [json.loads(l) for l in open(Path(run_dir) / 'metrics.jsonl')]
test_eq([r['step'] for r in recs], [2, 4])
for r in recs:
    test_eq(r['val_fs/chance'], 1 / 3)
    assert 0 <= r['val_fs/proto_acc'] <= 1 and 0 <= r['val_fs/real_proto_acc'] <= 1 and r['val_fs/fd_embed'] >= 0

def offline(images): raise OSError("google/siglip2-base-patch16-224: not on disk and the hub cannot be reached")
off = FewShotHook(src, mc_fs, tc_fs, None, offline)
test_eq(off(None, 2), {}); assert off.embed is None and off(None, 4) == {}

# %% [markdown]
# ## Command line
#
# `fsdit eval --run RUN --feats FEATS --split test --shots 1 3 5 --cfg 0 1 3 --n 128 --out DIR` (default
# `RUN/eval`); `--fid` adds FID (`--fid-weights FILE` offline), `--no-seen` skips the seen classes. The
# store defaults to the one the run's `config.json` names. The command is `fsdit.commands.eval`; `evaluate`, above, does the work.

# %% [markdown]
# ## Measured: does the conditioning generalise? (issue: seed vs in-context supports)
#
# `bench/generalisation.py` trains the seed's conditioning (`cond='support'`: the mean support
# embedding through adaLN) and in-context supports (`cond='context'`: the supports' pixels/latents as
# extra tokens, support patch 8) at **equal training FLOPs** on the offline glyph task (16x16x3 pixels,
# hidden 64, depth 4, batch 64; 91 train / 26 held-out classes; stand-in encoder, *not* SigLIP2), and
# scores them with `evaluate` (8 images per class, 5 shots, 25 Euler steps; chance 3.8%; standard error
# about 1.4 points near chance). Measured on a 2-core CPU:
#
# | classes | method | 1x budget (4.3 TFLOP), CFG 1 / 3 | 3x budget (12.9 TFLOP), CFG 1 / 3 |
# |---|---|---|---|
# | held-out | real images | 51.3% | 51.3% |
# | held-out | copy a support | 45.2% | 45.2% |
# | held-out | support mean | 83.2% | 83.2% |
# | held-out | seed conditioning | 2.9% / 3.4% | 5.8% / **11.5%** |
# | held-out | in-context supports | 3.4% / 4.3% | 3.4% / 2.4% |
# | seen | real images | 40.7% | 40.7% |
# | seen | seed conditioning | 2.4% / 4.8% | 6.2% / **12.5%** |
# | seen | in-context supports | 2.9% / 3.4% | 2.9% / 4.8% |
#
# Verdict, as measured: at 4.3 TFLOP neither conditioning follows the supports. At 3x the compute the
# seed's mean-vector conditioning starts to (11.5% held-out, 12.5% seen at CFG 3 — no seen/unseen gap),
# while in-context supports, which cost 2.36x the FLOPs per sample at B/2 (248 vs 105 GFLOP: 441 vs 196
# tokens) and so got fewer steps, are still at chance. The stand-in embedding is a random projection of
# pixels, so here the mean vector already carries the glyph's coarse shape, and the support-mean
# baseline's 83% mostly shows how close a pixel mean sits to the class prototype under this metric. None
# of this says how either conditioning generalises with SigLIP2 on miniImageNet: generalisation to
# unseen classes is not yet shown by fsdit.
