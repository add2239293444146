# %% [markdown]
# # Sample
#
# > Load a trained run (configs and EMA weights), encode a few support images with the run's encoders, and generate new images of their class with the compiled sampler — spread over every local device — as arrays or as a grid with the supports on top.

# %%
#| default_exp sample

# %%
#| export
from __future__ import annotations
import argparse, functools, json, sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fsdit.codecs import Codecs, run_codecs
from fsdit.config import ModelConfig, TrainConfig
from fsdit.dit import DiT, SUPPORT_LATENT_CONDS
from fsdit.sampler import sample
from fsdit.train import (condition, read_run_config, run_json, checkpoint_manager, restore_latest, create_state,
                         image_grid, save_png, to_uint8 as grid_uint8)

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail
from fsdit.config import model_config, train_config


# %% [markdown]
# ## Loading a run
#
# A run directory (written by `fsdit train`) holds `config.json` (model and train configs, the space) and
# orbax checkpoints under `checkpoints/`. Sampling uses the EMA parameters of the latest checkpoint,
# restored through the trainer's own `restore_latest`, so there is one reader of the format: a damaged newest
# checkpoint gives way to the one before it, with a message, and a run whose checkpoints are all damaged is refused.

# %%
#| export
class RunError(ValueError):
    "A run directory that cannot be sampled from: missing configs or checkpoint."


@dataclass
class Run:
    "A trained run: its configs, the space ('latent' | 'pixel'), EMA parameters and step."
    path: Path
    mc: ModelConfig
    tc: TrainConfig
    space: str
    params: Any
    step: int
    config: dict = field(default_factory=dict)   # config.json as saved (may name the feature store)

    @property
    def latent_scale(self) -> float:
        "Scale between posterior-space latents and the model's space (1 in pixel mode)."
        return 1.0 if self.space == 'pixel' else self.tc.latent_scale


def load_run(run_dir, ema: bool = True, warn: Callable[[str], None] | None = None) -> Run:
    "Configs and the newest readable checkpoint's (EMA) parameters of the run at `run_dir`; damaged newer ones are `warn`ed."
    d = Path(run_dir)
    if not (d / 'config.json').exists():
        raise RunError(f"{d} is not a run directory (no config.json): pass the --out folder of `fsdit train`")
    mc, tc = read_run_config(d)
    cfg = run_json(d)
    if not (d / 'checkpoints').is_dir() or not any((d / 'checkpoints').iterdir()):
        raise RunError(f"{d} has no checkpoint yet (no {d / 'checkpoints'}): train it for at least `save_every` steps")
    # the template only gives shapes: zeros of the state's abstract shapes, no initialisation is run
    template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(lambda: create_state(mc, tc)))
    mngr = checkpoint_manager(d, keep=max(tc.keep, 1))
    try:
        got = restore_latest(mngr, template)
    finally:
        mngr.close()
    if got is None: raise RunError(f"{d / 'checkpoints'} holds no complete checkpoint: train the run for at least `save_every` steps")
    state, _, damaged = got
    for step, why in sorted(damaged.items(), reverse=True):
        if warn: warn(f"checkpoint {step} of {d} is damaged ({why}); using step {int(state.step)}")
    params = state.ema_params if ema else state.params
    return Run(d, mc, tc, cfg.get('space', 'latent'), params, int(state.step), cfg)


# %% [markdown]
# A run saved the way the trainer saves it — here a freshly initialised pixel-space `mu` model on 8x8
# images with the stand-in encoder's shape — loads back with its EMA parameters; directories that are not
# runs, or have no checkpoint yet, are refused with the reason.

# %%
from fsdit.train import write_run_config, save_checkpoint, replicate
from fsdit.codecs import offline_model_config

def save_fresh_run(d, mc, tc, space='pixel'):
    "A run directory holding a freshly initialised model, written as `fsdit train` writes one."
    write_run_config(d, mc, tc, space)
    mngr = checkpoint_manager(d, keep=1); save_checkpoint(mngr, replicate(create_state(mc, tc)), {}); mngr.close()
    return Path(d)

tmp = Path(tempfile.mkdtemp())
mc = offline_model_config('mu', size=8, channels=3, embed_dim=16)
tc = train_config('test', shots=3)
run_dir = save_fresh_run(tmp / 'run', mc, tc)
run = load_run(run_dir)
test_eq((run.mc, run.tc, run.space, run.latent_scale), (mc, tc, 'pixel', 1.0))
test_eq(jax.tree.structure(run.params), jax.tree.structure(create_state(mc, tc).ema_params))
test_fail(lambda: load_run(tmp / 'nothing'), contains='not a run directory')
write_run_config(tmp / 'empty', mc, tc, 'pixel')
test_fail(lambda: load_run(tmp / 'empty'), contains='no checkpoint')


# %% [markdown]
# ## Generating
#
# `generate` draws one image per episode: the condition is built exactly as in training
# (`fsdit.train.condition`: the mean of the K support embeddings; for `cond='context'` also the scaled
# support latents), the noise of episode *i* comes from `fold_in(key, i)` — so an image does not depend on
# the batch it was drawn in — and each batch is split over the local devices (padded to a multiple of
# them) and run through the compiled sampler. Latents come back in posterior space (unscaled).
#
# **How many supports.** Both support conditionings are defined for any K >= 1: `'support'` averages the K
# embeddings, `'context'` attends to any number of support tokens with no order. So a model trained on
# 5-shot episodes accepts 1 or 3 supports (the eval sweeps exactly that); quality at a K it was not trained
# on is what the eval measures. Zero supports, or supports given to a class-conditioned run, are errors.

# %%
#| export
def check_supports(mc: ModelConfig, k: int | None):
    "Raise `ValueError` unless the run's conditioning takes `k` supports."
    if mc.cond == 'class':
        if k: raise ValueError("this run is class-conditioned (cond='class'): it generates seen classes by label "
                               "and cannot take support images")
        return
    if not k or k < 1: raise ValueError(f"cond={mc.cond!r} needs at least one support image, got {k}")


def _mesh() -> Mesh: return Mesh(np.array(jax.local_devices()), ('data',))


@functools.lru_cache(maxsize=8)
def _dit(mc: ModelConfig) -> DiT:
    "One module per config, so that the sampler's compiled function is reused across calls."
    return DiT(mc)


def _noise(key, start: int, n: int, shape) -> jax.Array:
    "Per-example noise (n, *shape): example i from fold_in(key, start + i)."
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(jnp.arange(start, start + n))


def generate(params, mc: ModelConfig, support_embeds=None, support_latents=None, labels=None, *,
             latent_scale: float = 1.0, seed: int = 0, steps: int = 50, cfg_scale: float = 3.0,
             method: str = 'euler', batch_size: int = 256) -> np.ndarray:
    "Latents (M, h, w, c) in posterior space from M episodes: support_embeds (M, K, D), support_latents (M, K, h, w, c), labels (M,)."
    given = {'support_embeds': support_embeds, 'support_latents': support_latents, 'labels': labels}
    given = {k: np.asarray(v) for k, v in given.items() if v is not None}
    check_supports(mc, None if 'support_embeds' not in given else given['support_embeds'].shape[1])
    if mc.cond in SUPPORT_LATENT_CONDS and 'support_latents' not in given: raise ValueError(f"cond={mc.cond!r} needs support_latents")
    if mc.cond == 'class' and 'labels' not in given: raise ValueError("cond='class' needs labels")
    M, n_dev, mesh = len(next(iter(given.values()))), jax.local_device_count(), _mesh()
    bs = -(-min(batch_size, M) // n_dev) * n_dev                  # every batch one shape: one compilation
    key, shape, model = jax.random.PRNGKey(seed), (mc.input_size, mc.input_size, mc.in_channels), _dit(mc)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    out = []
    for i in range(0, M, bs):
        n = min(bs, M - i)
        b = {k: np.concatenate([v[i:i + n], np.repeat(v[i + n - 1:i + n], bs - n, 0)]) for k, v in given.items()}
        b = jax.device_put(b, NamedSharding(mesh, P('data')))
        noise = jax.device_put(_noise(key, i, bs, shape), NamedSharding(mesh, P('data')))
        x = sample(model.apply, params, noise, condition(b, mc, latent_scale), steps=steps, cfg_scale=cfg_scale, method=method)
        out.append(np.asarray(x)[:n] / latent_scale)
    return np.concatenate(out) if out else np.zeros((0, *shape), np.float32)


# %% [markdown]
# An image depends on its episode and the seed, not on how the episodes were batched; supports given to a
# class-conditioned model, or none to a support-conditioned one, are refused.

# %%
r = np.random.default_rng(0)
emb = r.normal(size=(5, 3, 16)).astype(np.float32); lat = r.normal(size=(5, 3, 8, 8, 3)).astype(np.float32)
z_all = generate(run.params, mc, emb, lat, steps=3, seed=1)
z_bat = generate(run.params, mc, emb, lat, steps=3, seed=1, batch_size=2)
test_eq(z_all.shape, (5, 8, 8, 3)); test_close(z_all, z_bat, eps=1e-5)
assert not np.allclose(z_all, generate(run.params, mc, emb, lat, steps=3, seed=2))
test_fail(lambda: check_supports(model_config('mu', cond='class', num_classes=3), 5), contains='class-conditioned')
test_fail(lambda: check_supports(mc, 0), contains='at least one support')
check_supports(mc, 1); check_supports(model_config('mu', cond='context'), 7)   # any K >= 1


# %% [markdown]
# ## Supports from files
#
# Support images are read at the store's image size by the store's resize rule (`fsdit.data.load_image`);
# every unreadable file is named in one error.

# %%
#| export
def read_supports(paths: Sequence, size: int) -> np.ndarray:
    "uint8 images (K, size, size, 3) from image files; `ValueError` naming every file that cannot be read."
    from fsdit.data import check_image, load_image
    bad = {str(p): ('no such file' if not Path(p).is_file() else check_image(p)) for p in paths}
    bad = {p: why for p, why in bad.items() if why}
    if bad: raise ValueError("cannot read support image(s): " + '; '.join(f"{p} ({why})" for p, why in bad.items()))
    return np.stack([load_image(p, size) for p in paths])


def class_dir_supports(d, k: int, seed: int = 0) -> list[Path]:
    "`k` image files drawn at random (seeded) from the folder `d`."
    from fsdit.data import list_images
    if not Path(d).is_dir(): raise ValueError(f"--class-dir {d} is not a folder")
    files = list_images(d)
    if len(files) < k: raise ValueError(f"{d} holds {len(files)} images; {k} supports were asked for: use --shots {len(files)} or less")
    return [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), k, replace=False))]


def sample_from_supports(run: Run, codecs: Codecs, images, n: int = 16, *, cfg_scale: float = 3.0, steps: int = 50,
                         seed: int = 0, method: str = 'euler', batch_size: int = 256) -> np.ndarray:
    "`n` images in [-1, 1] (n, H, W, C) of the class shown by the uint8 support images (K, H, W, 3)."
    emb, lat = codecs.encode(images)
    check_supports(run.mc, len(emb))
    tile = lambda a: np.repeat(a[None], n, 0)                      # every episode has the same K supports
    z = generate(run.params, run.mc, tile(emb), tile(lat), latent_scale=run.latent_scale, seed=seed, steps=steps,
                 cfg_scale=cfg_scale, method=method, batch_size=batch_size)
    return np.asarray(codecs.decode(z), np.float32)


def support_grid(supports, samples, ncol: int | None = None) -> np.ndarray:
    "uint8 grid: the supports (K, H, W, 3) uint8 on the top row, the samples (N, H, W, C) in [-1, 1] below."
    from PIL import Image
    s = grid_uint8(samples)                                       # (N, H, W, 3)
    H, W = s.shape[1:3]
    sup = np.stack([np.asarray(Image.fromarray(im).resize((W, H), Image.BICUBIC)) if im.shape[:2] != (H, W) else im
                    for im in np.asarray(supports, np.uint8)])
    ncol = ncol or max(len(sup), min(len(s), 8))
    white = lambda k: np.full((k, H, W, 3), 255, np.uint8)
    rows = [np.concatenate([sup[:ncol], white(max(0, ncol - len(sup)))])]
    for i in range(0, len(s), ncol): rows.append(np.concatenate([s[i:i + ncol], white(ncol - len(s[i:i + ncol]))]))
    return image_grid(rows)


# %% [markdown]
# ## Command line
#
# `fsdit sample --run RUN --support a.jpg b.jpg ... --n 16 --cfg 3.0 --steps 50 --seed 0 --out grid.png`, or
# `--class-dir DIR` (with `--shots K`, default the run's training shots) to draw the supports from a
# folder. Writes the grid, and with `--npz` the raw samples; folders that do not exist yet are made. Every input
# and output path is checked before the run loads, and nothing is written until the samples exist: a refusal
# prints one line, exits 1 and leaves no file behind. (A negative `--cfg` is guidance *away* from the
# supports, $v_u + s\,(v_c - v_u)$ with $s < 0$: well defined, so accepted.)

# %%
#| export
def sample_cli(argv: list[str]) -> int:
    "`fsdit sample`: images of a class from a few support images, as a grid with the supports on top."
    from fsdit.cli import Parser, positive_int, check_out_file, fail
    p = Parser(prog='fsdit sample', description=sample_cli.__doc__)
    p.add_argument('--run', required=True, help='run directory of `fsdit train`')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--support', nargs='+', help='support image files')
    g.add_argument('--class-dir', help='folder of images of one class to draw the supports from')
    p.add_argument('--shots', type=positive_int, default=None, help="supports drawn from --class-dir (default: the run's shots)")
    p.add_argument('--n', type=positive_int, default=16, help='images to generate')
    p.add_argument('--cfg', type=float, default=3.0, help='classifier-free guidance scale (negative: away from the supports)')
    p.add_argument('--steps', type=positive_int, default=50, help='sampler steps')
    p.add_argument('--method', default='euler', choices=('euler', 'heun'))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='grid.png', help='grid image to write')
    p.add_argument('--npz', default=None, help='also save the samples (uint8) to this .npz')
    p.add_argument('--feats', default=None, help="feature store of the run (names its encoders)")
    p.add_argument('--encoder', default=None, help='support encoder id or folder (overrides the store)')
    p.add_argument('--vae', default=None, help='VAE id or folder (overrides the store)')
    p.add_argument('--raw', action='store_true', help='live instead of EMA parameters')
    a = p.parse_args(argv)
    say = lambda msg: print(f"fsdit sample: {msg}", file=sys.stderr)
    try:
        outs = [check_out_file(a.out)] + ([check_out_file(a.npz, '--npz')] if a.npz else [])
        if a.support: read_supports(a.support, 8)             # every file readable, before the run loads
        run = load_run(a.run, ema=not a.raw, warn=say)
        if run.mc.cond == 'class': check_supports(run.mc, 1)
        files = a.support or class_dir_supports(a.class_dir, a.shots or run.tc.shots, a.seed)
        codecs = run_codecs(run, a.feats, a.encoder, a.vae)
        sup = read_supports(files, codecs.image_size)
        x = sample_from_supports(run, codecs, sup, a.n, cfg_scale=a.cfg, steps=a.steps, seed=a.seed, method=a.method)
        if len(sup) != run.tc.shots:
            say(f"note: the run was trained on {run.tc.shots}-shot episodes; sampled from {len(sup)} supports")
        for o in outs: o.parent.mkdir(parents=True, exist_ok=True)
        if a.npz: np.savez_compressed(a.npz, samples=grid_uint8(x), supports=sup)
        save_png(support_grid(sup, x), a.out)
    except (ValueError, OSError) as e:
        return fail('sample', e)
    print(f"{a.out}: {len(x)} samples from {len(sup)} supports (step {run.step}, cfg {a.cfg}, {a.steps} steps)")
    return 0


# %% [markdown]
# End to end on the saved run: three support files, a grid with them on the top row and the samples
# below; an unreadable support and a run without checkpoint each end in a one-line error.

# %%
import contextlib, io
from PIL import Image
(tmp / 'cls').mkdir()
files = [tmp / 'cls' / f's{i}.png' for i in range(3)]
for f in files: Image.fromarray(r.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(f)
(tmp / 'broken.jpg').write_bytes(b'not an image')
cli = lambda *a: sample_cli(['--run', str(run_dir), '--steps', '2', '--n', '5', '--out', str(tmp / 'grid.png'), *map(str, a)])
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(cli('--support', *files), 0)
    test_eq(cli('--class-dir', tmp / 'cls', '--shots', '2'), 0)
    test_eq(cli('--class-dir', tmp / 'cls', '--shots', '4'), 1)   # only 3 images there
    test_eq(cli('--support', files[0], tmp / 'broken.jpg', tmp / 'missing.png'), 1)
    test_eq(sample_cli(['--run', str(tmp / 'empty'), '--support', str(files[0])]), 1)
grid = np.asarray(Image.open(tmp / 'grid.png'))
test_eq(grid.shape, (2 * (8 + 2), 5 * (8 + 2), 3))             # supports row + one row of 5 samples
assert 'broken.jpg' in err.getvalue() and 'missing.png (no such file)' in err.getvalue() and 'no checkpoint' in err.getvalue()
assert 'holds 3 images' in err.getvalue()
