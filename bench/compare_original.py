"""Side by side: our train step against the original FSDiT's, same machine, same run, interleaved.

The original (thanhlamauto/FSDiT, the seed of this project; its DiT derives from kvfrans/jax-flow) is not
part of this package and none of its code is copied here. Get it yourself and point this script at it:

    git clone https://github.com/thanhlamauto/FSDiT /tmp/FSDiT
    git -C /tmp/FSDiT checkout f0a993d      # the version the seed README describes (plain adaLN DiT)
    pip install einops                       # the original's model imports it
    python bench/compare_original.py --original /tmp/FSDiT --sizes S/2 B/2 --batch 16 --reps 5

What runs for the original: its `model.DiT` and its `Trainer.train_step` exactly as its train.py defines
them (pmap over the local devices; AdamW with warmup-cosine, global-norm clip 1.0, EMA 0.9999 via its
`utils/train_state.py`), fed latents and mean support embeddings as its train loop feeds them after the
encoders. train.py imports TensorFlow, wandb and the encoders at module level, so instead of importing
it this script parses it and executes only the step's definitions (`flow_interpolate`, `flow_velocity`,
`compute_t_bin_losses`, `Trainer`) with the names they use. What runs for us: `fsdit.bench.train_runner`,
i.e. `fsdit.steps.make_train_step` (`jax.jit` over the device mesh) on a feature-store batch (float16 moments
of both mirror states and 5 float16 support embeddings per episode; the posterior sample, mirror and mean
support are drawn inside). With `--pmap`, also the same step as the trainer ran it before, under `jax.pmap`.

Both are compiled ahead and warmed, every step is waited for, the two are called alternately (ours,
original, ours, ...) `--reps` rounds, and medians are reported with the matmul peak measured in the same
run (before and after) and the load average. Output: JSON lines (stdout and `--out`) and a Markdown table.
"""
from __future__ import annotations
import argparse, ast, functools, json, os, statistics, sys, time
from pathlib import Path
from typing import Any

import numpy as np
import jax, jax.numpy as jnp
import optax

from fsdit import bench, steps
from fsdit.config import train_config
from fsdit.dit import DiT
from fsdit.state import make_optimizer, lr_schedule, ema_update
from fsdit.utils import LatentScaling
from fsdit.flow import loss_fn, t_bin_stats

SIZES = {'S/2': (384, 12, 6), 'B/2': (768, 12, 12), 'L/2': (1024, 24, 16), 'XL/2': (1152, 28, 16), 'mu': (32, 2, 2)}
STEP_DEFS = ('flow_interpolate', 'flow_velocity', 'compute_t_bin_losses', 'Trainer')


def load_original(orig: Path) -> dict:
    "The original's DiT, TrainState/target_update and the step definitions of its train.py."
    orig = orig.resolve()
    if not (orig / 'model.py').exists() or not (orig / 'train.py').exists():
        sys.exit(f"{orig}: no model.py/train.py; clone https://github.com/thanhlamauto/FSDiT there (see --help)")
    sys.path.insert(0, str(orig))
    import flax, optax
    from model import DiT
    from utils.train_state import TrainState, target_update
    tree = ast.parse((orig / 'train.py').read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in STEP_DEFS]
    missing = set(STEP_DEFS) - {n.name for n in keep}
    if missing: sys.exit(f"{orig}/train.py lacks {sorted(missing)}: not the expected version (try commit f0a993d)")
    ns = dict(jax=jax, jnp=jnp, flax=flax, optax=optax, partial=functools.partial, Any=Any,
              TrainState=TrainState, target_update=target_update)
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(orig / 'train.py'), 'exec'), ns)
    return dict(DiT=DiT, TrainState=TrainState, Trainer=ns['Trainer'])


def original_runner(o: dict, size: str, batch: int, max_steps: int = 200_000):
    "A callable running one warmed step of the original (returns seconds), and the step's facts."
    import flax, optax
    hidden, depth, heads = SIZES[size]
    n = jax.local_device_count()
    dit = o['DiT'](patch_size=2, hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4,
                   siglip_dim=768, cond_dropout_prob=0.1)
    rng = jax.random.PRNGKey(0)
    rng, p_key, d_key = jax.random.split(rng, 3)
    params = dit.init({'params': p_key, 'cond_dropout': d_key}, jnp.zeros((1, 28, 28, 4)), jnp.zeros((1,)),
                      jnp.zeros((1, 768)))['params']
    # the optimizer exactly as train.py builds it (seed table: lr 1e-4, warmup 5k, cosine to 1e-6)
    warmup = optax.linear_schedule(0.0, 1e-4, 5000)
    cosine = optax.cosine_decay_schedule(1e-4, max_steps - 5000, alpha=1e-6 / 1e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.join_schedules([warmup, cosine], [5000]), b1=0.9, b2=0.99, weight_decay=0.01))
    cfg = dict(num_t_bins=10, t_sampler='log-normal', ema_rate=0.9999)
    tr = o['Trainer'](rng, o['TrainState'].create(dit, params, tx=tx), o['TrainState'].create(dit, params), cfg)
    tr = flax.jax_utils.replicate(tr, devices=jax.local_devices())
    tr = tr.replace(rng=jax.random.split(rng, n))
    r = np.random.default_rng(0)
    images = jnp.asarray(r.normal(size=(n, batch, 28, 28, 4)), jnp.float32)   # scaled SD-VAE latents: about unit variance
    sup = r.normal(size=(n, batch, 768)); sup = jnp.asarray(sup / np.linalg.norm(sup, axis=-1, keepdims=True), jnp.float32)
    c = bench.compiled(o['Trainer'].train_step, tr, images, sup)
    box = {'tr': tr}

    def run() -> float:
        t0 = time.perf_counter()
        box['tr'], info = c(box['tr'], images, sup)
        bench.block((box['tr'], info))
        return time.perf_counter() - t0

    run()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return run, dict(params=n_params, flops=bench.cost(c)['flops'], memory=bench.memory(c), hlo=c.as_text())


def pmap_step(state, batch, *, model, tx, mc, tc, scaling):
    """The trainer's previous step, per device under `jax.pmap` over the axis 'batch': each device draws the keys of
    its own examples from their global index, and the loss, gradients and t-bin sums are reduced over the axis."""
    n = batch['moments'].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(state.key, state.step), i))(
        jax.lax.axis_index('batch') * n + jnp.arange(n))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, batch, keys, mc, tc, scaling)
    loss, grads = jax.lax.pmean((loss, grads), 'batch')
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = steps.global_norm(grads)
    bin_sums, bin_counts = jax.lax.psum(t_bin_stats(aux['loss'], aux['t']), 'batch')
    metrics = dict(loss=loss, grad_norm=grad_norm, grad_norm_clipped=jnp.minimum(grad_norm, tc.grad_clip),
                   param_norm=steps.global_norm(params), lr=lr_schedule(tc)(state.step),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm), bin_sums=bin_sums, bin_counts=bin_counts)
    return state.replace(params=params, ema_params=ema_update(state.ema_params, params, tc.ema_decay),
                         opt_state=opt_state, step=state.step + 1), metrics


def pmap_runner(size: str, batch: int):
    """The trainer's previous step (`pmap_step`): state replicated on every local device, gradients pmean-ed over the
    axis, as the trainer ran it before the jit + sharding layout."""
    mc, n = bench._model(size), jax.local_device_count()
    tc = train_config('seed', batch_size=batch * n)
    fn = jax.pmap(functools.partial(pmap_step, model=DiT(mc), tx=make_optimizer(tc), mc=mc, tc=tc,
                                    scaling=LatentScaling(bench.SD_VAE_SCALE)),
                  axis_name='batch', donate_argnums=(0,) if steps.donate_state() else ())
    state, b = bench.train_inputs(mc, tc, batch)
    stack = lambda x: np.stack([np.asarray(x)] * n)
    state = jax.tree.map(stack, steps.to_host(state))
    b = {k: np.asarray(v).reshape(n, batch, *v.shape[1:]) for k, v in b.items()}
    c = fn.lower(state, b).compile()
    box = {'state': state}

    def run() -> float:
        t0 = time.perf_counter()
        box['state'], m = c(box['state'], b)
        bench.block((box['state'], m))
        return time.perf_counter() - t0

    run()
    n_params = sum(int(np.prod(p.shape[1:])) for p in jax.tree.leaves(state.params))
    return run, dict(params=n_params, flops=bench.cost(c)['flops'], memory=bench.memory(c), hlo=c.as_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--original', type=Path, required=True, help='checkout of thanhlamauto/FSDiT (commit f0a993d)')
    ap.add_argument('--sizes', nargs='+', default=['S/2', 'B/2'])
    ap.add_argument('--batch', type=int, default=16, help='batch per device')
    ap.add_argument('--reps', type=int, default=5, help='interleaved rounds (medians reported)')
    ap.add_argument('--peak-n', type=int, default=2048)
    ap.add_argument('--profile', action='store_true', help='op-class shares of both steps from a profile')
    ap.add_argument('--other-donation', action='store_true',
                    help="also time our step with the other donation setting (the trainer donates the state on accelerators, not on CPU)")
    ap.add_argument('--pmap', action='store_true', help="also time the trainer's previous step: the same step under jax.pmap")
    ap.add_argument('--out', type=Path, help='append JSON lines here')
    a = ap.parse_args(argv)
    o = load_original(a.original)
    recs = []

    def emit(rec):
        rec = {**rec, 'machine': bench.machine_info()}
        recs.append(rec)
        line = json.dumps(rec, default=float)
        print(line, flush=True)
        if a.out:
            with open(a.out, 'a') as f: f.write(line + '\n')

    for size in a.sizes:
        p0 = bench.matmul_peak(a.peak_n, reps=3)
        runs, facts = {}, {}
        runs['ours'], facts['ours'] = bench.train_runner(size, a.batch)
        runs['original'], facts['original'] = original_runner(o, size, a.batch)
        if a.pmap: runs['ours, pmap'], facts['ours, pmap'] = pmap_runner(size, a.batch)
        if a.other_donation:
            other = not steps.donate_state()
            name = 'ours, state donated' if other else 'ours, no donation'
            runs[name], facts[name] = bench.train_runner(size, a.batch, donate=other)
        ts = bench.interleave(runs, a.reps)
        p1 = bench.matmul_peak(a.peak_n, reps=3)
        peak = statistics.median(p0['seconds'] + p1['seconds'])
        peak = p0['flops'] / peak
        for name, f in facts.items():
            rec = dict(bench='compare', size=size, impl=name, batch=a.batch, params=f['params'],
                       flops_per_sample=f['flops'] / a.batch, memory=f['memory'], peak_flops_per_s=peak,
                       peak_before=p0['flops_per_s'], peak_after=p1['flops_per_s'], times=ts[name],
                       **bench.summarize_step(ts[name], f['flops'], a.batch, peak))
            if a.profile and name in ('ours', 'original'):
                rec['profile'] = bench.profile_shares(runs[name], f['hlo'])
                rec['dot_flops_share'] = bench.dot_flops(bench.hlo_instructions(f['hlo'])) / f['flops']
            emit(rec)

    print('\n| size | impl | params | GFLOP/sample | step s (median, min-max) | samples/s | GFLOP/s | of matmul peak |')
    print('|---|---|---|---|---|---|---|---|')
    for r in recs:
        print(f"| {r['size']} | {r['impl']} | {r['params']:,} | {r['flops_per_sample'] / 1e9:.1f} | "
              f"{r['step_s']:.2f} ({r['step_min_s']:.2f}-{r['step_max_s']:.2f}) | {r['samples_per_s']:.2f} | "
              f"{r['flops_per_s'] / 1e9:.1f} | {r['mfu']:.0%} (peak {r['peak_flops_per_s'] / 1e9:.0f}) |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
