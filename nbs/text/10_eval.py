# %% [markdown]
# # Eval
#
# > Few-shot metrics on classes the model never saw: Fréchet distances (Inception and embedding space), class consistency by nearest prototype, diversity and a copying check — beside the same numbers for real images, for seen classes, and for two trivial baselines.

# %%
#| default_exp eval

# %%
#| export
from __future__ import annotations
import argparse, json, math, os, sys, contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import linalg

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## Fréchet distance
#
# Fit a Gaussian to each feature set; the Fréchet (2-Wasserstein) distance between $\mathcal N(\mu_1,\Sigma_1)$
# and $\mathcal N(\mu_2,\Sigma_2)$ is
#
# $$d^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2}\big).$$
#
# This is pytorch-fid's `calculate_frechet_distance`, including its fix: when the matrix square root is
# not finite (singular covariances, fewer samples than dimensions) it adds `eps` to both diagonals and
# retries, and it drops an imaginary part that is numerical noise. FID is this distance on Inception
# features; the same function measures it in SigLIP2 space.

# %%
#| export
def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    "Mean (D,) and covariance (D, D) of features (N, D), in float64 as pytorch-fid computes them."
    f = np.asarray(feats, dtype=np.float64).reshape(len(feats), -1)
    if len(f) < 2: raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    "Fréchet distance between two Gaussians (pytorch-fid's formula and eps fix)."
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sets differ in dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    "Fréchet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."
    return frechet_from_stats(*feature_stats(feats_a), *feature_stats(feats_b), eps=eps)


# %% [markdown]
# Identical sets are at distance 0; shifting a set by $\delta$ leaves its covariance alone and costs
# exactly $\lVert\delta\rVert^2$; for diagonal covariances the trace term is $\sum_i(\sqrt{a_i}-\sqrt{b_i})^2$.

# %%
rng = np.random.default_rng(0)
a = rng.normal(size=(500, 8))
test_close(frechet_distance(a, a), 0.0, eps=1e-6)
delta = np.arange(8) / 4
test_close(frechet_distance(a, a + delta), (delta ** 2).sum(), eps=1e-6)
va, vb = np.array([1., 4., 9.]), np.array([4., 1., 1.])
test_close(frechet_from_stats(np.zeros(3), np.diag(va), np.ones(3), np.diag(vb)),
           3 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum(), eps=1e-9)
# large samples of two Gaussians approach the closed form
x = rng.normal(size=(20000, 3)) * np.sqrt(va)
y = rng.normal(size=(20000, 3)) * np.sqrt(vb) + 1
test_close(frechet_distance(x, y), 3 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum(), eps=0.15)

# %% [markdown]
# With fewer samples than dimensions the covariances are singular: the eps fix keeps the result finite.

# %%
few = rng.normal(size=(5, 64))
assert np.isfinite(frechet_distance(few, few + 1))
test_fail(lambda: frechet_distance(few[:1], few), contains='at least 2')


# %% [markdown]
# ## Inception features, as pytorch-fid defines them
#
# FID is the Fréchet distance between the 2048-d final-pool activations of pytorch-fid's `InceptionV3`
# (TensorFlow's 2015 FID Inception, ported), on images in [0, 1] that the network resizes bilinearly to
# 299x299. It needs torch, torchvision and pytorch-fid — the optional extra `pip install 'fsdit[fid]'` —
# and its weights download from GitHub on first use (torch.hub caches them). Nothing here is imported
# until FID is asked for. `weights=None` builds the same architecture with random weights, so the
# feature path is tested without the download; a local `.pth` file works offline.

# %%
#| export
def _import_fid():
    "torch and pytorch_fid.inception, or an ImportError that says how to get them."
    try:
        import torch
        from pytorch_fid import inception
    except ImportError as e:
        raise ImportError(f"FID needs torch, torchvision and pytorch-fid: pip install 'fsdit[fid]'. Import failed: {e!r}") from e
    except Exception as e:  # typically RuntimeError "operator torchvision::nms does not exist"
        raise ImportError("torchvision does not load beside this torch: its compiled operators were built for another "
                          "torch (for example PyPI's CUDA torchvision beside a CPU torch). Install the torchvision that "
                          "matches your torch from the same index (for a CPU torch: pip install torchvision "
                          f"--index-url https://download.pytorch.org/whl/cpu). Import failed: {e!r}") from e
    return torch, inception


def fid_available() -> bool:
    "Whether the FID extra imports here."
    try: _import_fid(); return True
    except ImportError: return False


def _fid_inception_net(inc, state_dict=None):
    "pytorch-fid's `fid_inception_v3` with the state dict given (or random) instead of downloaded."
    net = inc._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c = inc.FIDInceptionA(192, pool_features=32), inc.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inc.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inc.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c, net.Mixed_6d = inc.FIDInceptionC(768, channels_7x7=160), inc.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inc.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = inc.FIDInceptionE_1(1280), inc.FIDInceptionE_2(2048)
    if state_dict is not None: net.load_state_dict(state_dict)
    return net


def fid_inception(weights: str | None = 'download', device: str | None = None):
    "pytorch-fid's InceptionV3 (pool3, 2048-d); weights 'download' (pytorch-fid's file), a local .pth, or None (random)."
    torch, inc = _import_fid()
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if weights == 'download':
        try: model = inc.InceptionV3([inc.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except OSError as e:  # URLError is an OSError
            raise RuntimeError(f"could not download the FID Inception weights from {inc.FID_WEIGHTS_URL} ({e}); "
                               "offline, download that file elsewhere and pass its path as the weights") from e
    else:
        sd = None if weights is None else torch.load(weights, map_location='cpu')
        build, inc.fid_inception_v3 = inc.fid_inception_v3, lambda: _fid_inception_net(inc, sd)
        try: model = inc.InceptionV3([inc.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        finally: inc.fid_inception_v3 = build
    return model.eval().to(device)


# %% [markdown]
# Images enter as fsdit holds them, NHWC in [-1, 1] (or uint8). Generated images are first quantised
# to uint8, as they would be when saved to PNG files and read back by pytorch-fid's own script.

# %%
#| export
def to_uint8(images) -> np.ndarray:
    "NHWC images in [-1, 1] (float) or uint8 -> uint8."
    x = np.asarray(images)
    if x.dtype == np.uint8: return x
    return np.clip(np.round((x.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def inception_features(images, model, batch_size: int = 50) -> np.ndarray:
    "pytorch-fid pool3 features (N, 2048) of NHWC images (uint8, or float in [-1, 1]; grayscale is repeated)."
    torch, _ = _import_fid()
    device = next(model.parameters()).device
    x = to_uint8(images)
    if x.shape[-1] == 1: x = np.repeat(x, 3, -1)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            b = torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255).to(device)
            f = model(b)[0]                                        # (b, 2048, 1, 1)
            if f.shape[2:] != (1, 1): f = torch.nn.functional.adaptive_avg_pool2d(f, (1, 1))
            out.append(f.squeeze(3).squeeze(2).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 2048))


# %% [markdown]
# With the extra installed, random weights give 2048-d features for any image size; without it (or with a
# torchvision built for another torch), the error says what to install. `tests/test_eval.py` checks this path
# against pytorch-fid's own file-reading `get_activations` in CI's second environment, which has the extra.

# %%
imgs = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
if fid_available():
    feats = inception_features(imgs, fid_inception(weights=None), batch_size=1)
    test_eq(feats.shape, (2, 2048)); assert np.isfinite(feats).all()
else:
    test_fail(lambda: fid_inception(weights=None), contains="torchvision")
test_eq(to_uint8(np.array([-1., 0., 1.])), np.array([0, 128, 255], np.uint8))


# %% [markdown]
# ## Class consistency: nearest prototype in embedding space
#
# Does a generated image show its support class? Each class gets a prototype — the normalised mean of
# the normalised embeddings of its real images — and an image is assigned to the class whose prototype
# is nearest in cosine. Accuracy is measured among the classes evaluated together (all test classes,
# say; chance is one over their number). The same accuracy for real images, each left out of its own
# class's prototype, is the ceiling the encoder allows. A generated image is scored with *its supports*
# left out of its class's prototype, so that copying a support earns no more than a real image does
# (with few images per class, a prototype that contains the copied image would favour copies).

# %%
#| export
def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    "x / |x| along `axis`."
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def _class_sums(embeds, labels, n_classes: int) -> np.ndarray:
    s = np.zeros((n_classes, embeds.shape[-1]))
    np.add.at(s, np.asarray(labels), embeds)
    return s                                                       # (C, D)


def class_prototypes(embeds, labels, n_classes: int | None = None) -> np.ndarray:
    "Normalised mean of the normalised embeddings (N, D) of each class -> (C, D)."
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    return l2_normalize(_class_sums(l2_normalize(embeds), labels, n_classes))


def prototype_accuracy(embeds, labels, prototypes) -> float:
    "Fraction of embeddings (N, D) whose nearest prototype (cosine) is their label's."
    pred = (l2_normalize(embeds) @ np.asarray(prototypes).T).argmax(-1)
    return float((pred == np.asarray(labels)).mean())


def heldout_prototype_accuracy(embeds, labels, ref_embeds, ref_labels, exclude, n_classes: int | None = None) -> float:
    "Nearest-prototype accuracy of embeddings (M, D) whose own class prototype leaves out the references `exclude` (M, K)."
    labels, ref_labels = np.asarray(labels), np.asarray(ref_labels)
    n_classes = int(ref_labels.max()) + 1 if n_classes is None else n_classes
    e, q = l2_normalize(ref_embeds), l2_normalize(embeds)
    sums = _class_sums(e, ref_labels, n_classes)                  # (C, D)
    scores = q @ l2_normalize(sums).T                              # (M, C)
    own = l2_normalize(sums[labels] - e[np.asarray(exclude)].sum(1))   # (M, D) the supports are of the own class
    scores[np.arange(len(q)), labels] = (q * own).sum(-1)
    return float((scores.argmax(-1) == labels).mean())


def loo_prototype_accuracy(embeds, labels, n_classes: int | None = None) -> float:
    "Nearest-prototype accuracy of real embeddings, each left out of its own class's prototype."
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    e = l2_normalize(embeds)
    sums = _class_sums(e, labels, n_classes)                      # (C, D)
    protos = l2_normalize(sums)[None].repeat(len(e), 0)            # (N, C, D)
    protos[np.arange(len(e)), labels] = l2_normalize(sums[labels] - e)
    pred = np.einsum('nd,ncd->nc', e, protos).argmax(-1)
    return float((pred == labels).mean())


# %% [markdown]
# Images that sit on their class's direction are all assigned correctly; labels shuffled across
# well-separated classes drop the accuracy to what chance gives them.

# %%
D, C = 16, 4
centres = np.eye(D)[:C]
lab = np.repeat(np.arange(C), 10)
emb = centres[lab] + 0.01 * rng.normal(size=(len(lab), D))
P = class_prototypes(emb, lab)
test_close(np.linalg.norm(P, axis=1), np.ones(C))
test_eq(prototype_accuracy(emb, lab, P), 1.0)
test_eq(loo_prototype_accuracy(emb, lab), 1.0)
test_eq(prototype_accuracy(emb, (lab + 1) % C, P), 0.0)
# leave-one-out matters: one image per class is its own prototype without it
one = rng.normal(size=(3, D))
test_eq(prototype_accuracy(one, np.arange(3), class_prototypes(one, np.arange(3))), 1.0)
assert loo_prototype_accuracy(one, np.arange(3)) < 1.0
# leaving each image's own row out through `exclude` is the leave-one-out accuracy
test_eq(heldout_prototype_accuracy(emb, lab, emb, lab, np.arange(len(lab))[:, None]), loo_prototype_accuracy(emb, lab))
sh = rng.normal(size=(12, D)); shl = np.repeat(np.arange(3), 4)
test_eq(heldout_prototype_accuracy(sh, shl, sh, shl, np.arange(12)[:, None]), loo_prototype_accuracy(sh, shl))


# %% [markdown]
# ## Diversity and copying
#
# Diversity is the mean distance between two images of the same class, averaged over classes — for
# the generated images beside the real ones (LoFGAN uses LPIPS; here the embedding's cosine distance
# and the pixel RMS distance, which need no extra weights). A model that copies its supports is
# diverse and class-consistent and still useless: the distance from each generated image to the
# nearest of *its own* supports catches it, next to the same distance for a real held-out image of the
# class and the same supports. Copying a support gives 0.

# %%
#| export
def pairwise_distances(x, y=None, metric: str = 'cosine') -> np.ndarray:
    "(N, M) distances between rows of x (N, ...) and y (M, ...): 'cosine' (1 - cos) or 'rms' (L2 / sqrt(dim))."
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = x if y is None else np.asarray(y, np.float64).reshape(len(y), -1)
    if metric == 'cosine': return np.maximum(1.0 - l2_normalize(x) @ l2_normalize(y).T, 0.0)
    if metric == 'rms':
        d2 = (x ** 2).sum(1)[:, None] + (y ** 2).sum(1)[None] - 2 * x @ y.T
        return np.sqrt(np.maximum(d2, 0) / x.shape[1])
    raise ValueError(f"metric must be 'cosine' or 'rms', got {metric!r}")


def mean_pairwise_distance(x, metric: str = 'cosine') -> float:
    "Mean distance over distinct pairs of rows of x (N, ...); NaN for fewer than 2."
    if len(x) < 2: return float('nan')
    d = pairwise_distances(x, metric=metric)
    return float(d[~np.eye(len(d), dtype=bool)].mean())


def class_diversity(x, labels, metric: str = 'cosine') -> float:
    "Mean over classes of the within-class mean pairwise distance."
    labels = np.asarray(labels)
    return float(np.nanmean([mean_pairwise_distance(x[labels == c], metric) for c in np.unique(labels)]))


def nearest_support_distance(x, supports, metric: str = 'cosine') -> np.ndarray:
    "Distance (N,) from each x[i] (N, ...) to the nearest of its own supports[i] (N, K, ...)."
    return np.array([pairwise_distances(xi[None], s, metric)[0].min() for xi, s in zip(x, supports)])


# %%
pts = np.array([[0., 0.], [3., 4.], [0., 0.], [6., 8.]])
test_close(pairwise_distances(pts[:2], metric='rms')[0, 1], 5 / np.sqrt(2))
test_close(mean_pairwise_distance(pts[:2], 'rms'), 5 / np.sqrt(2))
test_close(class_diversity(pts, np.array([0, 0, 1, 1]), 'rms'), (5 + 10) / 2 / np.sqrt(2))
test_close(pairwise_distances(np.array([[1., 0.]]), np.array([[0., 2.], [-1., 0.]])), np.array([[1., 2.]]))
sup = rng.normal(size=(5, 3, 8))
test_close(nearest_support_distance(sup[:, 1], sup, 'rms'), np.zeros(5), eps=1e-6)   # copies
assert (nearest_support_distance(sup[:, 1] + 1, sup, 'rms') > 0).all()
test_fail(lambda: pairwise_distances(pts, metric='l1'), contains="'cosine' or 'rms'")


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


def judge_record(im: Images, real: Images, supports, judge_labels, real_ref: bool = False) -> dict:
    """The judge's metrics of `im`: class consistency (its verdict against the supports' class `judge_labels[label]`),
    glyph-FD to half `b` of every real class (real half `a` against `b` is the floor), diversity and nearest support."""
    a, b = _halves(real.labels)
    x = real.take(a) if real_ref else im
    rec = {'judge_acc': float((x.judge_logits.argmax(1) == np.asarray(judge_labels)[x.labels]).mean()),
           'glyph_fd': frechet_distance(x.judge_feats, real.judge_feats[b]),
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
    judge: Any = None                  # images -> (logits, features), with .index(class names): `fsdit.judge.GlyphJudge`


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
    return ClassSet(np.asarray(moments[rows, 0, 0], np.float32), np.concatenate(labels), names,
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
           'glyph_fd': 'glyph-FD: Fréchet distance in the judge\'s features', 'diversity_judge': 'diversity: judge features, RMS',
           'nn_support_judge': 'distance to nearest support (judge features, RMS)'}
JUDGE_METRICS = ('judge_acc', 'glyph_fd', 'diversity_judge', 'nn_support_judge')   # with a `Pipeline.judge` only


def model_pipeline(run, codecs, *, steps: int = 50, method: str = 'euler', batch_size: int = 256, fid_model=None,
                   judge=None) -> Pipeline:
    "A `Pipeline` that samples a loaded `fsdit.sample.Run` and decodes/embeds with its codecs."
    from fsdit.sample import generate   # the metrics above need neither jax nor flax
    if run.mc.cond == 'class': raise ValueError("a class-conditioned run (cond='class') cannot generate unseen classes from supports")
    gen = lambda emb, lat, cfg, seed: generate(run.params, run.mc, emb, lat, latent_scale=run.latent_scale, seed=seed,
                                               steps=steps, cfg_scale=cfg, method=method, batch_size=batch_size)
    return Pipeline(codecs.decode, codecs.embed, gen, fid_model, batch_size=min(batch_size, 64), judge=judge)


def evaluate(run, store, *, split: str = 'test', seen_split: str | None = 'train', n_per_class: int = 128,
             shots: Sequence[int] = (5,), cfg_scales: Sequence[float] = (3.0,), steps: int = 50, seed: int = 0,
             max_real_per_class: int | None = 128, fid: bool = False, fid_weights: str | None = 'download',
             method: str = 'euler', batch_size: int = 256, codecs=None, judge=None, n_classes: int | None = None,
             out=None) -> dict:
    "Few-shot metrics of a run (dir or `Run`) on `split` (`n_classes` of them, drawn at random; default all) and as many seen classes; writes eval.json + figures to `out`."
    from fsdit.sample import load_run
    from fsdit.codecs import run_codecs
    from fsdit.features import open_store
    run = load_run(run) if isinstance(run, (str, Path)) else run
    store = open_store(store) if isinstance(store, (str, Path)) else store
    codecs = codecs or run_codecs(run, store.path)
    pipe = model_pipeline(run, codecs, steps=steps, method=method, batch_size=batch_size,
                          fid_model=fid_inception(fid_weights) if fid else None, judge=judge)
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
                             steps=steps, method=method, seed=seed, max_real_per_class=max_real_per_class, fid=fid,
                             judge=None if judge is None else dict(classes=len(judge.chars), accuracy=judge.accuracy)),
               records=records)
    if out is not None: write_results(res, out)
    return res


# %% [markdown]
# Results go to `eval.json` (NaN written as null) and `fig_<metric>.png`: one panel per split, the model's
# value against the CFG scale for each shot count, and horizontal lines for the real images (dotted),
# the copy baseline (dashed) and the support-mean baseline (dash-dot) in the same colour.

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
def quick_eval(params, mc, cs: ClassSet, decode: Callable, embed: Callable, *, latent_scale: float = 1.0,
               n_per_class: int = 8, shots: int = 5, cfg_scale: float = 3.0, steps: int = 20, seed: int = 0,
               prefix: str = 'val_fs', real: Images | None = None, judge=None) -> dict:
    "Cheap few-shot metrics of `params` on a class set: {prefix/proto_acc, .../fd_embed, ...}; `real` as in `evaluate_classes`."
    from fsdit.sample import generate
    gen = lambda emb, lat, cfg, s: generate(params, mc, emb, lat, latent_scale=latent_scale, seed=s, steps=steps, cfg_scale=cfg)
    recs = evaluate_classes(Pipeline(decode, embed, gen, judge=judge), cs, n_per_class=n_per_class, shots=(shots,),
                            cfg_scales=(cfg_scale,), seed=seed, baselines=False, real=real)
    real, model = recs
    keys = ('proto_acc', 'fd_embed', 'diversity_embed', 'nn_support_embed', 'judge_acc', 'glyph_fd')
    return {**{f'{prefix}/{k}': model[k] for k in keys if k in model},
            **{f'{prefix}/real_{k}': real[k] for k in ('proto_acc', 'nn_support_embed', 'judge_acc', 'glyph_fd') if k in real},
            f'{prefix}/chance': model['chance']}


# %% [markdown]
# ## Command line
#
# `fsdit eval --run RUN --feats FEATS --split test --shots 1 3 5 --cfg 0 1 3 --n 128 --out DIR` (default
# `RUN/eval`); `--fid` adds FID (`--fid-weights FILE` offline), `--no-seen` skips the seen classes. The
# store defaults to the one the run's `config.json` names.

# %%
#| export
def eval_cli(argv: list[str]) -> int:
    "`fsdit eval`: few-shot metrics of a run on unseen and seen classes -> eval.json + figures."
    from fsdit.cli import Parser, positive_int, check_out_dir, fail
    p = Parser(prog='fsdit eval', description=eval_cli.__doc__)
    p.add_argument('--run', required=True, help='run directory of `fsdit train`')
    p.add_argument('--feats', default=None, help="feature store (default: the one the run's config.json names)")
    p.add_argument('--split', default='test', help='unseen split to evaluate')
    p.add_argument('--seen-split', default='train', help='split of the seen classes')
    p.add_argument('--no-seen', action='store_true', help='skip the seen classes')
    p.add_argument('--shots', type=positive_int, nargs='+', default=[5])
    p.add_argument('--cfg', type=float, nargs='+', default=[3.0])
    p.add_argument('--n', type=positive_int, default=128, help='generated images per class (per shots and cfg)')
    p.add_argument('--max-real', type=int, default=128, help='real images per class (0: all)')
    p.add_argument('--steps', type=positive_int, default=50); p.add_argument('--method', default='euler', choices=('euler', 'heun'))
    p.add_argument('--seed', type=int, default=0); p.add_argument('--batch-size', type=positive_int, default=256)
    p.add_argument('--fid', action='store_true', help="add FID (needs pip install 'fsdit[fid]')")
    p.add_argument('--fid-weights', default='download', help='pytorch-fid Inception weights: download, or a .pth file')
    p.add_argument('--out', default=None, help='output folder (default RUN/eval)')
    a = p.parse_args(argv)
    if a.max_real < 0: p.error(f"argument --max-real: must be 0 (all) or more, got {a.max_real}")
    try:
        from fsdit.sample import load_run
        out = check_out_dir(a.out or Path(a.run) / 'eval')
        run = load_run(a.run, warn=lambda msg: print(f"fsdit eval: {msg}", file=sys.stderr))
        feats = a.feats or run.config.get('feats')
        if feats is None: raise ValueError("no feature store: pass --feats FEATS")
        res = evaluate(run, feats, split=a.split, seen_split=None if a.no_seen else a.seen_split, n_per_class=a.n,
                       shots=a.shots, cfg_scales=a.cfg, steps=a.steps, seed=a.seed, max_real_per_class=a.max_real or None,
                       fid=a.fid, fid_weights=a.fid_weights, method=a.method, batch_size=a.batch_size, out=out)
    except (ValueError, OSError, RuntimeError, ImportError, KeyError) as e:
        return fail('eval', e)
    print(results_table(res['records']))
    print(f"wrote {a.out or Path(a.run) / 'eval'}/eval.json and figures")
    return 0


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
