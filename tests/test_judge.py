"""Known answers for the glyph judge and its metrics in `fsdit.eval`: real images score near the judge's
held-out accuracy, a generator that draws the wrong class scores near chance, blur and the support mean
score worse on glyph-FD than real images, and a copy of a support is caught by the nearest-support distance."""
import numpy as np
import pytest
import jax

from fsdit.codecs import PixelEncoder
from fsdit.glyph.data import glyph_classes, glyph_name
from fsdit.glyph.judge import train_judge, render_judge_set, save_judge, load_judge, glyph_judge
from fsdit.eval import ClassSet, Pipeline, evaluate_classes

SIZE, N_CLASSES, PER_CLASS = 16, 40, 16


@pytest.fixture(scope='module')
def judge():
    return train_judge(glyph_classes(N_CLASSES, SIZE), SIZE, per_class=24, epochs=8, batch_size=64)


@pytest.fixture(scope='module')
def real(judge):
    "Real images of every class, rendered as the dataset renders them, with a seed the judge never saw."
    X, y = render_judge_set(judge.chars, PER_CLASS, SIZE, seed=123)
    return X, y


def _class_set(judge, X, y) -> ClassSet:
    "Real images as a class set; their 'embeddings' are one-hot labels, so a test generator can read the supports' class."
    return ClassSet(X, y, [glyph_name(c) for c in judge.chars], embeds=np.eye(N_CLASSES)[y])


def _pipeline(judge, generate=None) -> Pipeline:
    return Pipeline(decode=lambda z: np.asarray(z), embed=PixelEncoder(dim=16).embed, generate=generate, judge=judge)


def _records(judge, real, generate, **kw) -> dict:
    X, y = real
    recs = evaluate_classes(_pipeline(judge, generate), _class_set(judge, X, y), n_per_class=8, cfg_scales=(1.0,), **kw)
    return {r['method']: r for r in recs}


def test_judge_reads_real_images(judge, real):
    X, y = real
    logits, feats = judge(X)
    acc = (logits.argmax(1) == y).mean()
    assert judge.accuracy > 0.75, judge.accuracy
    assert abs(acc - judge.accuracy) < 0.08, (acc, judge.accuracy)        # the dataset's images read like its own
    assert feats.shape == (len(X), judge.feat_dim) and np.isfinite(feats).all()


def _redraw(judge, shift: int):
    "A generator that returns fresh real images (a rendering no one else uses) of class (supports' class + shift)."
    pool_X, pool_y = render_judge_set(judge.chars, 8, SIZE, seed=999)
    def gen(emb, lat, cfg, seed):
        r = np.random.default_rng(seed)
        return np.stack([pool_X[r.choice(np.flatnonzero(pool_y == (c + shift) % N_CLASSES))] for c in emb[:, 0].argmax(1)])
    return gen


def test_known_answers(judge, real):
    right = _records(judge, real, _redraw(judge, 0))
    wrong = _records(judge, real, _redraw(judge, 1))
    chance = right['model']['judge_chance']
    assert chance == pytest.approx(1 / N_CLASSES)
    # fresh real images of the supports' class score like real images; of another class, near chance
    assert abs(right['model']['judge_acc'] - right['real']['judge_acc']) < 0.1
    assert wrong['model']['judge_acc'] < 3 * chance
    # the real-vs-real floor: fresh real images of the right classes sit near it on glyph-FD
    floor = right['real']['glyph_fd']
    assert right['model']['glyph_fd'] < 1.5 * floor
    # the support mean (a blur of five glyphs) is clearly worse than real images on glyph-FD
    assert right['mean']['glyph_fd'] > 3 * floor, (right['mean']['glyph_fd'], floor)
    # a copy of a support is caught: distance 0 to the nearest support; real images are far from theirs
    assert right['copy']['nn_support_judge'] < 1e-6 < 0.5 * right['real']['nn_support_judge']
    assert right['model']['diversity_judge'] > 0.5 * right['real']['diversity_judge']


def test_blur_scores_worse(judge, real):
    X, y = real
    fresh = _redraw(judge, 0)
    sharp = _records(judge, real, fresh)
    blurred = _records(judge, real, lambda *a: np.asarray(jax.image.resize(jax.image.resize(
        fresh(*a), (len(a[1]), 6, 6, 1), 'linear'), (len(a[1]), SIZE, SIZE, 1), 'linear')))
    assert blurred['model']['glyph_fd'] > 3 * sharp['model']['glyph_fd']
    assert blurred['model']['judge_acc'] < sharp['model']['judge_acc']


def test_saved_judge_is_the_same(judge, real, tmp_path):
    X, _ = real
    save_judge(judge, tmp_path / 'j')
    back = load_judge(tmp_path / 'j')
    np.testing.assert_allclose(back(X[:64])[1], judge(X[:64])[1], atol=1e-5)
    assert back.chars == judge.chars and back.accuracy == judge.accuracy
    assert not list(tmp_path.glob('.j.partial-*'))


def test_glyph_judge_retrains_on_new_settings(tmp_path):
    a = glyph_judge(tmp_path / 'j', '0123', 16, per_class=4, epochs=1, batch_size=8)
    b = glyph_judge(tmp_path / 'j', '0123', 16, per_class=4, epochs=1, batch_size=8)
    np.testing.assert_array_equal(a.params['Dense_1']['kernel'], b.params['Dense_1']['kernel'])   # reused
    c = glyph_judge(tmp_path / 'j', '01234', 16, per_class=4, epochs=1, batch_size=8)
    assert c.chars == '01234'
