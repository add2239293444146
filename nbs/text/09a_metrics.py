# %% [markdown]
# # Metrics
#
# > The maths of the few-shot evaluation, on feature arrays: Fréchet distance, class consistency by nearest prototype, diversity and the distance to the nearest support.

# %%
#| default_exp metrics

# %%
#| export
from __future__ import annotations
import numpy as np
from scipy import linalg

from fsdit.utils import l2_normalize

# %%
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
# A Fréchet distance between finite samples is biased upward, more so the fewer the samples: a target like
# "at most 3x the real-vs-real floor" could be met by shrinking the evaluation. The kernel distance (KID,
# Bińkowski et al. 2018) has no such bias: the unbiased estimate of the squared MMD with the cubic
# polynomial kernel $k(x, y) = (x^\top y / d + 1)^3$ has the same expectation at any sample size, and two
# samples of one distribution give about zero (it can dip below). It is reported beside every Fréchet
# distance.

# %%
#| export
def kernel_distance(feats_a, feats_b) -> float:
    "KID: the unbiased squared MMD between features (N, D) and (M, D) under the kernel (x.y / D + 1)^3."
    a, b = (np.asarray(f, np.float64).reshape(len(f), -1) for f in (feats_a, feats_b))
    if len(a) < 2 or len(b) < 2: raise ValueError(f"need at least 2 feature vectors on each side, got {len(a)} and {len(b)}")
    k = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3
    kaa, kbb = k(a, a), k(b, b)
    m, n = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * k(a, b).mean())


# %%
_r = np.random.default_rng(3)
_p, _q = _r.normal(size=(4000, 8)), _r.normal(size=(4000, 8))
assert abs(kernel_distance(_p[:40], _q[:40])) < 0.05 and abs(kernel_distance(_p, _q)) < 0.005   # one distribution: ~0 at any size
_big = kernel_distance(_p, _q + 0.5)                                     # a shift: on average the same figure at 40 as at 4000
_small = np.mean([kernel_distance(_p[i:i + 40], _q[i:i + 40] + 0.5) for i in range(0, 4000, 40)])
assert _big > 0.5; test_close(_small, _big, eps=0.05 * _big)
assert frechet_distance(_p[:40], _q[:40]) > 4 * frechet_distance(_p, _q)                         # FD's small-sample bias, for contrast
test_fail(lambda: kernel_distance(_p[:1], _q), contains='at least 2')


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
def _unit(x) -> np.ndarray:
    "Unit rows in float64 (store embeddings are float16: normalising in float16 loses the last digits)."
    return l2_normalize(np.asarray(x, np.float64))


def _class_sums(embeds, labels, n_classes: int) -> np.ndarray:
    s = np.zeros((n_classes, embeds.shape[-1]))
    np.add.at(s, np.asarray(labels), embeds)
    return s                                                       # (C, D)


def class_prototypes(embeds, labels, n_classes: int | None = None) -> np.ndarray:
    "Normalised mean of the normalised embeddings (N, D) of each class -> (C, D)."
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    return _unit(_class_sums(_unit(embeds), labels, n_classes))


def prototype_accuracy(embeds, labels, prototypes) -> float:
    "Fraction of embeddings (N, D) whose nearest prototype (cosine) is their label's."
    pred = (_unit(embeds) @ np.asarray(prototypes).T).argmax(-1)
    return float((pred == np.asarray(labels)).mean())


def heldout_prototype_accuracy(embeds, labels, ref_embeds, ref_labels, exclude, n_classes: int | None = None) -> float:
    "Nearest-prototype accuracy of embeddings (M, D) whose own class prototype leaves out the references `exclude` (M, K)."
    labels, ref_labels = np.asarray(labels), np.asarray(ref_labels)
    n_classes = int(ref_labels.max()) + 1 if n_classes is None else n_classes
    e, q = _unit(ref_embeds), _unit(embeds)
    sums = _class_sums(e, ref_labels, n_classes)                  # (C, D)
    scores = q @ _unit(sums).T                              # (M, C)
    own = _unit(sums[labels] - e[np.asarray(exclude)].sum(1))   # (M, D) the supports are of the own class
    scores[np.arange(len(q)), labels] = (q * own).sum(-1)
    return float((scores.argmax(-1) == labels).mean())


def loo_prototype_accuracy(embeds, labels, n_classes: int | None = None) -> float:
    "Nearest-prototype accuracy of real embeddings, each left out of its own class's prototype."
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    e = _unit(embeds)
    sums = _class_sums(e, labels, n_classes)                      # (C, D)
    protos = _unit(sums)[None].repeat(len(e), 0)            # (N, C, D)
    protos[np.arange(len(e)), labels] = _unit(sums[labels] - e)
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
    if metric == 'cosine': return np.maximum(1.0 - _unit(x) @ _unit(y).T, 0.0)
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
