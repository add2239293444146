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
import argparse, collections, functools, glob, json, os, platform, re, statistics, tempfile, time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import jax, jax.numpy as jnp

from fsdit.config import ModelConfig, TrainConfig, model_config, train_config
from fsdit.state import create_state
from fsdit.steps import make_train_step, layout_for, state_shardings
from fsdit.testing import synthetic_batch
from fsdit.perf import block, time_calls, stats, compiled, cost, memory, matmul_peak, device_peak
from fsdit.cli import CLIError

SD_VAE_SCALE = 0.18215   # the SD-VAE's scaling factor: the latent scale of the benchmarked steps (speed does not depend on it)
from fsdit.data import l2_normalize
from fsdit.dit import DiT, init_params, example_cond
from fsdit.encoder import SigLIPEncoder, VisionSpec, to_torch
from fsdit.sampler import sample, integrate, guided_velocity
from fsdit.vae import SDVAE, VAEConfig

# %%
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## The machine
#
# A figure means little without the machine it was measured on, and on a shared machine without its
# load at the time: `machine_info` records both.

# %%
#| export
def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    "CPU model and cores, JAX/jaxlib/Flax versions, backend and devices, load average and UTC time."
    import flax, jaxlib
    devs = jax.devices()
    return dict(cpu=_cpu_model(), cores=os.cpu_count(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, backend=jax.default_backend(), devices=f"{len(devs)} x {devs[0].device_kind}",
                load=[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None,
                time=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


# %%
info = machine_info()
assert info['cores'] >= 1 and info['jax'] == jax.__version__ and info['backend'] in ('cpu', 'gpu', 'tpu')

# %% [markdown]
# ## Timing, FLOPs and memory, and the machine's peak
#
# `fsdit.perf` holds the counters the trainer also uses: `time_calls` (every call waited for), `compiled`
# (the executable ahead of time), `cost` and `memory` (XLA's FLOP and byte counts, per device) and
# `matmul_peak` (the reference for MFU on a CPU: a large matmul in the same dtype, timed in the same run).

# %% [markdown]
# ## Where the time goes: op classes from a profile
#
# A profile (`jax.profiler.trace`) records one event per executed XLA instruction (on CPU, per thunk and
# thread), named after the instruction in the compiled module. Reading the module's text gives each
# instruction's opcodes, including those inside the fusion it calls, so every event can be put in a
# class: `matmul/conv` (any fusion holding a dot or a convolution), `reduction`, `elementwise`,
# `data movement` (copies, transposes, slices, concatenations), `custom-call`. Control instructions
# (`while`, `call`, `conditional`) contain other events and are left out. The shares are of the summed
# event time over all threads — thread time, not wall time.

# %%
#| export
_COMP_RE = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$')
_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s([a-z][a-z0-9\-]*)\((.*)$')
_CALLS_RE = re.compile(r'\b(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)\}?')
MOVEMENT = {'copy', 'transpose', 'reshape', 'bitcast', 'broadcast', 'slice', 'dynamic-slice', 'dynamic-update-slice',
            'concatenate', 'pad', 'gather', 'scatter', 'parameter', 'constant', 'tuple', 'get-tuple-element', 'iota',
            'reverse', 'copy-start', 'copy-done', 'bitcast-convert'}
CONTROL = {'while', 'call', 'conditional'}


def hlo_instructions(text: str) -> dict[str, dict]:
    "The instructions of an HLO module's text: name -> {'op', 'shape', 'comp', 'calls', 'rest'}."
    out, comp = {}, None
    for line in text.splitlines():
        if (m := _COMP_RE.match(line)): comp = m.group(1); continue
        if comp and (m := _INSTR_RE.match(line)):
            name, shape, op, rest = m.groups()
            calls = [c.strip().lstrip('%') for g in _CALLS_RE.findall(rest) for c in g.split(',') if c.strip()]
            out[name] = dict(op=op, shape=shape, comp=comp, calls=calls, rest=rest)
    return out


def op_classes(instrs: dict[str, dict]) -> dict[str, str]:
    "Class of each instruction from the opcodes it runs (looking inside the computations it calls)."
    by_comp = collections.defaultdict(list)
    for name, i in instrs.items(): by_comp[i['comp']].append(name)
    memo: dict[str, frozenset] = {}

    def comp_ops(comp):
        if comp not in memo:
            memo[comp] = frozenset()  # guards against cycles
            memo[comp] = frozenset().union(*(ops(n) for n in by_comp.get(comp, ())))
        return memo[comp]

    def ops(name):
        i = instrs[name]
        return frozenset({i['op']}).union(*(comp_ops(c) for c in i['calls']))

    def cls(name):
        i, o = instrs[name], ops(name)
        if i['op'] in CONTROL: return 'control'
        if o & {'dot', 'convolution'}: return 'matmul/conv'
        if 'custom-call' in o: return 'custom-call'
        if o & {'reduce', 'reduce-window', 'select-and-scatter', 'sort', 'all-reduce'}: return 'reduction'
        if o <= MOVEMENT: return 'data movement'
        return 'elementwise'
    return {name: cls(name) for name in instrs}


def _dims(shape: str) -> list[int]:
    m = re.search(r'\[([\d,]*)\]', shape)
    return [int(d) for d in m.group(1).split(',') if d] if m else []


def dot_flops(instrs: dict[str, dict]) -> float:
    "FLOPs of the module's dot products (2 x output size x contracted size), each counted once."
    total = 0.0
    for i in instrs.values():
        if i['op'] != 'dot': continue
        lhs = re.search(r'%([\w.\-]+)', i['rest']).group(1)
        cdims = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', i['rest']).group(1)
        k = np.prod([_dims(instrs[lhs]['shape'])[int(d)] for d in cdims.split(',') if d])
        total += 2.0 * np.prod(_dims(i['shape'])) * k
    return total


def profile_shares(run: Callable[[], Any], hlo_text: str, reps: int = 1) -> dict | None:
    "Run `run()` `reps` times under the profiler; the share of event time per op class and the seconds summed."
    ProfileData = getattr(jax.profiler, 'ProfileData', None)
    if ProfileData is None: return None
    classes = op_classes(hlo_instructions(hlo_text))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(reps): block(run())
        files = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
        if not files: return None
        pd = ProfileData.from_file(files[0])
        total = collections.Counter()
        for plane in pd.planes:
            for line in plane.lines:
                for e in line.events:
                    k = classes.get(e.name)
                    if k and k != 'control': total[k] += e.duration_ns
    s = sum(total.values())
    if not s: return None
    return dict(shares={k: v / s for k, v in total.most_common()}, op_seconds=s / 1e9 / reps)


# %% [markdown]
# `profile_shares` runs a callable under the profiler and sums the event time per class.
# `ProfileData` (reading the trace back in-process) is in `jax.profiler` since JAX 0.4.3x; where it is
# missing the function returns `None` rather than guessing.

# %% [markdown]
# On a small MLP with its gradient: the module's dots are what XLA counts (plus a few elementwise FLOPs),
# and the profile finds the matmuls and the elementwise/reduction work around them.

# %%
def _mlp(x, w):
    return jnp.sum(jax.nn.softmax(jax.nn.gelu(x @ w) @ w.T, -1) ** 2)
x, w = jnp.ones((128, 256)), jnp.ones((256, 256)) * 0.01
g = jax.jit(jax.grad(_mlp, argnums=1))
cg = compiled(g, x, w)
ins = hlo_instructions(cg.as_text())
cls = op_classes(ins)
assert 'matmul/conv' in cls.values() and 'elementwise' in set(cls.values()) | {'reduction'}
test_eq(dot_flops(ins), 5 * 2 * 128 * 256 * 256)   # 2 dots forward; backward: dh, and dw from each of the two uses of w
assert 1.0 <= cost(cg)['flops'] / dot_flops(ins) < 1.2
prof = profile_shares(lambda: cg(x, w), cg.as_text(), reps=2)
if prof is not None:
    test_close(sum(prof['shares'].values()), 1.0) ; assert 'matmul/conv' in prof['shares']


# %% [markdown]
# ## The train step
#
# The benchmark runs the trainer's own step: `fsdit.steps.make_train_step` (the per-device pure step under
# `jax.pmap`, the state donated on accelerators only, see `fsdit.steps.donate_state`) on a synthetic batch with the feature store's shapes and dtypes (float16
# posterior moments of both mirror states, 5 float16 support embeddings per episode). `batch` is per
# device. The step is compiled once per (model, batch) against shapes only (`jax.eval_shape`: nothing is
# allocated), and that one executable is timed, counted and asked for its memory.

# %%
#| export
def _model(size: str | ModelConfig, **model_kw) -> ModelConfig:
    return size if isinstance(size, ModelConfig) else model_config(size, **model_kw)


def _size_name(size) -> str: return size if isinstance(size, str) else 'custom'


@functools.lru_cache(maxsize=8)
def train_step_exe(mc: ModelConfig, batch: int, donate: bool | None = None, fsdp: bool = False, devices: tuple | None = None):
    """The trainer's compiled step over every device (or over `devices`, e.g. a TPU slice's from `tpu_devices`) for
    `batch` examples per device (state donated: `donate`, default the trainer's; sharded: `fsdp`), and its
    `TrainConfig` (cached). Compiled from shapes: no memory is allocated."""
    n = len(devices) if devices else jax.device_count()
    tc = train_config('seed', batch_size=batch * n, fsdp=fsdp)
    layout = layout_for(tc, devices)
    state = jax.eval_shape(lambda: create_state(mc, tc))
    b = {k: jax.ShapeDtypeStruct((n * batch, *v.shape[1:]), v.dtype) for k, v in synthetic_batch(1, mc).items()}
    return compiled(make_train_step(mc, tc, SD_VAE_SCALE, layout, donate), state, b), tc


def random_like(shapes, seed: int = 0, scale: float = 0.02):
    "Arrays of the given shapes drawn from N(0, scale) with numpy (no XLA compilation)."
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * r.standard_normal(s.shape)).astype(s.dtype), shapes)


def train_inputs(mc: ModelConfig, tc: TrainConfig, batch: int, seed: int = 0):
    "A state of the trainer's structure in the trainer's layout of `tc`, and a synthetic batch split over the devices."
    # Drawn with numpy from the state's shapes: compiling the init costs seconds even at `mu`, and a
    # step's speed does not depend on the values (parameters N(0, 0.02), optimizer moments zero as at init).
    layout = layout_for(tc)
    shapes = jax.eval_shape(lambda: create_state(mc, tc))
    params = random_like(shapes.params, seed)
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes).replace(
        params=params, ema_params=params, key=np.asarray(jax.random.PRNGKey(seed)))
    return layout.put(state), layout.put_batch(synthetic_batch(batch * jax.local_device_count(), mc))


def train_runner(size: str | ModelConfig, batch: int = 16, donate: bool | None = None, fsdp: bool = False,
                 **model_kw) -> tuple[Callable[[], float], dict]:
    "A callable that runs one warmed train step (carrying the state) and returns its wall seconds; the step's facts."
    mc = _model(size, **model_kw)
    c, tc = train_step_exe(mc, batch, donate, fsdp)
    state, b = train_inputs(mc, tc, batch)
    box = {'state': state}

    def run() -> float:
        t0 = time.perf_counter()
        box['state'], m = c(box['state'], b)
        block((box['state'], m))
        return time.perf_counter() - t0

    run()  # first call: allocations, thread pools
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(box['state'].params))
    f = cost(c)['flops']   # per device
    return run, dict(size=_size_name(size), batch=batch, fsdp=fsdp, params=params, flops=f, flops_per_sample=f / batch,
                     memory=memory(c), hlo=c.as_text())


def interleave(runners: dict[str, Callable[[], float]], reps: int = 3) -> dict[str, list[float]]:
    "Call each runner in turn, `reps` rounds (A, B, A, B, ...): the fair way to compare on a shared machine."
    out = {k: [] for k in runners}
    for _ in range(reps):
        for k, r in runners.items(): out[k].append(r())
    return out


def summarize_step(times: list[float], flops: float, batch: int, peak: float | None = None) -> dict:
    "Median step seconds, samples/s, FLOP/s and the fraction of `peak` FLOP/s."
    s = stats(times)
    out = dict(step_s=s['median'], step_min_s=s['min'], step_max_s=s['max'], reps=s['n'],
               samples_per_s=batch / s['median'], flops_per_s=flops / s['median'])
    if peak: out['mfu'] = out['flops_per_s'] / peak
    return out


# %% [markdown]
# `summarize_step` turns timings and FLOPs into the figures the issue asks for: step time, samples/s,
# model FLOP/s and its fraction of the measured matmul peak (`mfu`).

# %% [markdown]
# On `mu`, a batch of 4: the step runs and XLA counts its FLOPs; the state's buffers are donated (XLA reports
# them as aliased) where the trainer donates them, on accelerators. At `mu` size the step is tiny and bookkeeping dominates; at S/2 and B/2 the
# matmuls do — see `BENCHMARKS.md`.

# %%
from fsdit.steps import donate_state
pk = matmul_peak(256, reps=3)
run, facts = train_runner('mu', batch=4)
assert facts['flops'] > 0 and facts['params'] > 0
test_eq(facts['memory']['alias'] > 0, donate_state())
r = summarize_step(interleave({'mu': run}, reps=2)['mu'], facts['flops'], 4, peak=pk['flops_per_s'])
assert r['samples_per_s'] > 0 and r['mfu'] > 0 and r['reps'] == 2


# %% [markdown]
# ## Peak memory of the train step
#
# Read from the compiled step as an accelerator runs it, with the state donated: arguments (state and batch),
# outputs, the donated state's buffers that are reused for the output (aliased), temporaries (activations
# kept for the backward pass, gradients). Compiling against shapes only means B/2 at batch 32 costs a
# compilation and no memory. The state is also counted by part: float32 parameters, EMA, the two Adam moments
# and the gradients.
#
# **B/2 at 16 per core, bfloat16 compute** (compiled for the CPU of a 2-core machine, about 2.5 minutes):
# parameters 0.49 GiB (131.8 M float32), EMA 0.49 GiB, Adam moments 0.98 GiB, gradients 0.49 GiB; XLA's
# figures: arguments 1.97 GiB (state and batch), temporaries 4.15 GiB, outputs 1.97 GiB, all aliased to the
# donated inputs, so the peak is about **6.1 GiB of the 16 GiB** of a v5e core. The TPU compiler fuses and lays
# out differently (and pads the 196 tokens to its tiles), so read it as "fits with more than 2x to spare", not
# as an exact figure; `remat=True` should cut the activation share on the TPU if a larger batch per core is
# wanted. This CPU plan cannot show that: the CPU compiler expands the recomputation's optimization barriers
# before it schedules (`BENCHMARKS.md` §4).

# %%
#| export
def _shard_bytes(shapes, shardings) -> int:
    "Bytes one device holds of arrays of `shapes` laid out by `shardings`."
    return sum(int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
               for x, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def train_memory(size: str | ModelConfig, batch: int, fsdp: bool = False, devices: tuple | None = None, **model_kw) -> dict:
    """Bytes per device of the train step at `batch` per device over every device, or over `devices` (`fsdp`: the
    state sharded): the state by part as one device holds it, and XLA's plan (the plan of the devices' compiler)."""
    mc = _model(size, **model_kw); exe, tc = train_step_exe(mc, batch, donate=True, fsdp=fsdp, devices=devices)
    layout = layout_for(tc, devices)
    state, sh = jax.eval_shape(lambda: create_state(mc, tc)), state_shardings(layout, mc, tc)
    p = _shard_bytes(state.params, sh.params)
    return dict(size=_size_name(size), batch=batch, devices=layout.n, fsdp=fsdp,
                params=p, ema=p, adam=_shard_bytes(state.opt_state, sh.opt_state), grads=p, **memory(exe))


def tpu_devices(topology: str) -> tuple:
    """The devices of a TPU slice (`'v5e:2x4'`, `'v5p:2x2x1'`, ...) for compiling ahead of time from any host, no TPU
    needed: XLA's TPU compiler then plans the memory a real slice would use. Needs the `libtpu` wheel that matches
    jax (`pip install "jax[tpu]==<jax's version>"`)."""
    from jax.experimental import topologies
    try:
        return tuple(topologies.get_topology_desc(platform='tpu', topology_name=topology).devices)
    except Exception as e:  # no libtpu, a libtpu for another jax, or a name the compiler does not know
        raise CLIError(f"cannot compile for the TPU slice {topology!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                         f'This needs the libtpu that matches jax {jax.__version__}: pip install "jax[tpu]=={jax.__version__}"; '
                         "topologies are named like v5e:2x4 or v5p:2x2x1.") from None


# %%
m4 = train_memory('mu', 4)
test_eq((m4['argument'], m4['output']), (facts['memory']['argument'], facts['memory']['output']))
assert m4['peak'] == m4['argument'] + m4['output'] - m4['alias'] + m4['temp'] and m4['alias'] > 0
test_eq((m4['ema'], m4['grads']), (m4['params'], m4['params'])); assert 2 * m4['params'] <= m4['adam'] < 2 * m4['params'] + 1024   # two moments (+ step counters)

# %% [markdown]
# The CPU compiler plans memory differently from a TPU's: it schedules for speed, and expands the
# optimisation barriers that `remat` leaves, so its plan of a large step is an upper bound. `tpu_devices` gives
# the devices of a TPU slice that no one holds, and `train_memory(..., devices=tpu_devices('v5e:2x4'))` compiles
# the step with XLA's TPU compiler from any host (`bench/memory_plan.py --topology v5e:2x4`). Without the libtpu
# wheel, or for a slice the compiler does not know, it stops with what to install or how slices are named:

# %%
test_fail(lambda: tpu_devices('v5e:9x9'), contains='topologies are named like v5e:2x4')

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
# With tiny encoders and the `mu` DiT the pieces run (reusing the step compiled above); their ratio says
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
# On this machine's CPU at `mu` size (bfloat16 on a CPU is slow, and its "peak" is the measured float32
# matmul, so these figures mean nothing; the records and the section are what is checked), written twice
# into a file that has other text around the section: the second write replaces the first.

# %%
ar = accel_bench(('mu',), ('mu',), batch=2, reps=1, n=2, steps=2)
test_eq([(r['bench'], r.get('fsdp')) for r in ar], [('accel_train', False), ('accel_train', True), ('accel_sample', None)])
assert all('error' not in r and r['samples_per_s_total'] > 0 and r['mfu'] > 0 for r in ar[:2]) and ar[2]['images_per_s'] > 0
md = accel_markdown(ar, info)
assert md.count('| mu |') == 3 and 'FSDP' in md and info['devices'] in md
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'B.md'; f.write_text('# Benchmarks\n\nbefore\n')
    write_section(f, md); write_section(f, md.replace('| mu |', '| mu2 |'))
    t = f.read_text()
test_eq((t.count(ACCEL_BEGIN), t.count('| mu2 |'), t.count('| mu |')), (1, 3, 0)); assert t.startswith('# Benchmarks\n\nbefore')


# %% [markdown]
# ## The command line
#
# `fsdit bench <what> [--sizes S/2 B/2] ...` runs the benchmarks above at full size and prints (and with
# `--out`, writes) one JSON record per benchmark, with `machine_info()` alongside.
#
# | what | runs |
# |---|---|
# | `peak` | `matmul_peak` (float32 and, with `--dtype`, another dtype) |
# | `train` | `train_runner` + `summarize_step` per size, with the op-class profile (`--profile`) |
# | `online` | `store_vs_online` per size |
# | `sample` | `sampling_bench` per size (`--steps`, `--n`) |
# | `memory` | `train_memory` per size and `--batches` (`--fsdp`: the state sharded over every device) |
# | `accel` | `accel_bench` in bfloat16: `--sizes` data parallel, `--fsdp-sizes` FSDP; `--markdown FILE` writes its section |
# | `all` | all of them but `accel` |

# %%
#| export
def _train_record(size, batch, reps, peak, profile, fsdp=False, **model_kw) -> dict:
    run, facts = train_runner(size, batch, fsdp=fsdp, **model_kw)
    times = interleave({size: run}, reps)[size]
    rec = dict(size=size, batch=batch, params=facts['params'], flops_per_sample=facts['flops_per_sample'],
               memory=facts['memory'], times=times, **summarize_step(times, facts['flops'], batch, peak))
    if profile:
        ins = hlo_instructions(facts['hlo'])
        rec['dot_flops_share'] = dot_flops(ins) / facts['flops']
        rec['profile'] = profile_shares(run, facts['hlo'])
    return rec


def bench_cli(argv: list[str] | None = None) -> int:
    "`fsdit bench`: run benchmarks and print JSON records (see the table above)."
    ap = argparse.ArgumentParser(prog='fsdit bench', description='Benchmarks of the train step, encoders, sampling and memory.')
    ap.add_argument('what', nargs='+', choices=['peak', 'train', 'online', 'sample', 'memory', 'accel', 'all'])
    ap.add_argument('--sizes', nargs='+', default=['S/2', 'B/2'], help='model presets (mu, S/2, B/2, ...)')
    ap.add_argument('--batch', type=int, default=16, help='train-step batch per device')
    ap.add_argument('--online-batch', type=int, default=4, help='batch of the store-vs-online iteration')
    ap.add_argument('--batches', type=int, nargs='+', default=[16, 32], help='per-device batches for `memory`')
    ap.add_argument('--reps', type=int, default=3, help='timed repetitions (medians are reported)')
    ap.add_argument('--n', type=int, default=16, help='images per sampling call')
    ap.add_argument('--steps', type=int, default=50, help='Euler steps per sampling call')
    ap.add_argument('--cfg', type=float, default=3.0, help='CFG scale for sampling')
    ap.add_argument('--peak-n', type=int, default=2048, help='matmul side for the peak')
    ap.add_argument('--profile', action='store_true', help='op-class shares of the train step from a profile')
    ap.add_argument('--dtype', default='float32', help="compute dtype of the DiT and the matmul peak ('bfloat16' on accelerators)")
    ap.add_argument('--attention', default='xla', help="jax.nn.dot_product_attention implementation ('cudnn' on GPU)")
    ap.add_argument('--remat', action='store_true', help='rematerialise the DiT blocks (ModelConfig.remat)')
    ap.add_argument('--fsdp', action='store_true', help='train and memory: the state sharded over every device (FSDP)')
    ap.add_argument('--fsdp-sizes', nargs='*', default=['L/2', 'XL/2'], help='accel: model presets trained with FSDP')
    ap.add_argument('--markdown', type=Path, help='accel: write its section into this Markdown file (e.g. BENCHMARKS.md)')
    ap.add_argument('--out', type=Path, help='also append the JSON records to this file (JSON lines)')
    try: a = ap.parse_args(argv)
    except SystemExit as e: return int(e.code or 0)   # --help, or a usage error (2) already printed
    what = {'peak', 'train', 'online', 'sample', 'memory'} | set(a.what) - {'all'} if 'all' in a.what else set(a.what)

    def emit(rec):
        rec = {**rec, 'machine': machine_info()}
        line = json.dumps(rec, default=float)
        print(line, flush=True)
        if a.out:
            with open(a.out, 'a') as f: f.write(line + '\n')

    if 'accel' in what:
        recs = accel_bench(a.sizes, a.fsdp_sizes, a.batch, a.reps, a.n, a.steps, a.cfg, a.attention, a.remat, log=emit)
        if a.markdown: write_section(a.markdown, accel_markdown(recs, machine_info()))
    peak = None
    if what & {'peak', 'train'}:
        p = matmul_peak(a.peak_n, a.dtype, reps=a.reps); peak = p['flops_per_s']; emit(dict(bench='peak', **p))
    kw = dict(dtype=a.dtype, attention=a.attention, **({'remat': True} if a.remat else {}))
    for size in a.sizes:
        if 'train' in what: emit(dict(bench='train', **kw, **_train_record(size, a.batch, a.reps, peak, a.profile, a.fsdp, **kw)))
        if 'online' in what:
            r = store_vs_online(size, a.online_batch, reps=a.reps, **kw); emit(dict(bench='online', size=size, **kw, **r))
        if 'sample' in what:
            emit(dict(bench='sample', **kw, **sampling_bench(size, a.n, a.steps, a.cfg, reps=a.reps, **kw)))
        if 'memory' in what:
            for b in a.batches: emit(dict(bench='memory', **kw, **train_memory(size, b, a.fsdp, **kw)))
    return 0


# %%
import contextlib, io
buf = io.StringIO()
with contextlib.redirect_stdout(buf): test_eq(bench_cli(['memory', '--sizes', 'mu', '--batches', '4']), 0)
rec = json.loads(buf.getvalue().splitlines()[-1])
test_eq((rec['bench'], rec['size'], rec['batch']), ('memory', 'mu', 4)); assert rec['peak'] > 0 and 'cpu' in rec['machine']
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(bench_cli(['nonsense']), 2)
assert 'invalid choice' in err.getvalue()
