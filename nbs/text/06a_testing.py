# %% [markdown]
# # Testing
#
# > Random stores, batches and episode sources with the real layouts, a perturbed DiT and a one-batch fit step: the fixtures the notebooks, the tests and the benchmarks share.

# %%
#| default_exp testing

# %%
#| export
from __future__ import annotations
import numpy as np
import jax, jax.numpy as jnp
import optax

from fsdit.config import ModelConfig, TrainConfig
from fsdit.data import EpisodeSource, host_batch
from fsdit.flow import flow_loss

# %%
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config
from fsdit.dit import DiT, init_params, example_cond


# %% [markdown]
# ## A random store
#
# The arrays of a feature store, made up: unit-norm float16 support embeddings (N, D), float16 moments
# (N, 2 mirror states, 2 [mean, logvar], h, w, c) — in pixel mode logvar is -30, so the posterior sample is
# the stored image itself — and each class's rows.

# %%
#| export
def synthetic_store(mc: ModelConfig, n_classes: int = 6, per_class: int = 12, seed: int = 0, space: str = 'latent'):
    "Random store arrays: embeds (N, D) float16, moments (N, 2, 2, h, w, c) float16, and each class's rows."
    r, s, c = np.random.default_rng(seed), mc.input_size, mc.in_channels
    N = n_classes * per_class
    mean = r.normal(size=(N, 2, 1, s, s, c))
    logvar = np.full_like(mean, -30.0) if space == 'pixel' else r.uniform(-6, -2, size=mean.shape)
    emb = r.normal(size=(N, mc.support_dim))
    embeds = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float16)
    return embeds, np.concatenate([mean, logvar], 2).astype(np.float16), [np.arange(k * per_class, (k + 1) * per_class) for k in range(n_classes)]


def synthetic_batch(n: int, mc: ModelConfig, shots: int = 5, seed: int = 0, space: str = 'latent') -> dict:
    "A host batch of n random episodes, gathered from a random store as the data iterator gathers them."
    embeds, moments, _ = synthetic_store(mc, 1, n, seed, space)
    idx = {'target_index': np.arange(n), 'support_index': np.random.default_rng(seed).integers(0, n, (n, shots)),
           'labels': np.zeros(n, np.int32)}
    return host_batch(embeds, moments, idx)


# %%
mc, tc = model_config('mu'), train_config('test')
embeds, moments, rows = synthetic_store(mc)
test_eq((embeds.shape, moments.shape, len(rows)), ((72, 768), (72, 2, 2, 28, 28, 4), 6))
test_close(np.linalg.norm(embeds.astype(np.float32), axis=1), 1.0, eps=1e-2)
b = synthetic_batch(4, mc)
test_eq((b['moments'].shape, b['support_embeds'].shape, b['support_latents'].shape), ((4, 2, 2, 28, 28, 4), (4, 5, 768), (4, 5, 28, 28, 4)))


# %% [markdown]
# ## A random episode source
#
# `synthetic_source` is an `fsdit.data.EpisodeSource` over such a store: the first two thirds of the classes
# train, the rest validate. It resumes from a saved position like a real one, and refuses settings its
# classes cannot meet.

# %%
#| export
def synthetic_source(mc: ModelConfig, tc: TrainConfig, seed: int = 0, space: str = 'latent', **kw) -> EpisodeSource:
    "An `EpisodeSource` over a random store: the first two thirds of the classes train, the rest validate."
    embeds, moments, rows = synthetic_store(mc, seed=seed, space=space, **kw)
    k = len(rows) * 2 // 3
    return EpisodeSource(embeds, moments, rows[:k], rows[k:], tc, space)


# %%
src = synthetic_source(mc, tc)
it = src.batches()
(b1, p1), (b2, p2) = next(it), next(it)
test_eq(b1['moments'].shape, (tc.batch_size, 2, 2, 28, 28, 4)); test_eq(b1['support_embeds'].shape, (tc.batch_size, 5, 768))
b2_again, _ = next(src.batches(p1))  # restarting at a saved position gives the next batch
np.testing.assert_equal(b2_again, b2)
src.check()   # settings the classes cannot meet are refused before a run writes anything:
test_fail(lambda: synthetic_source(mc, train_config('test', shots=12)).check(), contains='shots 12 needs 13 images per class')


# %% [markdown]
# ## A DiT that is not at its start, and a fit step
#
# A fresh DiT outputs zero (adaLN-Zero), which hides most mistakes; `perturb` adds small Gaussian noise to
# every parameter. `fit_step` is a jitted Adam step on `fsdit.flow.flow_loss`, for checks that a model can
# fit a batch.

# %%
#| export
def perturb(params, scale: float = 0.05, seed: int = 0):
    "`params` plus Gaussian noise of std `scale` (numpy RNG): a DiT whose output is no longer zero."
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: p + jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params)


def fit_step(apply_fn, opt):
    "A jitted `opt` step on `flow_loss`: `(params, state, x1, cond, key, eps=None, t=None) -> (params, state, loss)`."
    @jax.jit
    def step(params, state, x1, cond, key, eps=None, t=None):
        (l, _), g = jax.value_and_grad(flow_loss, argnums=1, has_aux=True)(apply_fn, params, x1, cond, key=key, eps=eps, t=t)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, l
    return step


# %%
params = init_params(mc, jax.random.PRNGKey(0))
x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 4)); t = jnp.full((2,), 0.5); cond = example_cond(mc, 2)
apply = DiT(mc).apply
test_eq(np.abs(np.asarray(apply({'params': params}, x, t, cond))).max(), 0.0)
assert np.abs(np.asarray(apply({'params': perturb(params)}, x, t, cond))).max() > 0
opt = optax.adam(1e-2); step = fit_step(apply, opt)
p, st, l0 = step(params, opt.init(params), x, cond, jax.random.PRNGKey(2), x * 0, t)
_, _, l1 = step(p, st, x, cond, jax.random.PRNGKey(2), x * 0, t)
assert float(l1) < float(l0)


# %% [markdown]
# ## Errors in examples
#
# `raises` is how the notebooks show an error case: it runs `f`, checks that it raises `exc` with `match` in
# the message, and returns the message so an example can print what a user would read.

# %%
#| export
def raises(f, match: str, exc=Exception) -> str:
    "Assert that `f()` raises `exc` with `match` in its message; return the message."
    try: f()
    except exc as e:
        assert match in str(e), f"{match!r} not in {e!r}"; return str(e)
    raise AssertionError('no error raised')


# %%
test_eq(raises(lambda: int('x'), 'invalid literal', ValueError), "invalid literal for int() with base 10: 'x'")
test_fail(lambda: raises(lambda: 1, 'anything'), contains='no error raised')
test_fail(lambda: raises(lambda: int('x'), 'other words'), contains='not in')
