# %% [markdown]
# # Benchmarks: the train step measured
#
# > The pieces every benchmark stands on: the machine a figure was measured on, where a compiled program's time goes, the trainer's own step compiled, run and summarised, and its memory per device.
#
# `fsdit.bench` (`13_bench`) runs the benchmarks at full size and re-exports every name defined here, so
# `from fsdit.bench import train_memory` and `fsdit.bench.train_runner` work as they always have. The same
# rules hold: every timed call is waited for and compiled beforehand, FLOPs come from XLA's cost analysis of
# the compiled program, and things to compare are timed interleaved. Each function is shown on the `mu`
# model so that this notebook runs in seconds.

# %%
#| default_exp bench_step

# %%
#| export
from __future__ import annotations
import collections, functools, glob, os, platform, re, tempfile, time
from typing import Any, Callable

import numpy as np
import jax

from fsdit.config import ModelConfig, TrainConfig, model_config, train_config
from fsdit.state import create_state
from fsdit.steps import make_train_step, layout_for, state_shardings
from fsdit.testing import synthetic_batch
from fsdit.perf import block, stats, compiled, cost, memory
from fsdit.utils import CLIError, LatentScaling

SD_VAE_SCALE = 0.18215   # the SD-VAE's scaling factor: the latent scale of the benchmarked steps (speed does not depend on it)

# %%
from fastcore.test import test_eq, test_close, test_fail
from fsdit.perf import matmul_peak
import jax.numpy as jnp


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


# %%
_small = compiled(jax.jit(lambda a, b: jnp.tanh(a @ b).sum()), jnp.ones((2, 3)), jnp.ones((3, 4)))
_ins = hlo_instructions(_small.as_text())
assert 'parameter' in {i['op'] for i in _ins.values()}
assert 'matmul/conv' in op_classes(_ins).values()


# %% [markdown]
# XLA's FLOP count is checked against the dots' own count, and a profile's events are summed per class:

# %%
#| export
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
    return compiled(make_train_step(mc, tc, LatentScaling(SD_VAE_SCALE), layout, donate), state, b), tc


def random_like(shapes, seed: int = 0, scale: float = 0.02):
    "Arrays of the given shapes drawn from N(0, scale) with numpy (no XLA compilation)."
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * r.standard_normal(s.shape)).astype(s.dtype), shapes)


# %%
_mc = _model('mu')
test_eq((_mc, _size_name('mu'), _size_name(_mc)), (model_config('mu'), 'mu', 'custom'))
_exe, _tc = train_step_exe(_mc, 4, None, False)     # compiled from shapes; `train_runner('mu', batch=4)` below reuses it
test_eq(_tc.batch_size, 4 * jax.device_count())
_r = random_like({'w': jax.ShapeDtypeStruct((3, 2), jnp.float32)})
test_eq((_r['w'].shape, _r['w'].dtype), ((3, 2), np.float32))


# %% [markdown]
# Inputs in the trainer's layout, a runner that times one step, interleaved rounds and their summary:

# %%
#| export
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
