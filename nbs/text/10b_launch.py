# %% [markdown]
# # Launch
#
# > What a training run loads only when it is first used: the store's support encoder, and the VAE that decodes sample grids.
#
# `fsdit train` (`fsdit.commands.train`) hands these to the trainer: a run that never draws a grid never loads
# the VAE, and a store whose encoder cannot be rebuilt leaves the few-shot metrics off.

# %%
#| default_exp launch

# %%
#| export
from __future__ import annotations
from typing import Any, Callable

from fsdit.codecs import load_encoder
from fsdit.vae import SDVAE

# %%
import numpy as np
from fastcore.test import test_eq, test_fail
from fsdit.codecs import PixelEncoder


# %% [markdown]
# What the store names is loaded only when first used:

# %%
#| export
def lazy(load: Callable[[], Any]) -> Callable[[], Any]:
    "A function returning `load()`, which runs at its first call only (nothing loads if it is never called)."
    got = []
    def get():
        if not got: got.append(load())
        return got[0]
    return get


def lazy_call(load: Callable[[], Any], method: str) -> Callable:
    "A callable running `load().<method>(...)`, loading at the first call only."
    get = lazy(load)
    return lambda *args, **kwargs: getattr(get(), method)(*args, **kwargs)


def lazy_vae_decode(name: str) -> Callable:
    "A decode callable that loads the SD-VAE `name` at its first call (only when a sample grid is drawn)."
    return lazy_call(lambda: SDVAE.from_pretrained(name), 'decode')


def store_embed(meta: dict) -> Callable | None:
    "The store's support encoder as images -> embeddings, loaded at its first call; None for an unknown stand-in."
    from fsdit.glyph.encoder import is_glyph_encoder                   # the glyph demo's encoder folders
    name = meta.get('encoder')
    known = str(name).startswith('stand-in/') or is_glyph_encoder(name) if name else False
    if not name or (meta.get('space') == 'pixel' and not known): return None
    return lazy_call(lambda: load_encoder(name), 'embed')


# %%
calls = []
get = lazy(lambda: calls.append(1) or {'x': 1})
test_eq(calls, []); test_eq(get(), {'x': 1}); test_eq(get(), {'x': 1}); test_eq(calls, [1])   # loaded once, when first used
test_eq(lazy_call(lambda: 'a-b', 'split')('-'), ['a', 'b'])

# %% [markdown]
# The store names its encoder: a stand-in is rebuilt from its name, SigLIP2 loads at the first use, and a name
# that is neither (a hand-made store) leaves the few-shot metrics off.

# %%
e = store_embed({'encoder': PixelEncoder(dim=32, grid=4).name, 'space': 'pixel'})
test_eq(e(np.zeros((3, 16, 16, 3), np.uint8)).shape, (3, 32))
test_eq(store_embed({'encoder': 'hand-made', 'space': 'pixel'}), None)
assert callable(store_embed({'encoder': 'google/siglip2-base-patch16-224', 'space': 'latent'}))   # nothing loaded yet
