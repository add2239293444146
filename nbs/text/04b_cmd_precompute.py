# %% [markdown]
# # fsdit precompute
#
# > The `fsdit precompute` command: every image of a prepared split once through the frozen encoders into a feature store.
#
# `fsdit precompute --data SPLIT --out FEATS` loads SigLIP2 and the SD-VAE (hub ids or local folders) and runs
# `fsdit.features.precompute`; `--stand-in` uses the offline stand-ins of `fsdit.codecs` instead (pixel space,
# `PixelEncoder` — not SigLIP2). The notebook of `fsdit.codecs` runs it on a small split, with a glyph encoder too.

# %%
#| default_exp commands.precompute

# %%
#| export
from __future__ import annotations
import types

from fsdit.cli import Parser, positive_int, check_out_dir, fail
from fsdit.codecs import DEFAULT_ENCODER, PixelEncoder, PixelSpace, load_encoder
from fsdit.encoder import SigLIPEncoder
from fsdit.features import precompute, store_index
from fsdit.vae import DEFAULT_VAE, SDVAE

# %%
import contextlib, io, tempfile
from pathlib import Path
from fastcore.test import test_eq


# %% [markdown]
# A codec loaded from the hub is recorded in the store under the name it was loaded by:

# %%
#| export
def _named(obj, name: str, method: str):
    "`obj` if it carries a `name`, else a view of it with `name`, `method` and its `scaling_factor` if any."
    if getattr(obj, 'name', None): return obj
    extra = {'scaling_factor': obj.scaling_factor} if hasattr(obj, 'scaling_factor') else {}
    return types.SimpleNamespace(name=name, **{method: getattr(obj, method)}, **extra)


def precompute_cli(argv: list[str]) -> int:
    "`fsdit precompute`: every image of a prepared split once through the frozen encoders."
    p = Parser(prog='fsdit precompute', description=precompute.__doc__)
    p.add_argument('--data', required=True, help='prepared split (output of `fsdit prepare`)')
    p.add_argument('--out', required=True, help='feature store folder to write')
    p.add_argument('--encoder', default=None, help=f'SigLIP(2) hub id or local folder, or a stand-in encoder folder '
                   f'(fsdit.glyph.encoder) (default {DEFAULT_ENCODER}); with --stand-in: a stand-in encoder folder '
                   '(default: the random pixel projection)')
    p.add_argument('--vae', default=DEFAULT_VAE, help='SD-VAE (any diffusers AutoencoderKL) hub id or local folder')
    p.add_argument('--image-size', type=positive_int, default=None, help='224 (latent) or 32 (--stand-in)')
    p.add_argument('--chunk-size', type=positive_int, default=1024); p.add_argument('--batch-size', type=positive_int, default=64)
    p.add_argument('--stand-in', action='store_true', help='offline stand-ins: pixel space + PixelEncoder (NOT SigLIP2)')
    p.add_argument('--embed-dim', type=positive_int, default=64, help='stand-in embedding width')
    p.add_argument('--channels', type=int, default=3, help='stand-in pixel channels (3 or 1)')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='encoder compute dtype')
    a = p.parse_args(argv)
    try:
        check_out_dir(a.out)
        store_index(a.data)                                  # a split to read, before any encoder loads
        if a.stand_in:
            size = a.image_size or 32
            enc = load_encoder(a.encoder) if a.encoder else PixelEncoder(dim=a.embed_dim)
            vae, space = PixelSpace(size=size, channels=a.channels), 'pixel'
        else:
            size, space, name = a.image_size or 224, 'latent', a.encoder or DEFAULT_ENCODER
            # a stand-in encoder folder (fsdit.glyph.encoder) is taken as a SigLIP2 folder is, beside any diffusers VAE
            from fsdit.glyph.encoder import is_glyph_encoder
            enc = load_encoder(name) if is_glyph_encoder(name) else _named(SigLIPEncoder.from_pretrained(name, dtype=a.dtype), name, 'embed')
            vae = _named(SDVAE.from_pretrained(a.vae, dtype=a.dtype), a.vae, 'moments')
        st = precompute(a.data, a.out, enc, vae, size, space, a.chunk_size, a.batch_size)
    except (ValueError, OSError) as e:
        return fail('precompute', e)
    print(f"{a.out}: {len(st.embeds)} images, embeds {st.embeds.shape[1:]}, moments {st.moments.shape[1:]}, {st.meta['splits']}")
    return 0


# %% [markdown]
# The options, and an output path under a file refused in one line before any encoder loads:

# %%
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit): precompute_cli(['--help'])
assert '--stand-in' in out.getvalue() and '--embed-dim' in out.getvalue()
test_eq(_named(types.SimpleNamespace(name='x', embed=len), 'y', 'embed').name, 'x')
test_eq(_named(types.SimpleNamespace(moments=len, scaling_factor=0.5), 'v', 'moments').scaling_factor, 0.5)
_d = Path(tempfile.mkdtemp()); (_d / 'f').write_text('x')
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(precompute_cli(['--data', str(_d), '--out', str(_d / 'f' / 'feats'), '--stand-in']), 1)
test_eq(len(err.getvalue().splitlines()), 1); assert 'lies under the file' in err.getvalue()
