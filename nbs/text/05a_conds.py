# %% [markdown]
# # Conditionings
#
# > What the DiT is conditioned on — the mean support embedding, a class label, or the support latents as input channels, as tokens or as cross-attention keys — one small class each with one interface, so that the model, the loss, the sampler and the evaluation never ask for a conditioning by name.

# %%
#| default_exp conds

# %%
#| export
from __future__ import annotations
import numpy as np
import jax.numpy as jnp
import flax.linen as nn

from fsdit.config import ModelConfig
from fsdit.dit import SupportProjector, LabelEmbedder, SupportTokens, support_stats
from fsdit.utils import l2_normalize, LatentScaling

# %%
import jax
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, CONDS
from fsdit.dit import DiT


# %% [markdown]
# ## One interface
#
# `ModelConfig.cond` names the conditioning; everything that depends on it is a method of one object:
#
# - **its inputs**: the batch entries it reads (`batch_keys`) and the model's condition made of them
#   (`inputs`: the mean of the K support embeddings in float32; the support latents in the model's scale, `LatentScaling.to_model`;
#   or the labels), whether the batch must carry support latents (`needs_latents`), and how many supports it
#   takes (`check_shots`);
# - **its null condition** (`null`: what `init` traces with, and what CFG's dropped examples amount to) and a random
#   `example` of the right shapes;
# - **its place in the model**, at three fixed points of `DiT.__call__`: `augment_input` (channels beside the noisy
#   target, before the patch embedding), `embed` (the vector $y$ added to the timestep embedding that every adaLN
#   reads) and `tokens` (support tokens appended to the self-attention, or a context for cross-attention in every
#   block). Each point also applies `drop (B,)`, CFG's null, for the examples it marks;
# - **its cost**: the input channels, the tokens of each block's self-attention and the keys of its cross-attention.
#
# A Flax module made inside a hook belongs to the DiT that calls it (linen attaches a module built inside a compact
# method to that method's module), so the parameters keep the DiT's names: `y_embed`, `support_tokens`,
# `support_ln`, `block_i/xattn`. The layers themselves (`SupportProjector`, `LabelEmbedder`, `SupportTokens`,
# `support_stats`) are the DiT notebook's. The base class is the seed's conditioning, the mean support embedding
# through adaLN; the others change what differs.

# %%
#| export
def _latent_shape(cfg: ModelConfig, B: int, K: int) -> tuple:
    return (B, K, cfg.input_size, cfg.input_size, cfg.in_channels)


class Conditioning:
    "The seed's conditioning (`cond='support'`): the mean support embedding through an MLP into adaLN; the interface of all."
    name: str = 'support'
    batch_keys: tuple = ('support_embeds',)   # the batch entries `inputs` reads
    needs_latents: bool = False               # the batch carries support latents (B, K, h, w, c)
    takes_supports: bool = True               # generates from support images (not from a class label)

    def inputs(self, batch: dict, scaling: LatentScaling) -> dict:
        "The model's condition from a batch: mean support embedding (B, S) in float32, scaled support latents (B, K, h, w, c)."
        cond = {'support_embed': batch['support_embeds'].astype(jnp.float32).mean(1)}
        if self.needs_latents: cond['support_latents'] = scaling.to_model(batch['support_latents'].astype(jnp.float32))
        return cond

    def null(self, cfg: ModelConfig, B: int, K: int = 1) -> dict:
        "The null condition of a batch of `B`: a zero embedding (and K zero supports)."
        cond = {'support_embed': jnp.zeros((B, cfg.support_dim), jnp.float32)}
        if self.needs_latents: cond['support_latents'] = jnp.zeros(_latent_shape(cfg, B, K), jnp.float32)
        return cond

    def example(self, cfg: ModelConfig, B: int, seed: int = 0, K: int = 5) -> dict:
        "A random condition (numpy RNG, nothing to compile): unit-norm embeddings (and `K` support latents)."
        rng = np.random.default_rng(seed)
        cond = {'support_embed': jnp.asarray(l2_normalize(rng.normal(size=(B, cfg.support_dim))), jnp.float32)}
        if self.needs_latents: cond['support_latents'] = jnp.asarray(rng.normal(size=_latent_shape(cfg, B, K)), jnp.float32)
        return cond

    def check_shots(self, k: int | None):
        "Raise `ValueError` unless `k` supports can condition a sample."
        if not k or k < 1: raise ValueError(f"cond={self.name!r} needs at least one support image, got {k}")

    def augment_input(self, cfg: ModelConfig, inp, cond: dict, drop):
        "The DiT's input `(B, H, W, C')` before the patch embedding: the noisy target `inp (B, H, W, C)` as it is."
        return inp

    def embed(self, cfg: ModelConfig, cond: dict, drop):
        "`y (B, D)`, added to the timestep embedding: the MLP of the support embedding, zeros where `drop` (the seed's null)."
        dt = jnp.dtype(cfg.dtype)
        s = jnp.where(drop[:, None], 0.0, cond['support_embed'].astype(jnp.float32))
        if cfg.support_rms: s = s / jnp.sqrt(jnp.mean(s * s, -1, keepdims=True) + 1e-12)   # the null stays 0
        return SupportProjector(cfg.hidden, dt, name='y_embed')(s.astype(dt))

    def tokens(self, cfg: ModelConfig, tok, cond: dict, drop):
        "`(tokens, kv_len, ctx, keep)` for the blocks: the target tokens `(B, T, D)`, no key mask, no cross-attention."
        return tok, None, None, None

    def cost(self, cfg: ModelConfig, K: int) -> dict:
        "What a block pays for with K supports: input channels, self-attention tokens, cross-attention keys."
        return {'input_channels': cfg.in_channels, 'tokens': cfg.tokens, 'cross_keys': 0}


# %% [markdown]
# The seed's conditioning reads the support embeddings only, takes any K >= 1, and a dropped example's embedding is zero:

# %%
cfg = model_config('mu')
sup = Conditioning()
r = np.random.default_rng(0)
batch = {'support_embeds': r.normal(size=(3, 5, cfg.support_dim)).astype(np.float16),
         'support_latents': r.normal(size=(3, 5, 28, 28, 4)).astype(np.float16), 'labels': np.array([0, 2, 1], np.int32)}
c = sup.inputs(batch, LatentScaling(0.5))
test_eq(list(c), ['support_embed']); test_eq(c['support_embed'].dtype, jnp.float32)
test_close(c['support_embed'], batch['support_embeds'].astype(np.float32).mean(1), eps=1e-6)
test_eq(jax.tree_util.tree_map(jnp.shape, sup.null(cfg, 3)), jax.tree_util.tree_map(jnp.shape, sup.example(cfg, 3)))
test_close(np.linalg.norm(sup.example(cfg, 3)['support_embed'], axis=-1), np.ones(3), eps=1e-5)
sup.check_shots(1); test_fail(lambda: sup.check_shots(0), contains='at least one support')

# %% [markdown]
# The seed feeds the mean embedding to its MLP as it is: a unit-norm vector of `support_dim` entries, each about
# 1 / sqrt(support_dim), against the timestep's sinusoid of entries near 1, so the class enters adaLN far weaker than
# t. `support_rms=True` scales it to unit RMS first: then only its direction counts, and the null stays zero.

# %%
from fsdit.dit import DiT, init_params
from fsdit.testing import perturb
emb3 = jnp.asarray(l2_normalize(r.normal(size=(3, cfg.support_dim))), jnp.float32)
x3, t3, keep = jnp.asarray(r.normal(size=(3, 28, 28, 4)), jnp.float32), jnp.full((3,), 0.5), jnp.zeros(3, bool)
for rms in (False, True):
    mc_r = model_config('mu', support_rms=rms)
    p_r = perturb(init_params(mc_r, jax.random.PRNGKey(0)))
    v = lambda e, d=keep: np.asarray(DiT(mc_r).apply({'params': p_r}, x3, t3, {'support_embed': e}, d))
    assert np.allclose(v(emb3), v(3 * emb3), atol=1e-5) == rms      # with it only the direction counts
    test_close(v(emb3, ~keep), v(jnp.zeros_like(emb3), keep), eps=1e-5)   # the null condition is still zero


# %% [markdown]
# ## The class label (`cond='class'`)
#
# The seed's class-label mode: a label table with one extra row, the null class, for CFG. It reads labels and no
# supports, so it cannot generate an unseen class.

# %%
#| export
class ClassLabel(Conditioning):
    "`cond='class'`: a label embedding into adaLN, the null class where `drop`."
    name, batch_keys, takes_supports = 'class', ('labels',), False

    def inputs(self, batch, scaling): return {'labels': batch['labels']}
    def null(self, cfg, B, K=1): return {'labels': jnp.full((B,), cfg.num_classes, jnp.int32)}

    def example(self, cfg, B, seed=0, K=5):
        return {'labels': jnp.asarray(np.random.default_rng(seed).integers(0, cfg.num_classes, B), jnp.int32)}

    def check_shots(self, k):
        if k: raise ValueError("this run is class-conditioned (cond='class'): it generates seen classes by label "
                               "and cannot take support images")

    def embed(self, cfg, cond, drop):
        labels = jnp.where(drop, cfg.num_classes, cond['labels'])
        return LabelEmbedder(cfg.num_classes, cfg.hidden, jnp.dtype(cfg.dtype), name='y_embed')(labels)


# %%
ccfg = model_config('mu', cond='class', num_classes=5)
lab = ClassLabel()
test_eq(lab.inputs(batch, LatentScaling(0.5)), {'labels': batch['labels']})
test_eq(np.asarray(lab.null(ccfg, 2)['labels']), [5, 5])                  # the null class is the extra row
assert (np.asarray(lab.example(ccfg, 50)['labels']) < 5).all()
lab.check_shots(None); test_fail(lambda: lab.check_shots(5), contains='class-conditioned')


# %% [markdown]
# ## Support latents
#
# Three conditionings also read the supports' latents; the mean embedding still enters through adaLN. `'aligned'`
# puts their per-position statistics beside the target (no extra token), `'context'` appends their tokens to the
# self-attention of every block (a dropped example masks them out as keys) and `'xattn'` lets every block
# cross-attend to them (a dropped example's cross-attention is multiplied by `keep = 0`). The DiT notebook explains
# each; here is where each plugs in.

# %%
#| export
def _support_tokens_each(cfg: ModelConfig) -> int:
    return (cfg.input_size // cfg.context_patch) ** 2


class AlignedSupports(Conditioning):
    "`cond='aligned'`: the supports' mean, spread and presence per position, as channels beside the target."
    name, batch_keys, needs_latents = 'aligned', ('support_embeds', 'support_latents'), True

    def augment_input(self, cfg, inp, cond, drop):
        return jnp.concatenate([inp, support_stats(cond['support_latents'], drop).astype(inp.dtype)], -1)

    def cost(self, cfg, K): return dict(super().cost(cfg, K), input_channels=3 * cfg.in_channels + 1)


class ContextTokens(Conditioning):
    "`cond='context'`: the supports' tokens appended to the target's, masked out as keys where `drop`."
    name, batch_keys, needs_latents = 'context', ('support_embeds', 'support_latents'), True

    def tokens(self, cfg, tok, cond, drop):
        n_target = tok.shape[1]
        ctx = SupportTokens(cfg, name='support_tokens')(cond['support_latents'].astype(jnp.dtype(cfg.dtype)))
        tok = jnp.concatenate([tok, ctx], axis=1)                            # (B, T + K*T_s, D)
        return tok, jnp.where(drop, n_target, tok.shape[1]).astype(jnp.int32), None, None

    def cost(self, cfg, K): return dict(super().cost(cfg, K), tokens=cfg.tokens + K * _support_tokens_each(cfg))


class SupportCrossAttention(Conditioning):
    "`cond='xattn'`: every block cross-attends to the supports' tokens, not at all where `drop`."
    name, batch_keys, needs_latents = 'xattn', ('support_embeds', 'support_latents'), True

    def tokens(self, cfg, tok, cond, drop):
        dt = jnp.dtype(cfg.dtype)
        ctx = SupportTokens(cfg, name='support_tokens')(cond['support_latents'].astype(dt))   # (B, K*T_s, D)
        return tok, None, nn.LayerNorm(dtype=dt, name='support_ln')(ctx), 1.0 - drop.astype(jnp.float32)

    def cost(self, cfg, K): return dict(super().cost(cfg, K), cross_keys=K * _support_tokens_each(cfg))


# %% [markdown]
# ## The registry
#
# One instance per name, in `fsdit.config.CONDS` order (the config validates the name and cannot import this
# module, which builds on the DiT's layers); `conditioning(cfg)` is the only lookup by name.

# %%
#| export
CONDITIONINGS: dict[str, Conditioning] = {c.name: c for c in (Conditioning(), ClassLabel(), ContextTokens(),
                                                               AlignedSupports(), SupportCrossAttention())}
SUPPORT_LATENT_CONDS = tuple(n for n, c in CONDITIONINGS.items() if c.needs_latents)


def conditioning(cfg: ModelConfig) -> Conditioning:
    "The conditioning `cfg.cond` names."
    return CONDITIONINGS[cfg.cond]


# %% [markdown]
# Every conditioning's inputs, null condition and example have the same entries — those the model reads — and the
# null and example conditions the same shapes. The cost is what the DiT builds: the patch embedding's input channels,
# the length of the first block's input, and whether the blocks have a cross-attention (one trace each, nothing
# compiled).

# %%
test_eq(tuple(CONDITIONINGS), CONDS); test_eq(SUPPORT_LATENT_CONDS, ('context', 'aligned', 'xattn'))
shape = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
for name in CONDS:
    mc = model_config('mu', cond=name, **({'num_classes': 5} if name == 'class' else {}))
    cd = conditioning(mc)
    test_eq(cd.name, name); assert set(cd.batch_keys) <= set(batch)
    inp = cd.inputs(batch, LatentScaling(0.5))
    test_eq(set(inp), set(cd.null(mc, 3))); test_eq(shape(cd.null(mc, 3, K=5)), shape(cd.example(mc, 3, K=5)))
    test_eq(shape(inp), shape(cd.example(mc, 3, K=5)))
    if cd.needs_latents: test_close(inp['support_latents'], batch['support_latents'].astype(np.float32) * 0.5, eps=1e-6)
    variables = jax.eval_shape(lambda: DiT(mc).init(jax.random.PRNGKey(0), jnp.zeros((3, 28, 28, 4)), jnp.zeros(3),
                                                    cd.example(mc, 3, K=2), capture_intermediates=True))
    p, cost = variables['params'], cd.cost(mc, 2)
    test_eq(p['x_embed']['proj']['kernel'].shape[2], cost['input_channels'])
    test_eq(variables['intermediates']['block_0']['__call__'][0][0].shape[1], cost['tokens'])
    test_eq('xattn' in p['block_0'], cost['cross_keys'] > 0)
test_eq(conditioning(model_config('mu', cond='xattn')).cost(model_config('mu', cond='xattn'), 2)['cross_keys'], 2 * 49)
