"""What encoder guidance costs at miniImageNet's size: FLOPs of one sampler step per image, with and without it.

    python bench/guide_cost.py [--model B/2] [--cond support] [--out bench/guide_cost.json]

The seed's configuration: a DiT on 32x32x4 SD-VAE latents (256 px images), SigLIP2 B/16 at 224 px, the SD-VAE
decoder. A plain step is one CFG call of the DiT on a doubled batch; a guided step adds the backward pass through
it, the VAE decoder (256 px), the resize to 224 and the SigLIP tower, forward and backward
(`fsdit.sampler.encoder_guided`). XLA's cost analysis of the compiled programs, with shapes only (no weights are
loaded or needed); per image, batch 1, float32 on this machine's backend.
"""
import argparse, json, sys, time
from pathlib import Path

import jax, jax.numpy as jnp

from fsdit.bench import SD_VAE_BLOCKS
from fsdit.codecs import _guide_fn
from fsdit.config import model_config
from fsdit.dit import DiT, example_cond, init_params
from fsdit.encoder import SiglipVision, VisionSpec, _embed_any_size
from fsdit.perf import compiled, cost
from fsdit.sampler import encoder_guided, guided_velocity
from fsdit.vae import AutoencoderKL, VAEConfig, _compiled


def shapes(f, *args):
    "The parameter shapes of an init, without running it."
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), jax.eval_shape(f, *args))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='B/2'); ap.add_argument('--cond', default='support')
    ap.add_argument('--out', default='bench/guide_cost.json')
    a = ap.parse_args(argv)
    mc = model_config(a.model, cond=a.cond)
    spec, vc = VisionSpec(), VAEConfig(block_out_channels=SD_VAE_BLOCKS, layers_per_block=2, scaling_factor=0.18215)
    dit_p = shapes(lambda k: init_params(mc, k), jax.random.PRNGKey(0))
    enc_p = shapes(lambda k: SiglipVision(spec).init(k, jnp.zeros((1, 224, 224, 3)))['params'], jax.random.PRNGKey(0))
    f = vc.downsample_factor
    vae_p = shapes(lambda k: AutoencoderKL(vc).init(k, jnp.zeros((1, 8 * f, 8 * f, 3)))['params'], jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((1, mc.input_size, mc.input_size, mc.in_channels), jnp.float32)
    cond = example_cond(mc, 1)
    gfn = _guide_fn(_embed_any_size(SiglipVision(spec)), _compiled(vc, 'float32')[1])
    t = jnp.float32(0.3)

    def plain(p, x):
        return guided_velocity(DiT(mc).apply, p, cond, 3.0)(x, t)

    def guided(p, gp, x):
        v = guided_velocity(DiT(mc).apply, p, cond, 3.0)
        return encoder_guided(v, gfn, gp, jnp.ones((1, spec.hidden_size)) / spec.hidden_size ** 0.5, 1.0, 0.7)(x, t)

    def decode_only(vp, x): return _compiled(vc, 'float32')[1](vp, x)

    rows = {}
    for name, fn, args in (('plain step (CFG)', plain, (dit_p, x)), ('guided step', guided, (dit_p, (enc_p, vae_p), x)),
                           ('VAE decode, forward', decode_only, (vae_p, x))):
        t0 = time.time(); c = cost(compiled(fn, *args))
        rows[name] = {'gflops': round(c['flops'] / 1e9, 1), 'compile_s': round(time.time() - t0, 1)}
        print(name, rows[name], flush=True)
    rows['ratio'] = round(rows['guided step']['gflops'] / rows['plain step (CFG)']['gflops'], 1)
    res = {'model': a.model, 'cond': a.cond, 'latent': [mc.input_size, mc.input_size, mc.in_channels], 'encoder': 'SigLIP2 B/16 224',
           'vae': 'SD-VAE (256 px)', 'backend': jax.default_backend(), 'per_image_per_step': rows}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
