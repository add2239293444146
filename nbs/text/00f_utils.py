# %% [markdown]
# # Utilities
#
# > Small helpers that every layer shares and that depend on nothing else in the package: L2 normalisation, the data-parallel device mesh, the latent scaling, `patch_to` for writing a class over several cells, and `CLIError`, the refusal a command reports in one line.

# %%
#| default_exp utils

# %%
#| export
from __future__ import annotations
import builtins, sys
from dataclasses import dataclass
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh

# %%
from fastcore.test import test_eq, test_close


# %% [markdown]
# ## L2 normalisation
#
# Written once, for numpy arrays (on the host) and JAX arrays (inside compiled code) alike: what goes in
# comes out, and it traces under `jit`. `eps` keeps a zero vector at zero. The store's embeddings
# (`fsdit.data.encode_images`), the encoders, the model's support conditioning and the metrics all use it.

# %%
#| export
def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    "`x / max(||x||, eps)` along `axis`: numpy in, numpy out; JAX in (traced too), JAX out."
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), eps)


# %%
_v = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
test_eq(l2_normalize(_v), np.array([[0.6, 0.8], [0, 0]], np.float32)); assert isinstance(l2_normalize(_v), np.ndarray)
_j = jax.jit(l2_normalize)(jnp.asarray(_v))
assert isinstance(_j, jax.Array); test_close(np.asarray(_j), l2_normalize(_v))
test_close(np.linalg.norm(l2_normalize(_v, axis=0), axis=0), [1.0, 1.0])

# %% [markdown]
# ## The data-parallel mesh
#
# Whatever splits a batch over devices splits it along one mesh axis, `DATA_AXIS`, of the mesh `data_mesh`
# builds: over this process's devices by default (the encoders of `fsdit.features` through
# `fsdit.data.device_sharding`, the sampler), over every process's devices when the trainer gives them
# (`fsdit.steps.Layout`).

# %%
#| export
DATA_AXIS = 'data'  # the one mesh axis: a batch is split along it


def data_mesh(devices=None) -> Mesh:
    "A one-axis mesh (`DATA_AXIS`) over `devices` (default: this process's local devices)."
    return Mesh(np.array(jax.local_devices() if devices is None else devices), (DATA_AXIS,))


# %%
from jax.sharding import NamedSharding, PartitionSpec as P
_m = data_mesh()
test_eq(_m.axis_names, (DATA_AXIS,)); test_eq(list(_m.devices), jax.local_devices())
test_eq(data_mesh(jax.devices()[:1]).devices.shape, (1,))
_n = jax.local_device_count()
_a = jax.device_put(np.arange(4 * _n).reshape(_n, 4), NamedSharding(_m, P(DATA_AXIS)))
test_eq([s.data.shape for s in _a.addressable_shards], [(1, 4)] * _n)


# %% [markdown]
# ## The latent scaling
#
# The model works on latents scaled to about unit variance: the VAE posterior's latents times the VAE's
# `scaling_factor` (1 in pixel space). The factor belongs to the VAE that made the store, so the store and the
# run that trained on it hand out a `LatentScaling` (`Store.scaling`, `Run.scaling`), and the flow, the
# conditionings, the trainer and the sampler apply it through this one object: `to_model` on the posterior's
# latents going in (inside compiled code too), `to_posterior` on the model's samples coming out.

# %%
#| export
@dataclass(frozen=True)
class LatentScaling:
    "The factor between posterior latents (the store's, the VAE's) and the model's: the VAE's scaling factor, 1 in pixel space."
    scale: float = 1.0

    def to_model(self, z):
        "Posterior latents -> the model's latents (numpy or JAX, traced too)."
        return z * self.scale

    def to_posterior(self, x) -> np.ndarray:
        "The model's latents -> posterior latents, on the host."
        return np.asarray(x) / self.scale


# %%
_s, _z = LatentScaling(0.18215), np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
test_close(_s.to_posterior(_s.to_model(_z)), _z); test_eq(_s.to_model(_z).dtype, np.float32)
test_eq(np.asarray(jax.jit(_s.to_model)(jnp.asarray(_z))), _s.to_model(_z))   # the same factor inside compiled code
test_eq(LatentScaling().to_model(_z), _z); test_eq(hash(_s), hash(LatentScaling(0.18215)))


# %% [markdown]
# ## A class over several cells
#
# A notebook explains a class one method at a time: the class cell holds its fields and the methods that
# belong together, and later cells add the rest with `patch_to` (fastcore's decorator of that name, written
# again here because fastcore is not a dependency of the package at run time). `as_prop=True` adds a property.
# The decorated name is bound to the function, except where that would hide a name the module (or Python's
# builtins) already has: a method named `compile` leaves the builtin `compile` as it was.

# %%
#| export
def patch_to(cls, as_prop: bool = False):
    "Decorator: add the function to `cls` as a method (a property with `as_prop`); returns it, or the name it would hide."
    glb = sys._getframe(1).f_globals
    def add(f):
        f.__qualname__ = f"{cls.__name__}.{f.__name__}"
        setattr(cls, f.__name__, property(f) if as_prop else f)
        return glb.get(f.__name__, getattr(builtins, f.__name__, f))
    return add


# %%
class _A:
    def __init__(self): self.x = 2
@patch_to(_A)
def double(self): return 2 * self.x
@patch_to(_A, as_prop=True)
def half(self): return self.x / 2
@patch_to(_A)
def compile(self): return 'method'
test_eq((_A().double(), _A().half, _A().compile()), (4, 1.0, 'method'))
test_eq((_A.double.__qualname__, _A.half.fget.__qualname__), ('_A.double', '_A.half'))
assert double is _A.double and compile is builtins.compile          # a new name is the function; a builtin is kept


# %% [markdown]
# ## A refusal
#
# `CLIError` is what a function raises when its input is refused with a message that says what was wrong and
# what to do. The commands (`fsdit.cli` and `fsdit.commands`) catch it and print that message as one line;
# library code that refuses a setting given on the command line (a TPU topology, say) raises it too, so it lives
# here rather than in the command layer. `fsdit.cli` still offers it under its old name.

# %%
#| export
class CLIError(ValueError):
    "A command refused its input; the message says what was wrong and what to do."


# %%
try: raise CLIError('--x 3: give 1 or 2')
except ValueError as e: test_eq(str(e), '--x 3: give 1 or 2')     # a ValueError: callers catching those catch it too
