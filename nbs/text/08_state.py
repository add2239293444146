# %% [markdown]
# # Train state
#
# > The seed's optimizer and what a run carries from step to step: AdamW with a weight-decay mask, warmup-cosine LR, EMA, and one pytree of state that resumes exactly.

# %%
#| default_exp state

# %%
#| export
from __future__ import annotations
from typing import Any
import numpy as np
import jax, jax.numpy as jnp
import optax
from flax import struct

from fsdit.config import ModelConfig, TrainConfig
from fsdit.dit import init_params

# %%
from fastcore.test import test_eq, test_close
from fsdit.config import model_config, train_config


# %% [markdown]
# ## The optimizer
#
# The seed's table: AdamW ($\beta$ = 0.9, 0.99), weight decay 0.01, global-norm clipping at 1.0, and a
# learning rate that rises linearly from 0 to `lr` over `warmup` steps and then follows a cosine down to
# `min_lr` at `max_steps`. The step that is taken with learning rate $\eta_s$ is step $s$, counted from 0,
# as optax counts.

# %%
#| export
def lr_schedule(c: TrainConfig) -> optax.Schedule:
    "Linear warmup 0 -> `lr` over `warmup` steps, then cosine to `min_lr` at `max_steps`."
    # optax needs at least one cosine step; warmup == max_steps then ends at `lr` without decaying
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup, max(c.max_steps, c.warmup + 1), end_value=c.min_lr)


# %%
tc = train_config('seed')
s = lr_schedule(tc)
test_close([float(s(i)) for i in (0, 2_500, 5_000, 102_500, 200_000, 250_000)],
           [0.0, 5e-5, 1e-4, (1e-4 + 1e-6) / 2, 1e-6, 1e-6], eps=1e-9)


# %% [markdown]
# Weight decay applies to weight matrices only. The seed decays every parameter, including biases,
# LayerNorm scales and the fixed sin-cos positional table it stores as a parameter behind `stop_gradient`:
# that table receives no gradient, so decay is the only thing that changes it: at the seed's learning-rate
# schedule and decay 0.01 it falls to about 0.9 of itself over the 200k steps ($e^{-0.01 \sum_s \eta_s}$, with
# $\sum_s \eta_s \approx 10$).
# Here a leaf decays when it is a `kernel` of two or more dimensions (dense and conv weights); biases,
# norm scales, positional tables and embedding tables do not (the usual rule since GPT-2).

# %%
#| export
def decay_mask(params) -> Any:
    "Pytree of bools: True where AdamW applies weight decay (kernels with ndim >= 2)."
    def rule(path, x): return getattr(path[-1], 'key', None) == 'kernel' and len(np.shape(x)) >= 2
    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(c: TrainConfig) -> optax.GradientTransformation:
    "Global-norm clipping, then AdamW with the warmup-cosine schedule and the decay mask."
    return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                       optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=decay_mask))


# %% [markdown]
# With zero gradients only weight decay moves a parameter, so one step shows the mask: kernels shrink by
# $\eta\lambda$, everything else stays put.

# %%
p = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)}, 'norm': {'scale': jnp.ones(4)}, 'pos_embed': jnp.ones((1, 5, 4))}
test_eq(decay_mask(p), {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False}, 'pos_embed': False})
tx = make_optimizer(train_config('test', warmup=0, lr=0.1, min_lr=0.1, weight_decay=0.5))
u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
q = optax.apply_updates(p, u)
test_close(q['dense']['kernel'], 1 - 0.1 * 0.5)
for leaf in (q['dense']['bias'], q['norm']['scale'], q['pos_embed']): test_eq(leaf, jnp.ones_like(leaf))


# %% [markdown]
# ## The train state
#
# Everything a resumed run needs is in one pytree: live parameters, their EMA, the optimizer state, the
# number of steps done, and the run's base key (every random number of the run is derived from it and the
# step, so the key never changes). Parameters and optimizer state are float32 whatever the compute dtype.

# %%
#| export
@struct.dataclass
class TrainState:
    "Parameters, EMA parameters, optimizer state, steps done and the run's base key."
    params: Any
    ema_params: Any
    opt_state: Any
    step: jax.Array  # () int32, optimizer steps done
    key: jax.Array   # (2,) uint32 base key of the run


def init_state(mc: ModelConfig, tc: TrainConfig) -> TrainState:
    "A fresh state: parameters from `init_params`, EMA = parameters, step 0 (traceable: jit it with any output shardings)."
    init_key, run_key = jax.random.split(jax.random.PRNGKey(tc.seed))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init_params(mc, init_key))
    return TrainState(params, jax.tree.map(jnp.copy, params), make_optimizer(tc).init(params),
                      jnp.zeros((), jnp.int32), run_key)


create_state = jax.jit(init_state, static_argnums=(0, 1))  # one compiled call, on the default device


def ema_update(ema, params, decay: float):
    "EMA of the parameters: `decay * ema + (1 - decay) * params`."
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


# %%
mc = model_config('mu')
tc = train_config('test', max_steps=10, eval_every=10, sample_every=10, save_every=5, keep=1, sample_steps=2)
st = create_state(mc, tc)  # one compiled call
test_eq(int(st.step), 0)
assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.params))
test_close(ema_update({'w': jnp.zeros(2)}, {'w': jnp.ones(2)}, 0.9)['w'], 0.1)
