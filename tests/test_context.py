"In-context supports (`cond='context'`): order invariance, K free at sampling, CFG drops tokens and vector, target-only readout."
import numpy as np
import jax, jax.numpy as jnp
import pytest

from fsdit.config import model_config, train_config
from fsdit.dit import DiT, init_params, example_cond
from fsdit.testing import perturb
from fsdit.sampler import sample

pytestmark = pytest.mark.oldjax
B = 3


def _cfg(cond='context'):
    "A small context model (16x16x3, patch 4: 16 target tokens, 16 tokens per support)."
    return model_config('mu', cond=cond, input_size=16, in_channels=3, patch=4, context_patch=4, support_dim=16)


@pytest.fixture(scope='module')
def ctx():
    "(cfg, jitted apply, perturbed params, x, t, a K=5 condition)."
    cfg = _cfg()
    params = perturb(init_params(cfg, jax.random.PRNGKey(0)), scale=0.1, seed=1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, 16, 16, 3)), jnp.float32)
    return cfg, jax.jit(DiT(cfg).apply), params, x, jnp.array([0.1, 0.5, 0.9]), example_cond(cfg, B, seed=3, K=5)


def test_support_order_does_not_matter(ctx):
    cfg, f, p, x, t, c = ctx
    v = f({'params': p}, x, t, c)
    rng = np.random.default_rng(0)
    for drop in (None, jnp.array([False, True, False])):
        v_d = f({'params': p}, x, t, c, drop)
        for _ in range(3):   # a different permutation for every example
            perm = np.stack([rng.permutation(5) for _ in range(B)])
            lat = jnp.take_along_axis(c['support_latents'], jnp.asarray(perm)[:, :, None, None, None], axis=1)
            np.testing.assert_allclose(f({'params': p}, x, t, dict(c, support_latents=lat), drop), v_d, atol=1e-5)
    # the supports do matter: replacing one changes the prediction
    other = c['support_latents'].at[:, 0].set(-c['support_latents'][:, 0])
    assert not np.allclose(f({'params': p}, x, t, dict(c, support_latents=other)), v, atol=1e-4)


def test_k_may_differ_at_sampling(ctx):
    "Parameters do not depend on K: a K=5 model runs with 3 and 7 supports, in the model and through the sampler."
    cfg, f, p, x, t, c = ctx
    v5 = f({'params': p}, x, t, c)
    for K in (3, 7):
        ck = example_cond(cfg, B, seed=3, K=K)
        v = f({'params': p}, x, t, ck)
        assert v.shape == x.shape and np.isfinite(np.asarray(v)).all()
        assert not np.allclose(v, v5, atol=1e-4)
        out = sample(DiT(cfg).apply, p, x, ck, steps=4, cfg_scale=3.0)   # CFG: one doubled batch
        assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()


def test_generate_takes_any_k(ctx):
    "`fsdit.sampler.generate` (what `fsdit sample` and `fsdit eval` call) with 3 and 7 supports."
    from fsdit.sampler import generate
    cfg, f, p, x, t, c = ctx
    r = np.random.default_rng(5)
    for K in (3, 7):
        emb, lat = r.normal(size=(4, K, cfg.support_dim)), r.normal(size=(4, K, 16, 16, 3))
        z = generate(p, cfg, emb, lat, steps=3, cfg_scale=3.0, batch_size=4)
        assert z.shape == (4, 16, 16, 3) and np.isfinite(z).all()


def test_cfg_drop_removes_support_tokens_and_vector(ctx):
    "A dropped example equals the seed's model (same shared weights, no support tokens) on the zero embedding."
    cfg, f, p, x, t, c = ctx
    ones = jnp.ones(B, bool)
    v_u = f({'params': p}, x, t, c, ones)
    scfg = _cfg('support')
    sp = {k: v for k, v in p.items() if k != 'support_tokens'}        # everything but the support-token embedding
    v_absent = jax.jit(DiT(scfg).apply)({'params': sp}, x, t, {'support_embed': jnp.zeros((B, cfg.support_dim))})
    np.testing.assert_allclose(v_u, v_absent, atol=1e-5)
    # whatever the supports (content, number), dropped output is the same
    for K, seed in ((1, 7), (7, 8)):
        np.testing.assert_allclose(f({'params': p}, x, t, example_cond(cfg, B, seed=seed, K=K), ones), v_u, atol=1e-5)
    # zero support latents are NOT the null condition (they still make tokens): drop is what removes them
    zero = dict(support_embed=jnp.zeros_like(c['support_embed']), support_latents=jnp.zeros_like(c['support_latents']))
    assert not np.allclose(f({'params': p}, x, t, zero), v_u, atol=1e-4)
    # in a mixed batch, the dropped row gets zero gradient from both its support latents and its embedding
    mixed = jnp.array([True, False, True])
    g = jax.grad(lambda cc: f({'params': p}, x, t, cc, mixed).sum())(c)
    for k in ('support_latents', 'support_embed'):
        gk = np.asarray(g[k])
        assert (gk[0] == 0).all() and (gk[2] == 0).all() and np.abs(gk[1]).max() > 0, k
    np.testing.assert_allclose(f({'params': p}, x, t, c, mixed)[0], v_u[0], atol=1e-5)


def test_only_target_tokens_are_read_out(ctx):
    "The final layer sees the target tokens only, whatever K; the output has the input's shape."
    cfg, f, p, x, t, c = ctx
    # compiled as one program per K (run eagerly, every op of the model compiles on its own: a minute on 2 cores)
    probe = jax.jit(lambda p, x, t, ck: DiT(cfg).apply({'params': p}, x, t, ck, capture_intermediates=True,
                                                       mutable=['intermediates']))
    for K in (1, 5, 7):
        ck = example_cond(cfg, B, seed=4, K=K)
        v, state = probe(p, x, t, ck)
        inter = state['intermediates']
        assert v.shape == x.shape
        assert inter['final']['__call__'][0].shape == (B, cfg.tokens, cfg.patch ** 2 * cfg.in_channels)
        assert inter['block_0']['__call__'][0][0].shape == (B, cfg.tokens + K * (16 // cfg.context_patch) ** 2, cfg.hidden)


def test_train_step_uses_supports():
    "One trainer step with cond='context': finite loss, and the support-token embedding gets a gradient."
    from functools import partial
    from fsdit.steps import compute_grads
    from fsdit.utils import LatentScaling
    from fsdit.state import create_state
    from fsdit.testing import synthetic_batch
    cfg, tc = _cfg(), train_config('test', batch_size=4)
    state = create_state(cfg, tc)
    state = state.replace(params=perturb(state.params, scale=0.1, seed=1))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4, cfg, tc.shots, space='pixel').items()}
    grads_fn = jax.jit(partial(compute_grads, model=DiT(cfg), mc=cfg, tc=tc, scaling=LatentScaling(1.0)))
    loss, grads, aux = grads_fn(state, batch)
    assert np.isfinite(float(loss)) and aux['loss'].shape == (4,)
    g = grads['support_tokens']
    assert np.abs(np.asarray(g['patch']['proj']['kernel'])).max() > 0 and np.abs(np.asarray(g['segment'])).max() > 0
