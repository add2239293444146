# %% [markdown]
# # Encoder
#
# > The SigLIP(2) vision tower in Flax — ViT with MAP-head pooling as in transformers' `SiglipVisionModel` — loaded from a transformers checkpoint (hub id or local directory) with safetensors, no torch at run time.

# %%
#| default_exp encoder

# %%
#| export
from __future__ import annotations
import functools, json
from dataclasses import dataclass, asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn
from jaxtyping import Array, Float

from fsdit.data import resize_rule
from fsdit.utils import l2_normalize
from fsdit.hub import HubUnavailableError, resolve_checkpoint
_all_ = ['HubUnavailableError']   # raised by `SigLIPEncoder.from_pretrained`; its callers catch it from here

# %%
import os, tempfile
import torch, transformers
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# The seed conditions its DiT on the SigLIP2 B/16 image embedding: the vision tower's MAP-pooled output,
# L2-normalised (what big_vision's two-tower model returns as `zimg`). transformers 5 no longer ships Flax
# models, so the tower is written here and proved equal to transformers' PyTorch `SiglipVisionModel`
# (numerically here on a tiny model, and in `tests/test_encoder_parity.py` on several configs, every
# checkpoint layout the hub and transformers write, and the full-size B/16 architecture).
#
# ## The architecture
#
# The shape of the tower is read from the checkpoint's config by transformers' own config classes (the
# hub's `config.json` is minimal and leans on their defaults); `VisionSpec` keeps only what the Flax
# module needs, as a frozen (hashable) dataclass.

# %%
#| export
ACTIVATIONS = {  # transformers' ACT2FN names -> jax
    'gelu_pytorch_tanh': partial(nn.gelu, approximate=True), 'gelu_new': partial(nn.gelu, approximate=True),
    'gelu_fast': partial(nn.gelu, approximate=True), 'gelu': partial(nn.gelu, approximate=False),
    'quick_gelu': lambda x: x * nn.sigmoid(1.702 * x), 'relu': nn.relu, 'silu': nn.silu, 'swish': nn.silu,
}


@dataclass(frozen=True)
class VisionSpec:
    "The vision tower's shape: the fields of transformers' `SiglipVisionConfig` the Flax module needs."
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = 'gelu_pytorch_tanh'
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self):
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ValueError(f"square image_size/patch_size (ints) expected, got {self.image_size!r}/{self.patch_size!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; supported: {sorted(ACTIVATIONS)}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def grid(self) -> int: return self.image_size // self.patch_size  # torch's 'valid' conv drops the remainder

    @property
    def num_patches(self) -> int: return self.grid ** 2

    @property
    def head_dim(self) -> int: return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg) -> VisionSpec:
        "From a transformers `SiglipVisionConfig` (or anything with its fields)."
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


# %%
test_eq(VisionSpec.from_hf(transformers.SiglipVisionConfig()), VisionSpec())  # our defaults are the library's = B/16 at 224
test_eq((VisionSpec().num_patches, VisionSpec().head_dim), (196, 64))
test_fail(lambda: VisionSpec(hidden_size=30, num_attention_heads=4), contains='does not divide')


# %% [markdown]
# The module follows `modeling_siglip.py` line for line: a `patch x patch` convolution with stride `patch`
# cuts the image into tokens (no class token), a learned position embedding is added, then pre-LN encoder
# layers
#
# $$h \leftarrow h + \mathrm{Attn}(\mathrm{LN}_1(h)), \qquad h \leftarrow h + \mathrm{MLP}(\mathrm{LN}_2(h)),$$
#
# a final `post_layernorm` (that is `last_hidden_state`), and the MAP head: one learned probe token
# attends over all tokens (a `torch.nn.MultiheadAttention`), then $p \leftarrow p + \mathrm{MLP}(\mathrm{LN}(p))$;
# the probe's output is `pooler_output`. Parameters stay float32; `dtype` is the compute dtype. Softmax and
# layer-norm statistics are float32 in both dtypes, as in the reference's `softmax(..., dtype=float32)`.

# %%
#| export
class Attention(nn.Module):
    "Multi-head attention of queries `xq` over `xkv` with separate q/k/v/out projections."
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xq, xkv):  # (N, Tq, D), (N, T, D)
        D = xq.shape[-1]; hd = D // self.heads
        dense = partial(nn.Dense, D, dtype=self.dtype)
        split = lambda x: x.reshape(*x.shape[:-1], self.heads, hd)                # (N, T, H, hd)
        q, k, v = split(dense(name='q_proj')(xq)), split(dense(name='k_proj')(xkv)), split(dense(name='v_proj')(xkv))
        logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, preferred_element_type=jnp.float32) * hd ** -0.5
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)                     # (N, H, Tq, T)
        o = jnp.einsum('nhqk,nkhd->nqhd', w, v).reshape(*xq.shape[:-1], D)         # (N, Tq, D)
        return dense(name='out_proj')(o)


class MLP(nn.Module):
    "fc1 -> activation -> fc2."
    spec: VisionSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.spec.intermediate_size, dtype=self.dtype, name='fc1')(x)
        x = ACTIVATIONS[self.spec.hidden_act](x)
        return nn.Dense(self.spec.hidden_size, dtype=self.dtype, name='fc2')(x)


class EncoderLayer(nn.Module):
    "Pre-LN transformer layer."
    spec: VisionSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):  # (N, T, D)
        ln = partial(nn.LayerNorm, epsilon=self.spec.layer_norm_eps, dtype=self.dtype)
        x = ln(name='layer_norm1')(h)
        h = h + Attention(self.spec.num_attention_heads, self.dtype, name='self_attn')(x, x)
        return h + MLP(self.spec, self.dtype, name='mlp')(ln(name='layer_norm2')(h))


# %% [markdown]
# Attention, the MLP and a pre-LN encoder layer keep the token shape:

# %%
_s1 = VisionSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
_o, _v = jax.eval_shape(lambda: Attention(4).init_with_output(jax.random.key(0), jnp.zeros((2, 1, 32)), jnp.zeros((2, 5, 32))))
test_eq((_o.shape, sorted(_v['params'])), ((2, 1, 32), ['k_proj', 'out_proj', 'q_proj', 'v_proj']))
_o, _v = jax.eval_shape(lambda: EncoderLayer(_s1).init_with_output(jax.random.key(0), jnp.zeros((2, 16, 32))))
test_eq((_o.shape, sorted(_v['params'])), ((2, 16, 32), ['layer_norm1', 'layer_norm2', 'mlp', 'self_attn']))
test_eq(_v['params']['mlp']['fc1']['kernel'].shape, (32, 64))


# %% [markdown]
# The MAP head pools the tokens into one vector; the tower puts the pieces together:

# %%
#| export
class MAPHead(nn.Module):
    "Multihead attention pooling: a learned probe attends over the tokens."
    spec: VisionSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):  # (N, T, D) -> (N, D)
        D = self.spec.hidden_size
        probe = self.param('probe', nn.initializers.normal(1.0), (1, 1, D)).astype(self.dtype)
        # torch's nn.MultiheadAttention packs q/k/v in one in_proj; the loader splits it into q/k/v_proj
        p = Attention(self.spec.num_attention_heads, self.dtype, name='attention')(jnp.broadcast_to(probe, (h.shape[0], 1, D)), h)
        p = p + MLP(self.spec, self.dtype, name='mlp')(nn.LayerNorm(epsilon=self.spec.layer_norm_eps, dtype=self.dtype, name='layernorm')(p))
        return p[:, 0]


class SiglipVision(nn.Module):
    "SigLIP vision tower: images (N, H, W, C) in [-1, 1] -> (last_hidden_state (N, T, D), pooler_output (N, D) or None)."
    spec: VisionSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        s = self.spec
        x = nn.Conv(s.hidden_size, (s.patch_size,) * 2, strides=(s.patch_size,) * 2, padding='VALID',
                    dtype=self.dtype, name='patch_embedding')(images.astype(self.dtype))   # (N, g, g, D)
        h = x.reshape(x.shape[0], -1, s.hidden_size)                                        # (N, T, D), row-major like torch's flatten
        pos = self.param('position_embedding', nn.initializers.normal(0.02), (s.num_patches, s.hidden_size))
        h = h + pos.astype(self.dtype)
        for i in range(s.num_hidden_layers):
            h = EncoderLayer(s, self.dtype, name=f'layers_{i}')(h)
        h = nn.LayerNorm(epsilon=s.layer_norm_eps, dtype=self.dtype, name='post_layernorm')(h)      # last_hidden_state
        pooled = MAPHead(s, self.dtype, name='head')(h) if s.vision_use_head else None
        return h, pooled


# %%
_o, _v = jax.eval_shape(lambda: MAPHead(_s1).init_with_output(jax.random.key(0), jnp.zeros((2, 16, 32))))
test_eq((_o.shape, _v['params']['probe'].shape), ((2, 32), (1, 1, 32)))
(_h, _p), _v = jax.eval_shape(lambda: SiglipVision(_s1).init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
test_eq((_h.shape, _p.shape), ((2, 16, 32), (2, 32)))
_no_head = VisionSpec(**{**asdict(_s1), 'vision_use_head': False})
test_eq(jax.eval_shape(lambda: SiglipVision(_no_head).init_with_output(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))[0][1], None)


# %%
#| export
def random_params(spec: VisionSpec, seed: int = 0) -> dict:
    "Random float32 params of `SiglipVision(spec)`, drawn with numpy (a jit-compiled Flax init takes many seconds on a CPU)."
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(SiglipVision(spec).init, jax.random.key(0), jnp.zeros((1, spec.image_size, spec.image_size, spec.num_channels)))
    def draw(path, s):
        name = path[-1].key
        if name == 'kernel': return rng.normal(0, np.prod(s.shape[:-1]) ** -0.5, s.shape).astype(np.float32)   # fan-in scaled
        if name == 'scale': return (1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
        return (0.02 * rng.normal(size=s.shape) if name != 'probe' else rng.normal(size=s.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes['params'])


# %% [markdown]
# Random weights for tests and benchmarks are drawn with numpy from the parameter shapes:

# %%
tiny = VisionSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
_h, _p = jax.eval_shape(SiglipVision(tiny).apply, {'params': random_params(tiny)}, jnp.zeros((3, 32, 32, 3)))
test_eq((_h.shape, _p.shape), ((3, 16, 32), (3, 32)))
test_eq(jax.tree.structure(random_params(tiny)), jax.tree.structure(jax.eval_shape(SiglipVision(tiny).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']))


# %% [markdown]
# ## From a transformers checkpoint
#
# The weights are torch tensors in a safetensors file; the conversion is a renaming plus two layout
# changes: linear weights transpose (torch stores `(out, in)`), the patch convolution goes from OIHW to
# HWIO, and the MAP head's packed `in_proj_weight` `(3D, D)` splits into q, k and v. `torch_keys` lists
# every tensor a vision tower must have, with the transformers-5 names (no `vision_model.` prefix).

# %%
#| export
def _dense_keys(prefix): return [f'{prefix}.weight', f'{prefix}.bias']


def _mlp_keys(prefix): return _dense_keys(f'{prefix}.fc1') + _dense_keys(f'{prefix}.fc2')


def torch_keys(spec: VisionSpec) -> list[str]:
    "Every tensor name of transformers' `SiglipVisionModel` for `spec` (transformers-5 layout, no prefix)."
    ks = _dense_keys('embeddings.patch_embedding') + ['embeddings.position_embedding.weight']
    for i in range(spec.num_hidden_layers):
        p = f'encoder.layers.{i}'
        ks += _dense_keys(f'{p}.layer_norm1') + _dense_keys(f'{p}.layer_norm2') + _mlp_keys(f'{p}.mlp')
        ks += [k for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj') for k in _dense_keys(f'{p}.self_attn.{n}')]
    ks += _dense_keys('post_layernorm')
    if spec.vision_use_head:
        ks += ['head.probe', 'head.attention.in_proj_weight', 'head.attention.in_proj_bias']
        ks += _dense_keys('head.attention.out_proj') + _dense_keys('head.layernorm') + _mlp_keys('head.mlp')
    return ks


# %%
test_eq(len(torch_keys(tiny)), 3 + 2 * 16 + 2 + 11)   # embeddings, 2 layers, post_layernorm, MAP head
assert 'head.attention.in_proj_weight' in torch_keys(tiny) and 'encoder.layers.1.self_attn.q_proj.bias' in torch_keys(tiny)
test_eq(len(torch_keys(VisionSpec(**{**asdict(tiny), 'vision_use_head': False}))), 37)


# %% [markdown]
# The conversion walks the Flax parameter tree and the torch names together, so one table serves both
# directions (`to_flax` to load, `to_torch` to save a checkpoint transformers can read back).

# %%
#| export
def _lin(t): return {'kernel': t['weight'].T, 'bias': t['bias']}
def _ln(t): return {'scale': t['weight'], 'bias': t['bias']}
def _sub(sd, prefix): return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + '.')}
def _mlp(t): return {'fc1': _lin(_sub(t, 'fc1')), 'fc2': _lin(_sub(t, 'fc2'))}


def to_flax(sd: dict[str, np.ndarray], spec: VisionSpec) -> dict:
    "Flax params of `SiglipVision(spec)` from a transformers-5 vision state dict (numpy arrays)."
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    conv = sd['embeddings.patch_embedding.weight']                                  # (D, C, p, p) OIHW
    p = {'patch_embedding': {'kernel': conv.transpose(2, 3, 1, 0), 'bias': sd['embeddings.patch_embedding.bias']},
         'position_embedding': sd['embeddings.position_embedding.weight'], 'post_layernorm': _ln(_sub(sd, 'post_layernorm'))}
    for i in range(spec.num_hidden_layers):
        t = _sub(sd, f'encoder.layers.{i}')
        p[f'layers_{i}'] = {'layer_norm1': _ln(_sub(t, 'layer_norm1')), 'layer_norm2': _ln(_sub(t, 'layer_norm2')),
                            'self_attn': {n: _lin(_sub(t, f'self_attn.{n}')) for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj')},
                            'mlp': _mlp(_sub(t, 'mlp'))}
    if spec.vision_use_head:
        t = _sub(sd, 'head')
        w, b = np.split(t['attention.in_proj_weight'], 3), np.split(t['attention.in_proj_bias'], 3)
        att = {n: {'kernel': w[j].T, 'bias': b[j]} for j, n in enumerate(('q_proj', 'k_proj', 'v_proj'))}
        att['out_proj'] = _lin(_sub(t, 'attention.out_proj'))
        p['head'] = {'probe': t['probe'], 'attention': att, 'layernorm': _ln(_sub(t, 'layernorm')), 'mlp': _mlp(_sub(t, 'mlp'))}
    return p


def to_torch(params: dict, spec: VisionSpec) -> dict[str, np.ndarray]:
    "The transformers-5 vision state dict (numpy) of Flax `params`: the inverse of `to_flax`."
    flat = {'/'.join(k.key for k in path): np.asarray(v, np.float32) for path, v in jax.tree_util.tree_leaves_with_path(params)}
    sd = {}
    for k, v in flat.items():
        *mods, leaf = k.split('/')
        if k == 'patch_embedding/kernel': sd['embeddings.patch_embedding.weight'] = v.transpose(3, 2, 0, 1); continue
        if k == 'patch_embedding/bias': sd['embeddings.patch_embedding.bias'] = v; continue
        if k == 'position_embedding': sd['embeddings.position_embedding.weight'] = v; continue
        if k == 'head/probe': sd['head.probe'] = v; continue
        mods = [f'encoder.layers.{m[7:]}' if m.startswith('layers_') else m for m in mods]
        if mods[:2] == ['head', 'attention'] and mods[2] != 'out_proj': continue       # packed below
        sd['.'.join(mods + ['weight' if leaf in ('kernel', 'scale') else leaf])] = v.T if leaf == 'kernel' else v
    if spec.vision_use_head:
        att = params['head']['attention']
        sd['head.attention.in_proj_weight'] = np.concatenate([np.asarray(att[n]['kernel']).T for n in ('q_proj', 'k_proj', 'v_proj')])
        sd['head.attention.in_proj_bias'] = np.concatenate([np.asarray(att[n]['bias']) for n in ('q_proj', 'k_proj', 'v_proj')])
    return sd


# %% [markdown]
# The round trip is exact and covers every tensor the reference model has, no more and no fewer:

# %%
_params = random_params(tiny)
_sd = to_torch(_params, tiny)
test_eq(sorted(_sd), sorted(torch_keys(tiny)))
test_eq(sorted(_sd), sorted(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**asdict(tiny))).state_dict()))
assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(to_flax(_sd, tiny)), jax.tree.leaves(_params)))


# %% [markdown]
# ## Reading a checkpoint directory
#
# Three layouts hold a SigLIP vision tower (see FACTS): the hub's two-tower `SiglipModel` file (vision keys
# under `vision_model.`, beside the text tower), a `SiglipVisionModel` saved by transformers 4 (same prefix)
# and one saved by transformers 5 (no prefix). The config is `model_type` `'siglip'` (two towers, the vision
# part under `vision_config`) or `'siglip_vision_model'`. Anything else — a CLIP, the NaFlex `siglip2`
# classes, a file with tensors missing — is refused with what was expected and what was found, before any
# weights are converted. Only the vision tensors are read (safetensors opens the file lazily), so the text
# tower of the two-tower file costs nothing; sharded checkpoints (`model.safetensors.index.json`) are read
# shard by shard.

# %%
#| export
class CheckpointError(ValueError):
    "The checkpoint is not a SigLIP vision tower this module can load."


def read_vision_config(config: dict) -> VisionSpec:
    "The `VisionSpec` of a SigLIP `config.json` (two-tower `siglip` or `siglip_vision_model`), via transformers' config classes."
    from transformers import SiglipConfig, SiglipVisionConfig
    kind = config.get('model_type')
    if kind == 'siglip': hf = SiglipConfig.from_dict(config).vision_config
    elif kind == 'siglip_vision_model': hf = SiglipVisionConfig.from_dict(config)
    else:
        hint = " (the NaFlex SigLIP2 classes; use a fixed-resolution checkpoint such as google/siglip2-base-patch16-224)" if kind and kind.startswith('siglip2') else ''
        raise CheckpointError(f"expected a SigLIP checkpoint (config model_type 'siglip' or 'siglip_vision_model'), "
                              f"found model_type {kind!r}{hint}")
    return VisionSpec.from_hf(hf)


# %%
test_eq(read_vision_config(transformers.SiglipVisionConfig(**asdict(tiny)).to_dict()), tiny)
test_eq(read_vision_config(transformers.SiglipConfig(vision_config=asdict(tiny)).to_dict()), tiny)   # the two-tower file
test_fail(lambda: read_vision_config({'model_type': 'siglip2'}), contains='NaFlex')


# %% [markdown]
# The tensors are read by name from the safetensors file(s), with or without the `vision_model.` prefix, and
# their shapes are checked against the spec:

# %%
#| export
def _safetensors_files(d: Path) -> list[Path]:
    idx = d / 'model.safetensors.index.json'
    if idx.exists(): return [d / f for f in sorted(set(json.loads(idx.read_text())['weight_map'].values()))]
    if (d / 'model.safetensors').exists(): return [d / 'model.safetensors']
    found = sorted(p.name for p in d.iterdir())
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {d} (found {found}); "
                          "resave the model with save_pretrained(..., safe_serialization=True)")


def _get(f, k) -> np.ndarray:
    try: return f.get_tensor(k)
    except TypeError: return np.asarray(jax.device_get(f.get_tensor(k)), np.float32)  # bfloat16: numpy can't read it


def read_vision_weights(d: str | Path, spec: VisionSpec) -> dict[str, np.ndarray]:
    "The vision tower's tensors (transformers-5 names) from the safetensors file(s) in `d`, any of the three layouts."
    from safetensors import safe_open
    files, where = _safetensors_files(Path(d)), {}
    for fn in files:
        with safe_open(fn, framework='np') as f: where.update({k: fn for k in f.keys()})
    prefixed = any(k.startswith('vision_model.') for k in where)
    names = {k[len('vision_model.'):]: k for k in where if k.startswith('vision_model.')} if prefixed else {k: k for k in where}
    want = torch_keys(spec)
    missing = [k for k in want if k not in names]
    if missing:
        raise CheckpointError(f"{d} is not a SigLIP vision tower for {spec}: expected {len(want)} tensors "
                              f"like {want[:3]}, {len(missing)} missing (e.g. {missing[:3]}); found {len(names)} tensors like {sorted(names)[:3]}")
    extra = sorted(set(names) - set(want))
    if extra and not prefixed:
        raise CheckpointError(f"{d} holds tensors a SigLIP vision tower does not have: {extra[:5]}")
    sd = {}
    for fn in files:
        with safe_open(fn, framework='np') as f:
            sd.update({k: _get(f, names[k]) for k in want if where[names[k]] == fn})
    for k, shape in expected_shapes(spec).items():
        if sd[k].shape != shape: raise CheckpointError(f"tensor {k}: expected shape {shape} for {spec}, found {sd[k].shape}")
    return sd


def expected_shapes(spec: VisionSpec) -> dict[str, tuple]:
    "Shape of every tensor in `torch_keys(spec)`."
    shapes = jax.eval_shape(SiglipVision(spec).init, jax.random.key(0), jnp.zeros((1, spec.image_size, spec.image_size, spec.num_channels)))
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes['params'])   # views: nothing allocated
    return {k: v.shape for k, v in to_torch(zeros, spec).items()}


HUB_PATTERNS = ['config.json', 'model.safetensors', 'model.safetensors.index.json', 'model-*.safetensors']

# %%
from safetensors.numpy import save_file
_wd = Path(tempfile.mkdtemp())
save_file({'vision_model.' + k: np.ascontiguousarray(v) for k, v in _sd.items()}, str(_wd / 'model.safetensors'))
_rw = read_vision_weights(_wd, tiny)
test_eq(sorted(_rw), sorted(_sd)); assert all(np.array_equal(_rw[k], _sd[k]) for k in _sd)
test_eq(expected_shapes(tiny)['embeddings.patch_embedding.weight'], (32, 3, 8, 8))
test_fail(lambda: read_vision_weights(_wd, VisionSpec(**{**asdict(tiny), 'num_hidden_layers': 3})), contains='missing')
test_fail(lambda: read_vision_weights(Path(tempfile.mkdtemp()), tiny), contains='no model.safetensors')

# %% [markdown]
# ## Hub ids and the offline case
#
# A name that is a directory is read as it is; anything else is a hub id, fetched by `fsdit.hub.resolve_checkpoint`
# (the VAE's rule too): from the cache when the files are there, downloaded otherwise, and on a machine
# without network — our CI, a Kaggle session with internet off, `HF_HUB_OFFLINE=1` — refused within
# seconds by a `HubUnavailableError` that names the repo and says how to pass a local directory instead.
# Only `config.json` and the safetensors files are fetched.

# %%
#| hide
import subprocess, sys
_r = subprocess.run([sys.executable, '-c', "from fsdit.encoder import SigLIPEncoder; SigLIPEncoder.from_pretrained('google/no-such-siglip')"],
                    env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': tempfile.mkdtemp()}, capture_output=True, text=True, timeout=120)
assert 'HubUnavailableError' in _r.stderr and "'google/no-such-siglip'" in _r.stderr and 'local-dir' in _r.stderr, _r.stderr[-2000:]


# %% [markdown]
# ## Preprocessing: one resize rule
#
# SigLIP expects `image_size` x `image_size` RGB in [-1, 1]. Every image that reaches the encoder — in
# precompute, in online encoding, in the explorer — goes through `preprocess_siglip`, which applies
# exactly what transformers' SigLIP image processor does with the hub's `preprocessor_config.json`
# (`resample: 2`): PIL bilinear resize of the uint8 image straight to the square (no aspect-preserving
# crop), rescale by 1/255, normalise with mean 0.5 and std 0.5. The seed's paths resized in different
# ways (FACTS: the rule moves embeddings a little), so the rule is a string recorded in every feature store:
# `fsdit.data.resize_rule`, the one definition that `fsdit.data.to_unit` and this function follow.

# %%
#| export
def preprocess_siglip(images, size: int = 224) -> Float[np.ndarray, 'N size size 3']:
    "uint8 RGB images of any size (PIL images, (H, W, 3) arrays or an (N, H, W, 3) array) -> float32 (N, size, size, 3) in [-1, 1]."
    from PIL import Image
    if isinstance(images, np.ndarray) and images.ndim == 4: images = list(images)
    elif isinstance(images, (np.ndarray, Image.Image)): images = [images]
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            im = np.asarray(im)
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"preprocess_siglip wants uint8 (H, W, 3) RGB images, got {im.dtype} {im.shape}")
            im = Image.fromarray(im)
        r = np.asarray(im.convert('RGB').resize((size, size), resample=Image.BILINEAR), dtype=np.float32)
        out[i] = (r * np.float32(1 / 255) - 0.5) / 0.5
    return out


# %%
_rng = np.random.default_rng(0)
_imgs = [_rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((300, 200), (64, 97), (224, 224))]
_ours = preprocess_siglip(_imgs)
_proc = transformers.SiglipImageProcessorPil(resample=2)   # the hub's preprocessor_config.json: resample 2 = bilinear
_ref = np.stack([_proc(i, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0) for i in _imgs])
test_eq(_ours.shape, (3, 224, 224, 3))
test_close(_ours, _ref, eps=1e-6)
assert -1 <= _ours.min() and _ours.max() <= 1
test_fail(lambda: preprocess_siglip(np.zeros((8, 8, 3), np.float32)), contains='uint8')


# %% [markdown]
# ## `SigLIPEncoder`
#
# The object the rest of the package uses. `from_pretrained` reads any of the checkpoints above;
# `random` builds an untrained tower of any shape (tests, benchmarks) and `save_pretrained` writes it in
# the transformers-5 layout, so a test elsewhere can make a tiny encoder directory without torch.
# `pooled` is transformers' `pooler_output`, `embed` the same L2-normalised, and `encode_supports` maps a
# batch of support sets `(B, K, H, W, 3)` to the mean of their K normalised embeddings, the DiT's
# `support_embed`. All three are compiled once per input shape. Images are checked on the host before they
# reach the device: rank 4, `num_channels` channels, the model's size (the position table is fixed) and
# values in [-1, 1] — uint8 or [0, 255] input raises instead of giving a wrong embedding.

# %%
#| export
def _check_images(x, spec: VisionSpec, rank: int = 4):
    if isinstance(x, jax.core.Tracer): return x
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    what = '(N, H, W, C)' if rank == 4 else '(B, K, H, W, C)'
    if x.ndim != rank: raise ValueError(f"images must be {what} NHWC, got shape {x.shape}")
    if x.shape[-1] != spec.num_channels: raise ValueError(f"images must have {spec.num_channels} channels (NHWC), got shape {x.shape}")
    if x.shape[-3:-1] != (spec.image_size,) * 2:
        raise ValueError(f"images must be {spec.image_size}x{spec.image_size}, got {x.shape[-3:-1]}: resize with preprocess_siglip")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be floats in [-1, 1], got {x.dtype}: convert uint8 images with preprocess_siglip")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001 or not np.isfinite(lo + hi):
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]: scale with preprocess_siglip or x/127.5-1")
    return x


# The module is a static (hashable) argument: encoders of the same shape and dtype share one compiled function.
@partial(jax.jit, static_argnums=0)
def _forward(module, params, x):
    h, p = module.apply({'params': params}, x)
    return h.astype(jnp.float32), None if p is None else p.astype(jnp.float32)


def _pool(module, params, x):
    if not module.spec.vision_use_head: raise ValueError("this checkpoint has no MAP head (vision_use_head=False): no pooled output")
    return module.apply({'params': params}, x)[1].astype(jnp.float32)


_embed = jax.jit(lambda module, params, x: l2_normalize(_pool(module, params, x)), static_argnums=0)


@functools.lru_cache(maxsize=8)
def _embed_any_size(module):
    "Traceable `(params, images) -> unit embeddings`, images resized (bilinear, antialiased) to the tower's size."
    n = module.spec.image_size
    def fn(params, x):
        if x.shape[1:3] != (n, n): x = jax.image.resize(x, (x.shape[0], n, n, x.shape[-1]), 'linear', antialias=True)
        return l2_normalize(_pool(module, params, x))
    return fn
_encode_supports = jax.jit(lambda module, params, s: l2_normalize(_pool(module, params, s.reshape(-1, *s.shape[2:])))
                           .reshape(*s.shape[:2], -1).mean(1), static_argnums=0)   # (B, K, H, W, C) -> (B, D)


DTYPE_NAMES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# %%
_ok = np.zeros((2, 32, 32, 3), np.float32)
assert _check_images(_ok, tiny) is _ok
test_fail(lambda: _check_images(_ok[0], tiny), contains='NHWC')
test_fail(lambda: _check_images(_ok + 2, tiny), contains='[-1, 1]')
test_fail(lambda: _pool(SiglipVision(VisionSpec(**{**asdict(tiny), 'vision_use_head': False})), {}, _ok), contains='no MAP head')


# %%
#| export
class SigLIPEncoder:
    "A frozen SigLIP vision tower: Flax module, float32 params, compiled `pooled` / `embed` / `encode_supports`."
    def __init__(self, spec: VisionSpec, params: dict, dtype: str = 'float32', name: str = 'random'):
        if dtype not in DTYPE_NAMES: raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        self.spec, self.dtype, self.name = spec, dtype, name
        self.params = jax.tree.map(jnp.asarray, params)
        self.module = SiglipVision(spec, DTYPE_NAMES[dtype])
    def __call__(self, images: Float[Array, 'N H W C']) -> tuple:
        "(last_hidden_state (N, T, D), pooler_output (N, D)) as transformers' `SiglipVisionModel` returns them, float32."
        return _forward(self.module, self.params, _check_images(images, self.spec))

    def pooled(self, images: Float[Array, 'N H W C']) -> Float[Array, 'N D']:
        "The MAP-head output: transformers' `pooler_output` (not normalised)."
        return self(images)[1]

    def embed(self, images: Float[Array, 'N H W C']) -> Float[Array, 'N D']:
        "L2-normalised pooled embeddings (big_vision's `zimg`)."
        return _embed(self.module, self.params, _check_images(images, self.spec))

    @property
    def embed_fn(self) -> tuple:
        "`(fn, params)`: `fn(params, images)` = `embed` of images of any size (resized), weights as an argument: traceable (encoder guidance)."
        return _embed_any_size(self.module), self.params

    def encode_supports(self, supports: Float[Array, 'B K H W C']) -> Float[Array, 'B D']:
        "Mean of the K L2-normalised embeddings of each support set."
        return _encode_supports(self.module, self.params, _check_images(supports, self.spec, rank=5))

    @property
    def dim(self) -> int: return self.spec.hidden_size

    @property
    def image_size(self) -> int: return self.spec.image_size

    @property
    def resize_rule(self) -> str: return resize_rule(self.spec.image_size)

    def __repr__(self): return f"SigLIPEncoder({self.name!r}, {self.spec}, dtype={self.dtype!r})"

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path = 'google/siglip2-base-patch16-224', dtype: str = 'float32') -> SigLIPEncoder:
        "Load the vision tower of a transformers SigLIP checkpoint: a hub id or a local directory."
        d = resolve_checkpoint(repo_id_or_dir, HUB_PATTERNS, 'a SigLIP checkpoint', 'SigLIPEncoder.from_pretrained')
        spec = read_vision_config(json.loads((d / 'config.json').read_text()))
        return cls(spec, to_flax(read_vision_weights(d, spec), spec), dtype, name=str(repo_id_or_dir))

    @classmethod
    def random(cls, spec: VisionSpec | None = None, seed: int = 0, dtype: str = 'float32', **fields) -> SigLIPEncoder:
        "An untrained tower of shape `spec` (default B/16 at 224) with `fields` overriding it."
        spec = VisionSpec(**{**asdict(spec or VisionSpec()), **fields})
        return cls(spec, random_params(spec, seed), dtype)

    def save_pretrained(self, d: str | Path) -> Path:
        "Write config.json and model.safetensors as transformers 5 saves a `SiglipVisionModel`."
        from safetensors.numpy import save_file
        d = Path(d); d.mkdir(parents=True, exist_ok=True)
        cfg = {'model_type': 'siglip_vision_model', 'architectures': ['SiglipVisionModel'], **asdict(self.spec)}
        (d / 'config.json').write_text(json.dumps(cfg, indent=2))
        save_file({k: np.ascontiguousarray(v) for k, v in to_torch(self.params, self.spec).items()}, str(d / 'model.safetensors'))
        return d


# %% [markdown]
# ## Equal to transformers
#
# A random tiny `SiglipVisionModel` made by transformers, saved with `save_pretrained`, read back through
# `from_pretrained` (the code path of a hub id), gives the reference's outputs on the same images. (The
# full check — several shapes, every layout, the two-tower file, the full-size B/16 — is
# `tests/test_encoder_parity.py`.)

# %%
def _torch_ref(model, x):
    with torch.no_grad():
        o = model(pixel_values=torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
    return o.last_hidden_state.numpy(), o.pooler_output.numpy()

torch.manual_seed(0)
_hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**asdict(tiny))).eval()
_dir = Path(tempfile.mkdtemp()) / 'tiny-siglip'
_hf.save_pretrained(_dir)
enc = SigLIPEncoder.from_pretrained(_dir)
x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
(h, p), (h_ref, p_ref) = enc(x), _torch_ref(_hf, x)
test_eq((h.shape, p.shape, enc.dim), ((4, 16, 32), (4, 32), 32))
assert np.abs(p - p_ref).max() < 1e-4 * np.abs(p_ref).max() and np.abs(h - h_ref).max() < 1e-4 * np.abs(h_ref).max()
test_close(enc.pooled(x), p_ref, eps=1e-4)

# %% [markdown]
# `embed` is unit length; `encode_supports` is the mean of the unit embeddings of each set (so its norm
# is at most 1, and 1 only when the K supports agree):

# %%
e = enc.embed(x)
test_close(np.linalg.norm(e, axis=-1), np.ones(4), eps=1e-5)
test_close(e, p_ref / np.linalg.norm(p_ref, axis=-1, keepdims=True), eps=1e-4)
s = enc.encode_supports(x.reshape(2, 2, 32, 32, 3))
test_eq(s.shape, (2, 32))
test_close(s, np.stack([e[:2].mean(0), e[2:].mean(0)]), eps=1e-6)
assert (np.linalg.norm(s, axis=-1) <= 1 + 1e-6).all()

# %% [markdown]
# `embed_fn` is the same embedding with the weights as an argument, traceable (encoder guidance differentiates
# through it); images of another size are resized to the tower's first:

# %%
_fn, _fp = enc.embed_fn
test_close(jax.jit(_fn)(_fp, x), e, eps=1e-5)
test_eq(_fn(_fp, jax.image.resize(x, (4, 48, 48, 3), 'linear')).shape, (4, 32))
assert np.isfinite(np.asarray(jax.grad(lambda im: (_fn(_fp, im) * e).sum())(x))).all()

# %% [markdown]
# What we save, transformers loads — and its outputs are ours:

# %%
_ours_dir = enc.random(tiny, seed=3).save_pretrained(Path(tempfile.mkdtemp()) / 'ours')
_back = transformers.SiglipVisionModel.from_pretrained(_ours_dir).eval()
test_close(SigLIPEncoder.from_pretrained(_ours_dir).pooled(x), _torch_ref(_back, x)[1], eps=1e-4)

# %% [markdown]
# Bad input raises, with the fix in the message: images in [0, 255], uint8, channels-first, the wrong size,
# or a checkpoint of another kind.

# %%
test_fail(lambda: enc.embed(x * 255), contains='[-1, 1]')
test_fail(lambda: enc.embed((x * 127 + 128).astype(np.uint8)), contains='preprocess_siglip')
test_fail(lambda: enc.embed(x.transpose(0, 3, 1, 2)), contains='channels')
test_fail(lambda: enc.embed(x[:, :16, :16]), contains='32x32')
test_fail(lambda: enc.encode_supports(x), contains='(B, K, H, W, C)')
test_fail(lambda: read_vision_config({'model_type': 'clip'}), contains="found model_type 'clip'")

# %% [markdown]
# ## bfloat16
#
# `dtype='bfloat16'` runs the matmuls and activations in bfloat16 (parameters, softmax and layer-norm
# statistics stay float32; outputs are returned as float32). Measured on the full-size B/16 at 224 with
# random weights (`SigLIPEncoder.random(VisionSpec())`, 8 images: 4 of uniform noise, 4 smooth, in [-1, 1]),
# bfloat16 against float32:
#
# | quantity | error |
# |---|---|
# | L2-normalised embedding (`embed`) | L2 distance 0.0101 max, 0.0096 mean; cosine similarity >= 0.99995 |
# | `pooler_output` | max abs error 1.0% of its largest value |
# | `last_hidden_state` | max abs error 1.5% of its largest value |
#
# That is about 100x the float32 parity tolerance (1e-4): use float32 when the embeddings are stored
# once (precompute), bfloat16 where speed matters more. `tests/test_encoder_parity.py::test_full_size_b16`
# keeps the embedding distance under 0.05. On the tiny model here:

# %%
e16 = SigLIPEncoder.from_pretrained(_dir, dtype='bfloat16').embed(x)
_d = np.linalg.norm(np.asarray(e16) - np.asarray(e), axis=-1)
test_eq(e16.dtype, jnp.float32)  # outputs are float32 in both modes
assert 0 < _d.max() < 0.05, _d
