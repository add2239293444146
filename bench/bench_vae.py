"""Images/s of `SDVAE.moments` (float32, bfloat16) beside diffusers' PyTorch `AutoencoderKL.encode`, in one run.

    python bench/bench_vae.py                      # batch 64, 224 px, 3 timed iterations (an accelerator)
    python bench/bench_vae.py --batch 4 --iters 2  # what a small CPU can do in minutes

The SD-VAE architecture (stabilityai/sd-vae-ft-mse) with random weights, built by diffusers and loaded
through `SDVAE.from_pretrained` from a temporary directory (no hub access). Compilation is timed apart.
Also reports the bfloat16 error against float32 (max abs difference / max abs float32 value).

Measured once, 2-core CPU shared with other jobs (load average ~10), `--batch 4 --iters 2 --bf16-batch 2`
(batch 64 would take an hour there): JAX float32 0.074 images/s, JAX bfloat16 0.076 images/s,
PyTorch float32 (2 threads) 0.044 images/s; bfloat16 vs float32 error 1.8e-2; JAX vs PyTorch 4.9e-6.
"""
import argparse, json, os, platform, tempfile, time

import numpy as np
import jax

from fsdit.vae import SDVAE


def timed(fn, iters: int) -> float:
    "Seconds per call (after one untimed call)."
    fn()
    t = time.perf_counter()
    for _ in range(iters): fn()
    return (time.perf_counter() - t) / iters


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--iters', type=int, default=3)
    ap.add_argument('--bf16-batch', type=int, default=None, help='batch for bfloat16 (default: --batch)')
    ap.add_argument('--no-torch', action='store_true')
    a = ap.parse_args(argv)
    import torch, diffusers
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
                                  up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        vae32 = SDVAE.from_pretrained(d)
    vae16 = SDVAE(vae32.config, vae32.params, dtype='bfloat16')
    x = np.random.default_rng(0).uniform(-1, 1, (a.batch, a.size, a.size, 3)).astype(np.float32)
    out = {'device': str(jax.devices()[0].device_kind), 'cpu_count': os.cpu_count(), 'machine': platform.machine(),
           'batch': a.batch, 'size': a.size, 'iters': a.iters}
    means = {}
    for name, vae, b in (('float32', vae32, a.batch), ('bfloat16', vae16, a.bf16_batch or a.batch)):
        xb = x[:b]
        t = time.perf_counter(); mean, _ = jax.block_until_ready(vae.moments(xb)); compile_s = time.perf_counter() - t
        s = timed(lambda: jax.block_until_ready(vae.moments(xb)), a.iters)
        means[name] = np.asarray(mean)
        out[f'jax_{name}'] = {'batch': b, 'first_call_s': round(compile_s, 2), 's_per_batch': round(s, 3),
                              'images_per_s': round(b / s, 3)}
    n = min(len(means['float32']), len(means['bfloat16']))
    out['bf16_rel_err_mean'] = float(np.abs(means['bfloat16'][:n] - means['float32'][:n]).max() / np.abs(means['float32'][:n]).max())
    if not a.no_torch:
        torch.set_num_threads(os.cpu_count())
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            s = timed(lambda: ref.encode(xt).latent_dist.mean, a.iters)
            m = ref.encode(xt).latent_dist.mean.permute(0, 2, 3, 1).numpy()
        out['torch_float32'] = {'batch': a.batch, 's_per_batch': round(s, 3), 'images_per_s': round(a.batch / s, 3),
                                'threads': torch.get_num_threads()}
        out['jax_vs_torch_rel_err'] = float(np.abs(means['float32'] - m[:len(means['float32'])]).max() / np.abs(m).max())
    return out


if __name__ == '__main__':
    print(json.dumps(main(), indent=2))
