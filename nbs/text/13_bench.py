# %% [markdown]
# # Benchmarks
#
# > Train step, store vs online encoders, sampling and memory: timed on the device, counted by XLA, compared with the machine's own matmul peak.
#
# Benchmarks, not tests: nothing here asserts on a wall-clock time. The functions below are what
# `fsdit bench ...` and the scripts under `bench/` run at full size; this notebook shows each of them
# on the `mu` model so that it runs in seconds. Measured figures and the machines they come from are in
# `BENCHMARKS.md`.
#
# Three rules keep the numbers honest:
#
# - every timed call is waited for (`block_until_ready`) and compiled beforehand, so a time is the
#   device's work and not JAX's asynchronous dispatch (the seed timed its steps without waiting);
# - FLOPs come from XLA's cost analysis of the compiled program, not from a formula, and FLOP/s are
#   compared with a matmul of the same dtype timed in the same run;
# - on a shared machine, things to compare are timed interleaved (A, B, A, B, ...) and medians reported.

# %%
#| default_exp bench

# %%
#| export
from __future__ import annotations
import functools, statistics, time
from pathlib import Path
from typing import Callable

import numpy as np
import jax, jax.numpy as jnp

from fsdit.config import ModelConfig, train_config
from fsdit.steps import layout_for
from fsdit.perf import block, time_calls, compiled, cost, memory, matmul_peak, device_peak   # also read as `fsdit.bench.cost`, ...
from fsdit.utils import l2_normalize
from fsdit.dit import DiT, init_params, example_cond
from fsdit.encoder import SigLIPEncoder, VisionSpec, to_torch
from fsdit.sampler import sample, integrate, guided_velocity
from fsdit.vae import SDVAE, VAEConfig
# the measuring pieces (`13a_bench_step`), importable from here as they always were
from fsdit.bench_step import (
    SD_VAE_SCALE, MOVEMENT, CONTROL, machine_info, hlo_instructions, op_classes, dot_flops, profile_shares, train_step_exe,
    random_like, train_inputs, train_runner, interleave, summarize_step, train_memory, tpu_devices, _model, _size_name)
_all_ = ['SD_VAE_SCALE', 'MOVEMENT', 'CONTROL', 'machine_info', 'hlo_instructions', 'op_classes', 'dot_flops',
         'profile_shares', 'train_step_exe', 'random_like', 'train_inputs', 'train_runner', 'interleave',
         'summarize_step', 'train_memory', 'tpu_devices', 'memory', 'matmul_peak']   # perf's two: the bench scripts read them here

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# ## The measuring pieces
#
# What every benchmark below stands on is in `13a_bench_step` (`fsdit.bench_step`, re-exported here):
# `machine_info` (the machine and its load), the op classes of a profile (`hlo_instructions`, `op_classes`,
# `dot_flops`, `profile_shares`), the trainer's own step compiled, run and summarised (`train_step_exe`,
# `train_inputs`, `train_runner`, `interleave`, `summarize_step`) and its memory per device (`train_memory`,
# `tpu_devices`). `fsdit.perf` holds the counters the trainer also uses (`time_calls`, `compiled`, `cost`,
# `memory`, `matmul_peak`, `device_peak`).

# %%
info = machine_info()

# %% [markdown]
# ## Store vs online encoders
#
# The seed ran the frozen encoders inside every training iteration: 5 support images through SigLIP2
# B/16 and the target through the SD-VAE encoder, both at 224 px. The feature store runs them once per
# image. `online_parts` builds the seed's iteration from the same pieces, as the seed called them: the
# encoders (each one compiled call: supports -> L2-normalised pooled embeddings, target -> posterior
# moments, used for both mirror states since the seed encodes one image) and then the same compiled
# train step the store feeds — no host round trip between them. The ratio of the two iterations is
# predicted from XLA's FLOP counts of the pieces first, then measured.

# %%
#| export
SD_VAE_BLOCKS = (128, 256, 512, 512)  # stabilityai/sd-vae-ft-mse: 2 resnets per encoder block


def encoders(small: bool = False, seed: int = 0):
    "Random-weight SigLIP (B/16 at 224) and SD-VAE (encoder and decoder) of full size, or tiny ones (`small`)."
    if small:  # width 768 kept: the DiT's support_dim
        spec = VisionSpec(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
        vcfg = VAEConfig(block_out_channels=(32, 32), layers_per_block=1)
    else:
        spec, vcfg = VisionSpec(), VAEConfig(block_out_channels=SD_VAE_BLOCKS, layers_per_block=2)
    return SigLIPEncoder.random(spec, seed=seed), SDVAE.random(vcfg, seed=seed)


@functools.lru_cache(maxsize=4)
def encoder_exes(small: bool, batch: int, shots: int, input_size: int):
    "Compiled `embed` (supports -> (B, K, D) float16) and `moments` (target -> (B, 2, 2, h, w, c) float16), split as the step takes them."
    n = jax.local_device_count()
    split = layout_for(train_config('seed')).batch        # the train step's batch sharding
    enc, vae = encoders(small)
    side = vae.config.downsample_factor * input_size
    r = np.random.default_rng(0)
    target = jnp.asarray(r.uniform(-1, 1, (batch * n, side, side, 3)), jnp.float32)                  # (B, 224, 224, 3)
    supports = jnp.asarray(r.uniform(-1, 1, (batch * n, shots, enc.image_size, enc.image_size, 3)), jnp.float32)

    def embed(p, s):                                    # (B, K, h, w, 3) -> (B, K, D), as the store holds it
        z = l2_normalize(enc.module.apply({'params': p}, s.reshape(-1, *s.shape[2:]))[1])
        return z.reshape(batch * n, shots, -1).astype(jnp.float16)

    def moments(p, x):                                  # (B, H, W, 3) -> (B, 2 mirror, 2, h, w, c)
        mean, logvar = vae.module.apply({'params': p}, x, method='moments')
        return jnp.broadcast_to(jnp.stack([mean, logvar], 1)[:, None], (x.shape[0], 2, 2, *mean.shape[1:])).astype(jnp.float16)

    c_emb = compiled(jax.jit(embed, out_shardings=split), enc.params, supports)
    c_mom = compiled(jax.jit(moments, out_shardings=split), vae.params, target)
    return (lambda: c_emb(enc.params, supports)), (lambda: c_mom(vae.params, target)), cost(c_emb)['flops'], cost(c_mom)['flops']


# %%
_enc, _vae = encoders(small=True)
test_eq((_enc.image_size, _vae.config.block_out_channels), (16, (32, 32)))
_mu_size = _model('mu').input_size
_emb, _mom, _f_emb, _f_mom = encoder_exes(True, 4, 5, _mu_size)     # cached: `store_vs_online` below compiles nothing more
_B = 4 * jax.local_device_count()
test_eq((_emb().shape, _mom().shape[:3]), ((_B, 5, 768), (_B, 2, 2))); assert _f_emb > 0 and _f_mom > 0


# %% [markdown]
# The store iteration and the online one, built from the same compiled step:

# %%
#| export
def online_parts(size: str | ModelConfig, batch: int = 4, shots: int = 5, small: bool = False, **model_kw) -> dict:
    "Runners for the store iteration, the online iteration and each encoder alone; the FLOPs of each piece."
    mc = _model(size, **model_kw)
    c_step, tc = train_step_exe(mc, batch)
    state, store_batch = train_inputs(mc, tc, batch)
    embed, moments, f_emb, f_mom = encoder_exes(small, batch, shots, mc.input_size)
    box = {'state': state}

    def timed(f):
        def run() -> float:
            t0 = time.perf_counter(); block(f()); return time.perf_counter() - t0
        return run

    def step(b):
        box['state'], m = c_step(box['state'], b)
        return box['state'], m

    runners = dict(store=timed(lambda: step(store_batch)),
                   online=timed(lambda: step({**store_batch, 'moments': moments(), 'support_embeds': embed()})),
                   siglip=timed(embed), vae=timed(moments))
    flops = dict(store=cost(c_step)['flops'], siglip=f_emb, vae=f_mom)
    flops['online'] = flops['store'] + flops['siglip'] + flops['vae']
    return dict(runners=runners, flops=flops, batch=batch * jax.local_device_count())


def store_vs_online(size: str | ModelConfig, batch: int = 4, reps: int = 2, small: bool = False, **model_kw) -> dict:
    "FLOP-predicted and measured cost of a training iteration with the encoders run per step vs the feature store."
    parts = online_parts(size, batch, small=small, **model_kw)
    fl, runners = parts['flops'], parts['runners']
    for r in runners.values(): r()                                       # warm
    ts = interleave(runners, reps)
    med = {k: statistics.median(v) for k, v in ts.items()}
    B = parts['batch']
    return dict(batch=B, flops=fl, flops_per_sample={k: v / B for k, v in fl.items()},
                predicted_ratio=fl['online'] / fl['store'], measured_ratio=med['online'] / med['store'],
                pieces_ratio=(med['store'] + med['siglip'] + med['vae']) / med['store'],
                seconds=ts, median_s=med, flops_per_s={k: fl[k] / med[k] for k in fl})


# %% [markdown]
# `store_vs_online` predicts the online/store ratio from the FLOPs, then times the four runners interleaved.
# The encoders alone explain a measured ratio that differs from the FLOP ratio: their convolutions and
# attention run at a different fraction of the peak than the DiT's matmuls (`flops_per_s` per piece).

# %% [markdown]
# With tiny encoders and the `mu` DiT the pieces run (the `mu` step compiled once, cached by `train_step_exe`); their ratio says
# nothing about full size, where the encoders cost ~380 GFLOP per sample (see `BENCHMARKS.md`):

# %%
so = store_vs_online('mu', batch=4, reps=1, small=True)
assert so['flops']['siglip'] > 0 and so['flops']['vae'] > 0 and so['predicted_ratio'] > 1
assert so['measured_ratio'] > 0 and set(so['median_s']) == {'store', 'online', 'siglip', 'vae'}


# %% [markdown]
# ## The encoder against PyTorch
#
# `bench_encoder` times `SigLIPEncoder.embed` on full-size random weights (B/16 at 224) for each dtype,
# beside transformers' PyTorch `SiglipVisionModel` on CPU, in one process. On a 2-core CPU it takes
# minutes. Measured once, `bench_encoder(batch=64, iters=1)` (one warm-up batch then one timed batch of 64
# images at 224 px, random B/16 weights), on a **2-core CPU** shared with other jobs (load average 10-13
# during the run, so every figure is several times below what an idle machine gives; compare them with
# each other, not with other machines):
#
# | implementation | images/s |
# |---|---|
# | Flax, float32 | 0.48 |
# | Flax, bfloat16 | 0.38 (this CPU has no fast bfloat16 matmul; bfloat16 pays off on TPU/GPU) |
# | PyTorch `SiglipVisionModel`, float32, CPU | 0.43 |

# %%
#| export
def bench_encoder(batch: int = 64, iters: int = 3, dtypes=('float32', 'bfloat16'), torch_ref: bool = True,
                  spec=None) -> dict[str, float]:
    "Images/s of `embed` at `batch` for each dtype (and PyTorch's `SiglipVisionModel` on CPU when installed); random full-size weights."
    from dataclasses import asdict
    spec = spec or VisionSpec()
    enc = SigLIPEncoder.random(spec)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, spec.image_size, spec.image_size, spec.num_channels)).astype(np.float32)
    per_s = lambda f: batch / statistics.mean(time_calls(f, reps=iters))
    encs = {dt: SigLIPEncoder(spec, enc.params, dt) for dt in dtypes}
    out = {f'jax_{dt}': per_s(lambda: e.embed(x)) for dt, e in encs.items()}
    if torch_ref:
        try: import torch, transformers
        except ImportError: return out
        m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**asdict(spec))).eval()
        m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch(enc.params, spec).items()})
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        with torch.inference_mode(): out['torch_float32_cpu'] = per_s(lambda: m(pixel_values=xt).pooler_output)
    return out


# %% [markdown]
# On a tiny tower (the full size takes minutes here) every implementation runs and reports a rate:

# %%
from fsdit.encoder import VisionSpec
_tiny = VisionSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
_b = bench_encoder(batch=4, iters=1, spec=_tiny)
test_eq(sorted(_b), ['jax_bfloat16', 'jax_float32', 'torch_float32_cpu'])
assert all(v > 0 for v in _b.values())


# %% [markdown]
# ## Sampling
#
# 50 Euler steps with CFG for a batch of images, the whole loop one compiled program (`fsdit.sampler.sample`).
# Its overhead is measured directly: the compiled loop's time against `steps` x the time of one compiled
# step doing the same work (the sampler's own loop body run once: the doubled-batch model call, the CFG
# combination, the compensated Euler update). A loop with no host sync inside costs no more than its steps.
# `images_per_s_at_50` scales a shorter loop to 50 steps (a full-size B/2 loop of 50 steps takes minutes on
# a CPU); the overhead figure is what justifies that.

# %%
#| export
def sampling_bench(size: str | ModelConfig, n: int = 16, steps: int = 50, cfg_scale: float = 3.0, reps: int = 2,
                   **model_kw) -> dict:
    "Images/s of the compiled sampling loop, and its overhead over `steps` x one compiled step."
    mc = _model(size, **model_kw)
    model = DiT(mc)
    params = random_like(jax.eval_shape(lambda: init_params(mc, jax.random.PRNGKey(0))))   # see `train_inputs`
    noise = jax.random.normal(jax.random.PRNGKey(1), (n, mc.input_size, mc.input_size, mc.in_channels))
    cond = example_cond(mc, n)
    loop = compiled(lambda p, x, c: sample(model.apply, p, x, c, steps=steps, cfg_scale=cfg_scale), params, noise, cond)
    # one step of the same loop body: the doubled-batch model call, the CFG combination, the Euler update
    one = compiled(lambda p, x, c: integrate(guided_velocity(model.apply, p, c, cfg_scale), x, 1), params, noise, cond)
    k = min(steps, 3)   # single steps timed per round
    ts = interleave({'loop': lambda: time_calls(loop, params, noise, cond, reps=1, warmup=0)[0],
                     'step': lambda: statistics.median(time_calls(one, params, noise, cond, reps=k, warmup=0))},
                    reps)
    loop_s, step_s = statistics.median(ts['loop']), statistics.median(ts['step'])
    f_step = cost(one)['flops']
    return dict(size=_size_name(size), n=n, steps=steps, cfg_scale=cfg_scale, loop_s=loop_s, step_s=step_s,
                images_per_s=n / loop_s, images_per_s_at_50=n / (loop_s / steps * 50),
                overhead=loop_s / (steps * step_s) - 1, flops_per_step=f_step, flops_per_s=f_step * steps / loop_s,
                seconds=ts)


# %%
sb = sampling_bench('mu', n=2, steps=4, reps=2)
assert sb['images_per_s'] > 0 and sb['flops_per_step'] > 0 and sb['loop_s'] > 0 and sb['step_s'] > 0
assert -1 < sb['overhead'] < 10   # at `mu` size one step is ~0.1 ms, so this is dominated by timer noise

# %% [markdown]
# ## On an accelerator: one command, bfloat16
#
# `accel_bench` is what to run the moment a GPU or TPU is at hand (`fsdit bench accel`, a few minutes): the
# trainer's own step in bfloat16 at 16 examples per device — data parallel at S/2 and B/2, FSDP at L/2 and
# XL/2 — with samples/s, TFLOP/s per device and MFU against the device's datasheet peak
# (`fsdit.perf.PEAK_TFLOPS`); the sampler's images/s (50 Euler steps with CFG); and memory per device, both
# XLA's plan and, where the runtime reports it, the peak the device saw. A size that does not fit is
# recorded with its error and the others still run. `accel_markdown` turns the records into the section of
# `BENCHMARKS.md` that `write_section` replaces in place, so the file always shows the last measurement
# with its device's name.

# %%
#| export
ACCEL_BEGIN, ACCEL_END = '<!-- accel-bench:begin -->', '<!-- accel-bench:end -->'


def _device_peak_bytes() -> int | None:
    "The peak bytes the first local device has held (GPUs and TPUs report it; the CPU does not)."
    try: st = jax.local_devices()[0].memory_stats()
    except Exception: return None
    return int(st['peak_bytes_in_use']) if st and 'peak_bytes_in_use' in st else None


def accel_bench(dp_sizes=('S/2', 'B/2'), fsdp_sizes=('L/2', 'XL/2'), batch: int = 16, reps: int = 5, n: int = 16,
                steps: int = 50, cfg_scale: float = 3.0, attention: str = 'xla', remat: bool = False,
                log: Callable[[dict], None] = lambda r: None) -> list[dict]:
    "Train step (data parallel at `dp_sizes`, FSDP at `fsdp_sizes`) and sampler records in bfloat16; each is also passed to `log`."
    peak, where = device_peak()
    kw, recs = dict(dtype='bfloat16', attention=attention, **({'remat': True} if remat else {})), []
    for size, fsdp in [(s, False) for s in dp_sizes] + [(s, True) for s in fsdp_sizes]:
        t0 = time.perf_counter()
        rec = dict(bench='accel_train', size=size, fsdp=fsdp, batch_per_device=batch, devices=jax.device_count(), **kw)
        try:
            run, facts = train_runner(size, batch, fsdp=fsdp, **kw)
            times = interleave({size: run}, reps)[size]
            rec.update(params=facts['params'], flops_per_device=facts['flops'], memory=facts['memory'], times=times,
                       **summarize_step(times, facts['flops'], batch, peak))
            rec['samples_per_s_total'] = rec.pop('samples_per_s') * jax.device_count()
            rec['tflops_per_device'] = rec.pop('flops_per_s') / 1e12
            del run
        except Exception as e:   # typically out of memory at this size
            rec['error'] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rec.update(device_peak_bytes=_device_peak_bytes(), peak_source=where, wall_s=time.perf_counter() - t0)
        recs.append(rec); log(rec)
    for size in dp_sizes:
        t0 = time.perf_counter()
        rec = dict(bench='accel_sample', **kw, **sampling_bench(size, n, steps, cfg_scale, reps=max(1, reps // 2),
                                                                dtype=kw['dtype'], attention=attention))
        rec['wall_s'] = time.perf_counter() - t0
        recs.append(rec); log(rec)
    return recs


# %% [markdown]
# On this machine's CPU at `mu` size (bfloat16 on a CPU is slow, and its "peak" is the measured float32
# matmul, so these figures mean nothing; the records are what is checked):

# %%
ar = accel_bench(('mu',), ('mu',), batch=2, reps=1, n=2, steps=2)
test_eq([(r['bench'], r.get('fsdp')) for r in ar], [('accel_train', False), ('accel_train', True), ('accel_sample', None)])
assert all('error' not in r and r['samples_per_s_total'] > 0 and r['mfu'] > 0 for r in ar[:2]) and ar[2]['images_per_s'] > 0
_pb = _device_peak_bytes(); assert _pb is None or _pb > 0          # the CPU reports none


# %% [markdown]
# The records as the section of `BENCHMARKS.md`, and the section written in place:

# %%
#| export
def _gib(b) -> str: return '-' if b is None else f"{b / 2**30:.2f}"


def accel_markdown(recs: list[dict], info: dict) -> str:
    "The BENCHMARKS.md section of `accel_bench` records, between the markers `write_section` looks for."
    L = [ACCEL_BEGIN, '## Accelerators: bfloat16, measured by `fsdit bench accel`', '',
         f"Device: **{info['devices']}** ({info['backend']}), JAX {info['jax']}, {info['time']}; written by "
         "`fsdit bench accel --markdown BENCHMARKS.md`. Train step at "
         f"{recs[0]['batch_per_device'] if recs else '-'} examples per device, bfloat16 compute"
         f"{' with the blocks rematerialised (--remat)' if any(r.get('remat') for r in recs) else ''}, float32 state; "
         "MFU against the datasheet peak of the device (`fsdit.perf.PEAK_TFLOPS`); memory per device: XLA's "
         "plan (peak = arguments + outputs - aliased + temporaries) and the peak the device reported.", '',
         '| size | layout | devices | step (s) | samples/s (all devices) | TFLOP/s per device | MFU | planned peak GiB | device peak GiB |',
         '|---|---|---|---|---|---|---|---|---|']
    for r in recs:
        if r['bench'] != 'accel_train': continue
        lay = 'FSDP' if r['fsdp'] else 'replicated'
        if 'error' in r:
            L.append(f"| {r['size']} | {lay} | {r['devices']} | {r['error'][:80]} | | | | | |"); continue
        mfu_s = f"{r['mfu']:.1%}" if 'mfu' in r else '-'
        L.append(f"| {r['size']} | {lay} | {r['devices']} | {r['step_s']:.4f} | {r['samples_per_s_total']:.1f} | "
                 f"{r['tflops_per_device']:.1f} | {mfu_s} | {_gib(r['memory']['peak'])} | {_gib(r['device_peak_bytes'])} |")
    L += ['', '| size | images per call | Euler steps (CFG) | images/s | overhead over single steps |', '|---|---|---|---|---|']
    for r in recs:
        if r['bench'] == 'accel_sample':
            L.append(f"| {r['size']} | {r['n']} | {r['steps']} ({r['cfg_scale']:g}) | {r['images_per_s']:.1f} | {r['overhead']:.1%} |")
    return '\n'.join(L + ['', ACCEL_END]) + '\n'


def write_section(path, section: str):
    "Replace the text between the accel markers of the file at `path` with `section` (appended when absent)."
    p = Path(path)
    text = p.read_text() if p.exists() else ''
    if ACCEL_BEGIN in text and ACCEL_END in text:
        a, b = text.index(ACCEL_BEGIN), text.index(ACCEL_END) + len(ACCEL_END)
        text = text[:a] + section.rstrip('\n') + text[b:]
    else:
        text = text.rstrip('\n') + '\n\n' + section
    p.write_text(text)


# %% [markdown]
# The section of those records, written twice into a file that has other text around it: the second write
# replaces the first.

# %%
test_eq((_gib(None), _gib(3 * 2**29)), ('-', '1.50'))
md = accel_markdown(ar, info)
assert md.count('| mu |') == 3 and 'FSDP' in md and info['devices'] in md
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'B.md'; f.write_text('# Benchmarks\n\nbefore\n')
    write_section(f, md); write_section(f, md.replace('| mu |', '| mu2 |'))
    t = f.read_text()
test_eq((t.count(ACCEL_BEGIN), t.count('| mu2 |'), t.count('| mu |')), (1, 3, 0)); assert t.startswith('# Benchmarks\n\nbefore')


# %% [markdown]
# ## A train-step record
#
# What `fsdit bench train` (`fsdit.commands.bench`) records per model size: `train_runner` timed by `interleave`,
# summarised by `summarize_step`, with the op-class shares of a profile when asked for.

# %%
#| export
def train_record(size, batch, reps, peak, profile, fsdp=False, **model_kw) -> dict:
    "One train-step record of `size`: parameters, FLOPs, memory, the timed steps and their summary (and the op-class profile)."
    run, facts = train_runner(size, batch, fsdp=fsdp, **model_kw)
    times = interleave({size: run}, reps)[size]
    rec = dict(size=size, batch=batch, params=facts['params'], flops_per_sample=facts['flops_per_sample'],
               memory=facts['memory'], times=times, **summarize_step(times, facts['flops'], batch, peak))
    if profile:
        ins = hlo_instructions(facts['hlo'])
        rec['dot_flops_share'] = dot_flops(ins) / facts['flops']
        rec['profile'] = profile_shares(run, facts['hlo'])
    return rec


# %%
_tr = train_record('mu', 2, 1, None, False, dtype='bfloat16', attention='xla')   # the step `accel_bench` compiled above
test_eq((_tr['size'], _tr['batch'], _tr['reps']), ('mu', 2, 1)); assert _tr['params'] > 0 and 'mfu' not in _tr and 'profile' not in _tr
