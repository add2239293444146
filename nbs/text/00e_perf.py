# %% [markdown]
# # Performance counters
#
# > What a compiled program costs and what the device can do: XLA's FLOP and memory counts, waited-for timings, the bf16 peak of each accelerator and the CPU's measured matmul peak — so that the trainer reports its MFU and the benchmarks compare with the same numbers.

# %%
#| default_exp perf

# %%
#| export
from __future__ import annotations
import functools, statistics, time
from typing import Callable

import jax, jax.numpy as jnp

# %%
from fastcore.test import test_eq, test_close


# %% [markdown]
# ## Timing, FLOPs and memory of a compiled program
#
# `time_calls` waits for every call; `compiled` gives the XLA executable of a function ahead of time,
# so compilation never lands in a timing, and that executable answers both questions XLA can answer
# without running it: how many FLOPs (`cost`) and how many bytes (`memory`: arguments, outputs,
# donated-and-reused buffers, temporaries; peak = arguments + outputs - aliased + temporaries). For a
# program partitioned over several devices (`jax.jit` with shardings) both are per device.

# %%
#| export
def block(tree):
    "Wait until every array in `tree` is computed."
    return jax.block_until_ready(tree)


def time_calls(fn: Callable, *args, reps: int = 3, warmup: int = 1) -> list[float]:
    "Wall seconds of `reps` calls of `fn(*args)`, each waited for, after `warmup` untimed calls."
    for _ in range(warmup): block(fn(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter(); block(fn(*args)); out.append(time.perf_counter() - t0)
    return out


def stats(ts: list[float]) -> dict:
    "Median, min and max of a list of timings (seconds)."
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), n=len(ts))


def compiled(fn: Callable, *args, **kwargs):
    "The compiled XLA executable of `fn(*args)` (`fn` is jit-wrapped unless it is already a jit/pmap function)."
    f = fn if hasattr(fn, 'lower') else jax.jit(fn)
    return f.lower(*args, **kwargs).compile()


def cost(c) -> dict:
    "FLOPs, bytes accessed and transcendentals of an executable (per device), from XLA's cost analysis."
    ca = c.cost_analysis()
    if isinstance(ca, (list, tuple)): ca = ca[0] if ca else {}  # older JAX returned one dict per module
    ca = ca or {}
    return {k: float(ca.get(src, 0.0)) for k, src in
            (('flops', 'flops'), ('bytes', 'bytes accessed'), ('transcendentals', 'transcendentals'))}


def memory(c) -> dict:
    "Bytes XLA plans for an executable (per device): argument, output, alias (donated and reused), temp, and their peak."
    m = c.memory_analysis()
    d = {k: int(getattr(m, f'{k}_size_in_bytes', 0) or 0) for k in ('argument', 'output', 'alias', 'temp')}
    d['peak'] = d['argument'] + d['output'] - d['alias'] + d['temp']
    return d


# %% [markdown]
# A matmul of two `(n, n)` matrices costs $2n^3$ FLOPs, and XLA counts exactly that; its timings are
# waited for:

# %%
a = jnp.ones((64, 64))
c = compiled(jnp.dot, a, a)
test_eq(cost(c)['flops'], 2 * 64 ** 3)
m = memory(c)
test_eq((m['argument'], m['output']), (2 * 64 * 64 * 4, 64 * 64 * 4))
assert m['peak'] >= m['argument'] + m['output']
ts = time_calls(c, a, a, reps=3)
assert len(ts) == 3 and all(t > 0 for t in ts) and stats(ts)['min'] <= stats(ts)['median'] <= stats(ts)['max']

# %% [markdown]
# ## The device's peak
#
# MFU (model FLOPs utilisation) is a program's FLOP/s over what the device can do. For accelerators that
# is the datasheet's dense bfloat16 peak per chip (`PEAK_TFLOPS`, matched on JAX's `device_kind`). A CPU has
# no such number worth quoting: its reference is a large matmul in the same dtype, timed on these cores at
# this moment (load included) — what the BLAS-like kernels XLA calls reach. Simulated CPU devices
# (`--xla_force_host_platform_device_count`) share the cores, so each gets its share of that peak.

# %%
#| export
PEAK_TFLOPS = {   # dense bfloat16 TFLOP/s per chip; the first key contained in `device_kind` wins
    'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v5': 459.0, 'TPU v6 lite': 918.0, 'TPU v6e': 918.0,
    'TPU v4': 275.0, 'H200': 989.0, 'H100': 989.0, 'A100': 312.0,
}


def matmul_peak(n: int = 2048, dtype: str = 'float32', reps: int = 5) -> dict:
    "Measured FLOP/s of an `(n, n) @ (n, n)` matmul in `dtype`: median and best of `reps` timed calls."
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(k1, (n, n), dtype), jax.random.normal(k2, (n, n), dtype)
    ts = time_calls(compiled(jnp.dot, a, b), a, b, reps=reps)
    flops = 2.0 * n ** 3
    return dict(n=n, dtype=dtype, flops=flops, seconds=ts, flops_per_s=flops / statistics.median(ts),
                best_flops_per_s=flops / min(ts))


def table_peak(device_kind: str) -> float | None:
    "The datasheet bf16 peak (FLOP/s) of a device kind, or None when it is not in `PEAK_TFLOPS`."
    for k, v in PEAK_TFLOPS.items():
        if k.lower() in device_kind.lower(): return v * 1e12
    return None


@functools.lru_cache(maxsize=None)
def device_peak(n: int = 1024) -> tuple[float | None, str]:
    "(peak FLOP/s per local device, where it comes from): the table for accelerators, a measured matmul on the CPU."
    dev = jax.local_devices()[0]
    if dev.platform != 'cpu':
        p = table_peak(dev.device_kind)
        return p, (f"bf16 datasheet peak of {dev.device_kind}" if p else f"{dev.device_kind}: not in PEAK_TFLOPS")
    p = matmul_peak(n, reps=3)['best_flops_per_s'] / jax.local_device_count()
    return p, f"float32 {n}x{n} matmul measured on the CPU, shared by {jax.local_device_count()} device(s)"


def mfu(flops_per_step: float, step_s: float, peak: float | None) -> dict:
    "TFLOP/s per device and MFU of a step that costs `flops_per_step` FLOPs per device and takes `step_s` seconds."
    tflops = flops_per_step / step_s / 1e12
    return {'tflops_per_device': tflops, **({'mfu': tflops * 1e12 / peak} if peak else {})}


# %% [markdown]
# The table answers for the chips researchers train on; a device it does not know has no peak (MFU is then
# not reported rather than made up). On this machine the peak is measured, once per process; a step
# that reaches it exactly has MFU 1:

# %%
test_eq(table_peak('TPU v5 lite'), 197e12); test_eq(table_peak('NVIDIA H100 80GB HBM3'), 989e12)
test_eq(table_peak('TPU v5p'), 459e12); test_eq(table_peak('Imaginary v1'), None)
peak, where = device_peak()
assert peak > 0 and ('measured' in where or 'datasheet' in where)
assert device_peak() == (peak, where)           # measured once
test_close(mfu(2e12, 1.0, 4e12)['mfu'], 0.5); test_eq(mfu(2e12, 1.0, None), {'tflops_per_device': 2.0})
pk = matmul_peak(256, reps=3)
assert pk['best_flops_per_s'] >= pk['flops_per_s'] > 0 and pk['flops'] == 2 * 256 ** 3
