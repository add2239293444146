# %% [markdown]
# # SD-VAE
#
# > The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax: images in [-1, 1] to the posterior (mean, log-variance) of their latents and back, with weights read from a diffusers checkpoint — no torch, no diffusers at run time.

# %%
#| default_exp vae

# %%
#| export
from __future__ import annotations
import functools, json, os, re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import jax, jax.numpy as jnp
import flax.linen as nn

from fsdit.hub import resolve_checkpoint
from fsdit.utils import patch_to

# %%
import tempfile
from fastcore.test import test_eq, test_fail, test_close

# %% [markdown]
# ## The architecture, from the checkpoint's config
#
# The DiT trains in the latent space of `stabilityai/sd-vae-ft-mse`: four encoder blocks of 128/256/512/512
# channels (two ResNet blocks each, a stride-2 convolution between blocks), a middle block (ResNet,
# single-head self-attention, ResNet), GroupNorm with 32 groups and eps 1e-6 everywhere, SiLU, and 1x1
# `quant_conv` / `post_quant_conv` around the 4-channel latent. 224 px images become 28x28x4 latents.
# The decoder mirrors it with one more ResNet per block and nearest-neighbour upsampling.
#
# `VAEConfig` holds the fields of diffusers' `AutoencoderKL` config that change the network; its
# defaults are diffusers' own defaults, which is what a field missing from an old config.json means.

# %%
#| export
ACTIVATIONS: dict[str, Callable] = {'silu': nn.silu, 'swish': nn.silu, 'mish': lambda x: x * jnp.tanh(nn.softplus(x)),
                                    'gelu': lambda x: nn.gelu(x, approximate=False), 'relu': nn.relu}
DEFAULT_VAE = 'stabilityai/sd-vae-ft-mse'
DEFAULT_SCALING = 0.18215   # what diffusers assumes for configs written before `scaling_factor` existed


@dataclass(frozen=True)
class VAEConfig:
    "The shape of a diffusers `AutoencoderKL`; defaults are diffusers' `AutoencoderKL.__init__` defaults."
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = 'silu'
    scaling_factor: float = DEFAULT_SCALING
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        "Image side / latent side: one stride-2 convolution between consecutive encoder blocks."
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config_from_dict(d: dict[str, Any], source: str = 'config') -> VAEConfig:
    "Validate a diffusers `AutoencoderKL` config dict (as in config.json) and return its `VAEConfig`."
    cls = d.get('_class_name')
    if cls is None and 'block_out_channels' not in d:   # e.g. a transformers config.json (CLIP, SigLIP)
        found = f"model_type={d['model_type']!r}" if 'model_type' in d else f"keys {sorted(d)[:6]}"
        raise ValueError(f"{source}: expected a diffusers AutoencoderKL config, found {found}")
    if cls not in (None, 'AutoencoderKL'):
        raise ValueError(f"{source}: expected a diffusers AutoencoderKL, found _class_name={cls!r}")
    n = len(d.get('block_out_channels', VAEConfig.block_out_channels))
    for key, block in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
        types = list(d.get(key, [block]))
        if types != [block] * n:
            raise ValueError(f"{source}: expected {key} = {n} x {block!r} (an SD-style AutoencoderKL), found {types}")
    known = {f.name for f in fields(VAEConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    if 'block_out_channels' in kw: kw['block_out_channels'] = tuple(kw['block_out_channels'])
    if kw.get('scaling_factor') is None: kw.pop('scaling_factor', None)
    c = VAEConfig(**kw)
    if c.act_fn not in ACTIVATIONS:
        raise ValueError(f"{source}: act_fn {c.act_fn!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    bad = [ch for ch in c.block_out_channels if ch % c.norm_num_groups]
    if bad: raise ValueError(f"{source}: norm_num_groups {c.norm_num_groups} does not divide the channels {bad}")
    return c


# %% [markdown]
# A config dict becomes a `VAEConfig` only if it describes a VAE this module can run: an `AutoencoderKL`
# built from the plain encoder and decoder blocks. Anything else fails here, naming what was found.

# %%
sd_cfg = vae_config_from_dict({'_class_name': 'AutoencoderKL', 'block_out_channels': [128, 256, 512, 512],
                               'down_block_types': ['DownEncoderBlock2D'] * 4, 'up_block_types': ['UpDecoderBlock2D'] * 4,
                               'layers_per_block': 2, 'latent_channels': 4, 'norm_num_groups': 32})
test_eq(sd_cfg.downsample_factor, 8)
test_eq(sd_cfg.scaling_factor, 0.18215)   # absent from the hub's config.json -> diffusers' default
test_eq(vae_config_from_dict({'_class_name': 'AutoencoderKL', 'scaling_factor': 0.13025}).scaling_factor, 0.13025)   # SDXL's VAE
test_fail(lambda: vae_config_from_dict({'_class_name': 'VQModel'}), contains='AutoencoderKL')
test_fail(lambda: vae_config_from_dict({'model_type': 'clip'}), contains="model_type='clip'")


# %% [markdown]
# ## Building blocks
#
# Flax modules named like diffusers' submodules (`down_blocks_0/resnets_1/conv1` for
# `down_blocks.0.resnets.1.conv1`), so that converting a PyTorch state dict is a mechanical rename.
# Everything is NHWC. GroupNorm uses the two-pass variance (`use_fast_variance=False`), as PyTorch
# does; its statistics are always float32, also when the compute dtype is bfloat16.

# %%
#| export
def _conv(features: int, k: int = 3, dtype=jnp.float32, name: str | None = None, stride: int = 1, pad: int | None = None):
    p = k // 2 if pad is None else pad
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), dtype=dtype, name=name)


def _norm(groups: int, dtype, name: str):
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    "diffusers' `ResnetBlock2D` without a time embedding: norm-act-conv twice plus a (1x1-projected) skip."
    out: int
    groups: int
    act: str = 'silu'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):                                                   # (B, H, W, Cin)
        act = ACTIVATIONS[self.act]
        h = _conv(self.out, dtype=self.dtype, name='conv1')(act(_norm(self.groups, self.dtype, 'norm1')(x)))
        h = _conv(self.out, dtype=self.dtype, name='conv2')(act(_norm(self.groups, self.dtype, 'norm2')(h)))
        if x.shape[-1] != self.out: x = _conv(self.out, 1, self.dtype, 'conv_shortcut')(x)
        return x + h                                                         # (B, H, W, out)


class Attention(nn.Module):
    "The mid block's single-head spatial self-attention (GroupNorm in, residual out), softmax in float32."
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):                                                   # (B, H, W, C)
        B, H, W, C = x.shape
        h = _norm(self.groups, self.dtype, 'group_norm')(x).reshape(B, H * W, C)
        q, k, v = (nn.Dense(C, dtype=self.dtype, name=n)(h) for n in ('to_q', 'to_k', 'to_v'))
        w = jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32) / np.sqrt(C)  # (B, HW, HW)
        o = jnp.einsum('bqk,bkc->bqc', jax.nn.softmax(w, axis=-1).astype(v.dtype), v)
        return x + nn.Dense(C, dtype=self.dtype, name='to_out_0')(o).reshape(B, H, W, C)


class Downsample(nn.Module):
    "Stride-2 3x3 convolution after padding one row and column at the bottom and right, as diffusers does."
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):                                                   # (B, H, W, C)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))                    # F.pad(x, (0, 1, 0, 1))
        return _conv(x.shape[-1], 3, self.dtype, 'conv', stride=2, pad=0)(x)  # (B, ceil(H/2), ceil(W/2), C)


class Upsample(nn.Module):
    "Nearest-neighbour x2 upsampling, then a 3x3 convolution."
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):                                                   # (B, H, W, C)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)                  # (B, 2H, 2W, C)
        return _conv(x.shape[-1], 3, self.dtype, 'conv')(x)


# %% [markdown]
# The downsampling pads asymmetrically (one zero row and column at the end) and uses no padding in the
# convolution: a symmetric `padding=1` would shift every latent by half a pixel against the trained weights.

# %%
x = jnp.arange(2 * 8 * 6 * 3, dtype=jnp.float32).reshape(2, 8, 6, 3)
test_eq(jax.eval_shape(lambda: Downsample().init_with_output(jax.random.key(0), x)[0]).shape, (2, 4, 3, 3))
test_eq(jax.eval_shape(lambda: Upsample().init_with_output(jax.random.key(0), x)[0]).shape, (2, 16, 12, 3))
test_eq(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)[:, ::2, ::2], x)


# %% [markdown]
# ## Encoder, decoder and the autoencoder
#
# Encoder: `conv_in`, one down block per entry of `block_out_channels` (`layers_per_block` ResNets, a
# downsampling between blocks), the mid block, GroupNorm-SiLU-`conv_out` to 2 x latent channels (mean
# and log-variance). Decoder: `conv_in`, mid block, the up blocks in reverse channel order with
# `layers_per_block + 1` ResNets and an upsampling between blocks, GroupNorm-SiLU-`conv_out`.

# %%
#| export
class MidBlock(nn.Module):
    "ResNet, attention (unless the config turns it off), ResNet."
    c: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ch, g = self.c.block_out_channels[-1], self.c.norm_num_groups
        x = ResnetBlock(ch, g, self.c.act_fn, self.dtype, name='resnets_0')(x)
        if self.c.mid_block_add_attention: x = Attention(g, self.dtype, name='attentions_0')(x)
        return ResnetBlock(ch, g, self.c.act_fn, self.dtype, name='resnets_1')(x)


class ResnetStack(nn.Module):
    "A down or up block: `n` ResNets to `out` channels, then an optional down- or upsampling."
    out: int
    n: int
    c: VAEConfig
    resample: str | None = None     # 'down' | 'up' | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.n):
            x = ResnetBlock(self.out, self.c.norm_num_groups, self.c.act_fn, self.dtype, name=f'resnets_{j}')(x)
        if self.resample == 'down': x = Downsample(self.dtype, name='downsamplers_0')(x)
        if self.resample == 'up': x = Upsample(self.dtype, name='upsamplers_0')(x)
        return x


# %%
_c = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
_y, _v = jax.eval_shape(lambda: ResnetStack(16, 2, _c, 'down').init_with_output(jax.random.key(0), jnp.zeros((1, 8, 8, 8))))
test_eq((_y.shape, sorted(_v['params'])), ((1, 4, 4, 16), ['downsamplers_0', 'resnets_0', 'resnets_1']))
_y, _v = jax.eval_shape(lambda: MidBlock(_c).init_with_output(jax.random.key(0), jnp.zeros((1, 4, 4, 16))))
test_eq((_y.shape, sorted(_v['params'])), ((1, 4, 4, 16), ['attentions_0', 'resnets_0', 'resnets_1']))


# %% [markdown]
# The encoder halves the side between blocks and ends at twice the latent channels; the decoder mirrors it:

# %%
#| export
class Encoder(nn.Module):
    "Images (B, H, W, in_channels) -> (B, H/f, W/f, 2 x latent_channels) before `quant_conv`."
    c: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, chs = self.c, self.c.block_out_channels
        x = _conv(chs[0], dtype=self.dtype, name='conv_in')(x)
        for i, ch in enumerate(chs):
            x = ResnetStack(ch, c.layers_per_block, c, 'down' if i < len(chs) - 1 else None, self.dtype,
                            name=f'down_blocks_{i}')(x)
        x = MidBlock(c, self.dtype, name='mid_block')(x)
        x = ACTIVATIONS[c.act_fn](_norm(c.norm_num_groups, self.dtype, 'conv_norm_out')(x))
        return _conv(2 * c.latent_channels, dtype=self.dtype, name='conv_out')(x)


class Decoder(nn.Module):
    "Latents (B, h, w, latent_channels) after `post_quant_conv` -> images (B, h*f, w*f, out_channels)."
    c: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, chs = self.c, self.c.block_out_channels[::-1]
        x = _conv(chs[0], dtype=self.dtype, name='conv_in')(z)
        x = MidBlock(c, self.dtype, name='mid_block')(x)
        for i, ch in enumerate(chs):
            x = ResnetStack(ch, c.layers_per_block + 1, c, 'up' if i < len(chs) - 1 else None, self.dtype,
                            name=f'up_blocks_{i}')(x)
        x = ACTIVATIONS[c.act_fn](_norm(c.norm_num_groups, self.dtype, 'conv_norm_out')(x))
        return _conv(c.out_channels, dtype=self.dtype, name='conv_out')(x)


# %%
test_eq(jax.eval_shape(lambda: Encoder(_c).init_with_output(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))[0]).shape, (1, 8, 8, 8))
test_eq(jax.eval_shape(lambda: Decoder(_c).init_with_output(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))[0]).shape, (1, 16, 16, 3))


# %% [markdown]
# The autoencoder adds the optional 1x1 `quant_conv` / `post_quant_conv` around the latents:

# %%
#| export
class AutoencoderKL(nn.Module):
    "diffusers' `AutoencoderKL` (encoder, decoder, optional 1x1 quant convs) as a Flax module."
    c: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder, self.decoder = Encoder(self.c, self.dtype), Decoder(self.c, self.dtype)
        L = self.c.latent_channels
        self.quant_conv = _conv(2 * L, 1, self.dtype) if self.c.use_quant_conv else None
        self.post_quant_conv = _conv(L, 1, self.dtype) if self.c.use_post_quant_conv else None

    def moments(self, x):                                                    # (B, H, W, 3) in [-1, 1]
        h = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None: h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)          # (B, H/f, W/f, L) each
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):                                                     # (B, h, w, L), unscaled
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None: z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)                           # (B, h*f, w*f, 3)

    def __call__(self, x): return self.decode(self.moments(x)[0])


# %% [markdown]
# `AutoencoderKL.moments` returns the diagonal Gaussian posterior; like diffusers'
# `DiagonalGaussianDistribution` it clips the log-variance to [-30, 20]. Outputs are float32 whatever the
# compute dtype.

# %%
tiny = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
m = AutoencoderKL(tiny)
params = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']   # shapes only
mean, logvar = jax.eval_shape(lambda p, x: m.apply({'params': p}, x, method='moments'), params, jnp.zeros((2, 16, 16, 3)))
test_eq(mean.shape, (2, 8, 8, 4)); test_eq(logvar.shape, (2, 8, 8, 4))
test_eq(sorted(params), ['decoder', 'encoder', 'post_quant_conv', 'quant_conv'])
test_eq(sorted(params['decoder']['up_blocks_0']), ['resnets_0', 'resnets_1', 'upsamplers_0'])

# %% [markdown]
# ## PyTorch weights to Flax
#
# A diffusers state dict maps to the Flax tree by a rename: `a.0.b` becomes `a_0/b`, convolution kernels
# go from PyTorch's OIHW to Flax's HWIO, linear weights transpose, GroupNorm `weight` becomes `scale`.
# Checkpoints written by early diffusers (the hub's `sd-vae-ft-mse` among them) name the mid-block
# attention `query/key/value/proj_attn`; diffusers still renames these at load time, and so do we
# (also accepting them stored as 1x1 convolutions, as the original LDM checkpoints did).

# %%
#| export
_LEGACY_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _flax_path(key: str) -> tuple[str, ...]:
    "'encoder.down_blocks.0.resnets.1.conv1' -> ('encoder', 'down_blocks_0', 'resnets_1', 'conv1')."
    out: list[str] = []
    for part in key.split('.'):
        if part.isdigit() and out: out[-1] = f'{out[-1]}_{part}'
        else: out.append(part)
    return tuple(out)


def torch_to_flax(state: dict[str, np.ndarray]) -> dict[str, Any]:
    "A diffusers `AutoencoderKL` state dict (legacy or current attention names) -> nested Flax params."
    tree: dict[str, Any] = {}
    for key, w in state.items():
        *mod, leaf = key.split('.')
        if 'attentions' in key and mod[-1] in _LEGACY_ATTN: mod[-1:] = _LEGACY_ATTN[mod[-1]].split('.')
        w = np.asarray(w, dtype=np.float32)
        if 'attentions' in key and w.ndim == 4: w = w[:, :, 0, 0]           # 1x1-conv attention projections
        if leaf == 'weight':
            leaf, w = ('scale', w) if w.ndim == 1 else ('kernel', w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0))
        node = tree
        for p in _flax_path('.'.join(mod)): node = node.setdefault(p, {})
        node[leaf] = w
    return tree


# %%
test_eq(_flax_path('decoder.mid_block.attentions.0.to_out.0'), ('decoder', 'mid_block', 'attentions_0', 'to_out_0'))
t = torch_to_flax({'encoder.conv_in.weight': np.zeros((8, 3, 3, 3)), 'encoder.conv_norm_out.weight': np.ones(16),
                   'encoder.mid_block.attentions.0.proj_attn.weight': np.eye(16)[:, :, None, None]})
test_eq(t['encoder']['conv_in']['kernel'].shape, (3, 3, 3, 8))
test_eq(t['encoder']['conv_norm_out']['scale'].shape, (16,))
test_eq(t['encoder']['mid_block']['attentions_0']['to_out_0']['kernel'], np.eye(16, dtype=np.float32))


# %% [markdown]
# The converted tree must match what the Flax module expects, leaf for leaf and shape for shape — a
# checkpoint with other channels or missing pieces fails with the first differences listed.

# %%
#| export
def _leaves(tree, prefix=()) -> dict[tuple, Any]:
    if not isinstance(tree, dict): return {prefix: tree}
    return {k: v for n, sub in tree.items() for k, v in _leaves(sub, prefix + (n,)).items()}


def check_params(params: dict, config: VAEConfig, source: str = 'checkpoint'):
    "Raise `ValueError` listing missing, unexpected and mis-shaped weights for `config`."
    f = config.downsample_factor
    want = _leaves(jax.eval_shape(lambda: AutoencoderKL(config).init(
        jax.random.key(0), jnp.zeros((1, f, f, config.in_channels))))['params'])
    got = _leaves(params)
    missing = sorted('/'.join(k) for k in want.keys() - got.keys())
    extra = sorted('/'.join(k) for k in got.keys() - want.keys())
    shape = sorted(f"{'/'.join(k)}: expected {tuple(want[k].shape)}, found {tuple(np.shape(got[k]))}"
                   for k in want.keys() & got.keys() if tuple(want[k].shape) != tuple(np.shape(got[k])))
    if missing or extra or shape:
        parts = [f"{n} {len(v)}: {v[:4]}" for n, v in (('missing', missing), ('unexpected', extra), ('wrong shape', shape)) if v]
        raise ValueError(f"{source} does not match the AutoencoderKL its config describes ({'; '.join(parts)})")


# %%
check_params(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params), tiny)
test_fail(lambda: check_params(params, VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                                 latent_channels=8)), contains='wrong shape')

# %% [markdown]
# ## Finding the checkpoint
#
# `repo_id_or_dir` is a local directory holding `config.json` and `diffusion_pytorch_model.safetensors`
# (what diffusers' `save_pretrained` writes), or a Hugging Face hub id, resolved by
# `fsdit.hub.resolve_checkpoint` (the encoder's rule too): from the local cache when the files are there,
# downloaded otherwise — unless the hub cannot be reached, in which case the error says so at once and
# says how to pass a directory. Only the two files are fetched (the hub repos also hold a `.bin` and a
# `.ckpt` copy).
#
#
# The config is parsed with diffusers' `AutoencoderKL.load_config` when diffusers is installed (the
# reference reader), else as plain JSON; the weights with `safetensors.numpy`.

# %%
#| export
FILES = ('config.json', 'diffusion_pytorch_model.safetensors')


def load_checkpoint(d: Path) -> tuple[VAEConfig, dict[str, Any]]:
    "(config, Flax params as numpy float32) from a diffusers AutoencoderKL directory."
    try:
        from diffusers import AutoencoderKL as _TorchAutoencoderKL
        raw = dict(_TorchAutoencoderKL.load_config(str(d)))
    except ImportError:
        raw = json.loads((d / FILES[0]).read_text())
    config = vae_config_from_dict(raw, source=str(d / FILES[0]))
    wfile = d / FILES[1]
    if not wfile.is_file():
        raise FileNotFoundError(f"{d} has no {FILES[1]} (only safetensors weights are read; convert a .bin with "
                                f"diffusers: AutoencoderKL.from_pretrained(d).save_pretrained(d))")
    from safetensors.numpy import load_file
    params = torch_to_flax(load_file(str(wfile)))
    check_params(params, config, source=str(wfile))
    return config, params


# %% [markdown]
# A folder with only a `.bin` copy of the weights is refused with the conversion to run:

# %%
_ck = Path(tempfile.mkdtemp())
(_ck / 'config.json').write_text(json.dumps({'_class_name': 'AutoencoderKL', 'block_out_channels': [8], 'norm_num_groups': 4}))
(_ck / 'diffusion_pytorch_model.bin').write_bytes(b'')
test_fail(lambda: load_checkpoint(_ck), contains='only safetensors weights are read')
test_eq(resolve_checkpoint(_ck, FILES), _ck)

# %% [markdown]
# ## `SDVAE`: the interface the package uses
#
# Three jit-compiled functions over fixed parameters:
#
# - `moments(images)` — images (B, H, W, 3) in [-1, 1], H and W multiples of the downsampling factor
#   (8 for SD-VAE) -> (mean, logvar), each (B, H/8, W/8, 4), float32;
# - `sample(key, mean, logvar)` — a posterior sample `mean + exp(logvar / 2) * eps`;
# - `decode(latents)` — latents on the VAE's own scale -> images (B, 8h, 8w, 3), clipped to [-1, 1].
#
# **Where `scaling_factor` applies.** `moments`, `sample` and `decode` all work on the VAE's own
# (unscaled) latents. The DiT models `latents * scaling_factor` (0.18215 for SD-VAE: unit variance);
# generated DiT outputs are divided by it before `decode`. (`shift_factor`, `None` for SD-VAE, is kept
# on the config for VAEs that have one; this package does not apply it.)
#
# Images are checked before they reach the compiled code: rank, channels, a float dtype, sizes that the
# encoder maps to a whole latent grid, values in [-1, 1] (a uint8 or [0, 255] image would otherwise
# encode silently to a wrong latent). The reference encoder accepts other sizes (the asymmetric padding
# rounds up), but its decoder then does not return the input size; we refuse them instead.

# %%
#| export
DTYPE_NAMES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@functools.lru_cache(maxsize=None)
def _compiled(config: VAEConfig, dtype: str) -> tuple[Callable, Callable]:
    "jit-compiled (moments, decode) for one architecture, shared by every `SDVAE` with that config."
    m = AutoencoderKL(config, DTYPE_NAMES[dtype])
    return (jax.jit(lambda p, x: m.apply({'params': p}, x, method='moments')),
            jax.jit(lambda p, z: m.apply({'params': p}, z, method='decode')))


@jax.jit
def _posterior_sample(key, mean, logvar): return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def _check_array(x, what: str, channels: int, factor: int = 1, value_range: bool = False):
    shape = tuple(np.shape(x))
    if len(shape) != 4:
        raise ValueError(f"{what} must be (B, H, W, {channels}) NHWC, got shape {shape}")
    if shape[-1] != channels:
        hint = ' (it looks NCHW: transpose to NHWC)' if shape[1] == channels else ''
        raise ValueError(f"{what} must have {channels} channels last, got shape {shape}{hint}")
    dt = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{what} must be floating point in [-1, 1], got {dt} (uint8 images: x / 127.5 - 1)")
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(f"{what} height and width must be multiples of {factor}, got {shape[1]}x{shape[2]} "
                         f"(resize or crop, e.g. to 224x224)")
    if value_range and not isinstance(x, jax.core.Tracer):
        lo, hi = float(jnp.min(x)), float(jnp.max(x))
        if lo < -1.001 or hi > 1.001 or not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{what} must be in [-1, 1], found values in [{lo:.4g}, {hi:.4g}] "
                             f"(from [0, 1]: 2x - 1; from [0, 255]: x / 127.5 - 1)")


# %%
_check_array(np.zeros((1, 16, 16, 3), np.float32), 'images', 3, 8, value_range=True)
test_fail(lambda: _check_array(np.zeros((1, 3, 16, 16), np.float32), 'images', 3), contains='NCHW')
test_fail(lambda: _check_array(np.zeros((1, 12, 16, 3), np.float32), 'images', 3, 8), contains='multiples of 8')
test_close(_posterior_sample(jax.random.key(0), jnp.ones((2, 3)), jnp.full((2, 3), -30.0)), jnp.ones((2, 3)), eps=1e-5)


# %% [markdown]
# `SDVAE` holds the parameters and the compiled functions:

# %%
#| export
class SDVAE:
    "A frozen SD-VAE: `moments`, `sample` and `decode`, jit-compiled over fixed parameters."

    def __init__(self, config: VAEConfig, params: dict, dtype: str = 'float32', name: str = ''):
        if dtype not in DTYPE_NAMES: raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        self.config, self.dtype, self.name = config, dtype, name
        self.params = jax.tree.map(jnp.asarray, params)                     # float32; compute in `dtype`
        self.module = AutoencoderKL(config, DTYPE_NAMES[dtype])
        self._moments, self._decode = _compiled(config, dtype)

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | os.PathLike = DEFAULT_VAE, dtype: str = 'float32',
                        latent_channels: int | None = 4, subfolder: str | None = None) -> "SDVAE":
        "Load a diffusers AutoencoderKL from a local directory or a hub id; `latent_channels=None` accepts any."
        d = resolve_checkpoint(repo_id_or_dir, FILES, 'a diffusers AutoencoderKL', 'SDVAE.from_pretrained', subfolder)
        config, params = load_checkpoint(d)
        if latent_channels is not None and config.latent_channels != latent_channels:
            raise ValueError(f"{repo_id_or_dir}: expected a VAE with {latent_channels} latent channels, found "
                             f"{config.latent_channels} (pass latent_channels=None to accept it)")
        return cls(config, params, dtype, name=str(repo_id_or_dir))

    @classmethod
    def random(cls, config: VAEConfig, seed: int = 0, dtype: str = 'float32') -> "SDVAE":
        "Random weights (LeCun-normal kernels, numpy) — for tests and shapes, never a stand-in for a checkpoint."
        # numpy rather than `module.init`: XLA takes minutes on a CPU to compile the init of the full SD-VAE
        f, rng = config.downsample_factor, np.random.default_rng(seed)
        shapes = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), jnp.zeros((1, f, f, config.in_channels)))
        def draw(path, a):
            kind = path[-1].key
            if kind == 'scale': return np.ones(a.shape, np.float32)
            if kind == 'bias': return np.zeros(a.shape, np.float32)
            return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
        return cls(config, jax.tree_util.tree_map_with_path(draw, shapes['params']), dtype, name='random')

    @property
    def scaling_factor(self) -> float: return float(self.config.scaling_factor)

    @property
    def num_params(self) -> int: return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def moments(self, images) -> tuple[jax.Array, jax.Array]:
        "Images (B, H, W, C) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, latent_channels)."
        c = self.config
        _check_array(images, 'images', c.in_channels, c.downsample_factor, value_range=True)
        return self._moments(self.params, jnp.asarray(images))

    def sample(self, key: jax.Array, mean, logvar) -> jax.Array:
        "A posterior sample `mean + exp(logvar / 2) * eps` (unscaled latents)."
        if np.shape(mean) != np.shape(logvar):
            raise ValueError(f"mean and logvar shapes differ: {np.shape(mean)} vs {np.shape(logvar)}")
        return _posterior_sample(key, jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))


# %% [markdown]
# Decoding, and how a VAE shows itself:

# %%
#| export
@patch_to(SDVAE)
def decode(self, latents, clip: bool = True) -> jax.Array:
    "Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), clipped to [-1, 1]."
    _check_array(latents, 'latents', self.config.latent_channels)
    x = self._decode(self.params, jnp.asarray(latents))
    return jnp.clip(x, -1.0, 1.0) if clip else x


@patch_to(SDVAE)
def __repr__(self):
    c = self.config
    return (f"SDVAE({self.name!r}, blocks={c.block_out_channels}, latent_channels={c.latent_channels}, "
            f"f={c.downsample_factor}, scaling_factor={self.scaling_factor}, dtype={self.dtype!r})")


# %% [markdown]
# ## Saving a VAE as diffusers does
#
# A VAE trained here (the glyph demo trains a small one on its renderings, as SD-VAE was trained on
# photographs) is written as the folder diffusers' `save_pretrained` writes: `config.json` and
# `diffusion_pytorch_model.safetensors` under diffusers' own weight names — so `fsdit precompute --vae
# FOLDER`, `SDVAE.from_pretrained` and diffusers' `AutoencoderKL.from_pretrained` all read it. The folder
# appears whole or not at all (`fsdit.files.building`).

# %%
#| export
def flax_to_torch(params: dict) -> dict[str, np.ndarray]:
    "Nested Flax params -> a diffusers `AutoencoderKL` state dict (the inverse of `torch_to_flax`; current attention names)."
    out: dict[str, np.ndarray] = {}
    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict): walk(v, path + [re.sub(r'_(\d+)$', r'.\1', k)]); continue
            w = np.asarray(v, np.float32)
            if k == 'scale': k = 'weight'
            elif k == 'kernel': k, w = 'weight', (w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1))
            out['.'.join(path + [k])] = np.ascontiguousarray(w)
    walk(params, [])
    return out


def vae_config_dict(c: VAEConfig, sample_size: int | None = None) -> dict[str, Any]:
    "The diffusers `config.json` of `c` (`sample_size`: the image side it was trained at)."
    n = len(c.block_out_channels)
    return {'_class_name': 'AutoencoderKL', 'in_channels': c.in_channels, 'out_channels': c.out_channels,
            'down_block_types': ['DownEncoderBlock2D'] * n, 'up_block_types': ['UpDecoderBlock2D'] * n,
            'block_out_channels': list(c.block_out_channels), 'layers_per_block': c.layers_per_block, 'act_fn': c.act_fn,
            'latent_channels': c.latent_channels, 'norm_num_groups': c.norm_num_groups,
            **({'sample_size': sample_size} if sample_size else {}), 'scaling_factor': c.scaling_factor,
            'shift_factor': c.shift_factor, 'use_quant_conv': c.use_quant_conv,
            'use_post_quant_conv': c.use_post_quant_conv, 'mid_block_add_attention': c.mid_block_add_attention}


@patch_to(SDVAE)
def save_pretrained(self, folder, sample_size: int | None = None, replace: bool = False) -> Path:
    "Write the VAE as a diffusers folder (config.json + safetensors) that appears whole or not at all; returns it."
    from safetensors.numpy import save_file
    from fsdit.files import building
    with building(folder, replace=replace) as tmp:
        (tmp / FILES[0]).write_text(json.dumps(vae_config_dict(self.config, sample_size), indent=1))
        save_file(flax_to_torch(jax.device_get(self.params)), str(tmp / FILES[1]))
    return Path(folder)


# %% [markdown]
# ### Equal to diffusers
#
# A random diffusers `AutoencoderKL` (a tiny one with SD-VAE's four blocks, so the downsampling factor
# is 8), saved with `save_pretrained` and loaded through `SDVAE.from_pretrained` — the code path a hub id
# takes — gives the same moments and decoder output as the PyTorch model. `tests/test_vae_parity.py`
# covers several configs, odd latent sizes, the hub's legacy file layout and the full-size SD-VAE.
# torch and diffusers are needed for this check only.

# %%
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

torch.manual_seed(0)
ref = TorchAutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=('DownEncoderBlock2D',) * 4,
                         up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=1, norm_num_groups=4).eval()
with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    vae = SDVAE.from_pretrained(d)
test_eq(vae.scaling_factor, 0.18215)
x = np.random.default_rng(0).uniform(-1, 1, (2, 48, 32, 3)).astype(np.float32)
with torch.no_grad():
    post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    mean_ref, logvar_ref, dec_ref = nhwc(post.mean), nhwc(post.logvar), nhwc(ref.decode(post.mean).sample)
mean, logvar = vae.moments(x)
rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
test_eq(mean.shape, (2, 6, 4, 4)); test_eq(mean.dtype, jnp.float32)
assert rel(mean, mean_ref) < 1e-4 and rel(logvar, logvar_ref) < 1e-4
out = vae.decode(mean, clip=False)
test_eq(out.shape, x.shape)
assert rel(out, dec_ref) < 1e-4

# %% [markdown]
# And back: the Flax weights written by `save_pretrained` load into diffusers' `AutoencoderKL` and give the
# same outputs as the model they came from; a second save onto the folder is refused unless asked for.

# %%
with tempfile.TemporaryDirectory() as d:
    vae.save_pretrained(Path(d) / 'vae', sample_size=48)
    back = TorchAutoencoderKL.from_pretrained(Path(d) / 'vae').eval()
    test_eq(back.config.block_out_channels, (8, 8, 16, 16)); test_eq(back.config.sample_size, 48)
    with torch.no_grad(): post2 = back.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    assert rel(nhwc(post2.mean), mean_ref) < 1e-5
    test_fail(lambda: vae.save_pretrained(Path(d) / 'vae'), contains='exists')

# %% [markdown]
# At 224 px the latent grid is 28x28 (shapes traced, nothing compiled); a posterior sample with
# log-variance -30 is the mean (how pixel mode stores an image as its own "posterior"); decoded images
# are clipped to [-1, 1].

# %%
test_eq(jax.eval_shape(vae._moments, vae.params, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))[0].shape, (1, 28, 28, 4))
z = vae.sample(jax.random.key(2), mean, logvar)
test_eq(z.shape, mean.shape); assert not np.allclose(z, mean)
test_close(vae.sample(jax.random.key(2), mean, jnp.full_like(logvar, -30.0)), mean, eps=1e-5)
assert float(jnp.abs(vae.decode(z)).max()) <= 1.0

# %% [markdown]
# Wrong inputs fail before any compilation, saying what was expected:

# %%
test_fail(lambda: vae.moments(x * 255), contains='[-1, 1]')
test_fail(lambda: vae.moments(np.zeros((2, 48, 32, 3), np.uint8)), contains='floating point')
test_fail(lambda: vae.moments(x.transpose(0, 3, 1, 2)), contains='NCHW')
test_fail(lambda: vae.moments(x[0]), contains='NHWC')
test_fail(lambda: vae.moments(x[:, :44]), contains='multiples of 8')
test_fail(lambda: vae.decode(jnp.zeros((1, 28, 28, 3))), contains='4 channels')

# %% [markdown]
# ## bfloat16
#
# `dtype='bfloat16'` runs convolutions and matmuls in bfloat16 (parameters stay float32, GroupNorm
# statistics and the attention softmax are float32, outputs are float32); it is meant for TPUs and GPUs.
# Measured error against float32 (max abs difference / max abs float32 value of the posterior mean):
# about 1.4e-2 on the tiny model below, and 1.8e-2 for the full-size SD-VAE architecture (random weights,
# 224 px, `bench/bench_vae.py`) — the size of bfloat16's 8-bit mantissa, and larger than the posterior
# noise of a trained SD-VAE can be, so float32 (the default) is the choice for precomputing the feature
# store. On a 2-core CPU bfloat16 was no faster than float32 (0.076 vs 0.074 images/s, shared machine).

# %%
bvae = SDVAE(vae.config, vae.params, dtype='bfloat16')
mb, lb = bvae.moments(x)
test_eq(mb.dtype, jnp.float32)
err = rel(mb, np.asarray(mean))
assert 1e-4 < err < 5e-2, err
