# %% [markdown]
# # fsdit bench
#
# > The `fsdit bench` command: the benchmarks of `fsdit.bench` at full size, one JSON record each.
#
# `fsdit bench <what> [--sizes S/2 B/2] ...` runs the benchmarks of `fsdit.bench` at full size and prints (and with
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
#| default_exp commands.bench

# %%
#| export
from __future__ import annotations
import argparse, json
from pathlib import Path
from typing import Callable

from fsdit.bench import accel_bench, accel_markdown, write_section, store_vs_online, sampling_bench, train_record
from fsdit.bench_step import machine_info, train_memory
from fsdit.perf import matmul_peak

# %%
import contextlib, io
from fastcore.test import test_eq


# %%
#| export
def bench_parser() -> argparse.ArgumentParser:
    "The options of `fsdit bench` (see the table above)."
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
    return ap


# %%
_a = bench_parser().parse_args(['train', '--sizes', 'mu', '--fsdp'])
test_eq((_a.what, _a.sizes, _a.fsdp, _a.batch, _a.dtype), (['train'], ['mu'], True, 16, 'float32'))


# %% [markdown]
# Running the benchmarks the options name, and the command:

# %%
#| export
def run_benches(a: argparse.Namespace, emit: Callable[[dict], None]):
    "Run the benchmarks that the parsed options `a` name, passing each record to `emit`."
    what = {'peak', 'train', 'online', 'sample', 'memory'} | set(a.what) - {'all'} if 'all' in a.what else set(a.what)
    if 'accel' in what:
        recs = accel_bench(a.sizes, a.fsdp_sizes, a.batch, a.reps, a.n, a.steps, a.cfg, a.attention, a.remat, log=emit)
        if a.markdown: write_section(a.markdown, accel_markdown(recs, machine_info()))
    peak = None
    if what & {'peak', 'train'}:
        p = matmul_peak(a.peak_n, a.dtype, reps=a.reps); peak = p['flops_per_s']; emit(dict(bench='peak', **p))
    kw = dict(dtype=a.dtype, attention=a.attention, **({'remat': True} if a.remat else {}))
    for size in a.sizes:
        if 'train' in what: emit(dict(bench='train', **kw, **train_record(size, a.batch, a.reps, peak, a.profile, a.fsdp, **kw)))
        if 'online' in what:
            r = store_vs_online(size, a.online_batch, reps=a.reps, **kw); emit(dict(bench='online', size=size, **kw, **r))
        if 'sample' in what:
            emit(dict(bench='sample', **kw, **sampling_bench(size, a.n, a.steps, a.cfg, reps=a.reps, **kw)))
        if 'memory' in what:
            for b in a.batches: emit(dict(bench='memory', **kw, **train_memory(size, b, a.fsdp, **kw)))


def bench_cli(argv: list[str] | None = None) -> int:
    "`fsdit bench`: run benchmarks and print JSON records (see the table above)."
    try: a = bench_parser().parse_args(argv)
    except SystemExit as e: return int(e.code or 0)   # --help, or a usage error (2) already printed

    def emit(rec):
        rec = {**rec, 'machine': machine_info()}
        line = json.dumps(rec, default=float)
        print(line, flush=True)
        if a.out:
            with open(a.out, 'a') as f: f.write(line + '\n')

    run_benches(a, emit)
    return 0


# %%
import contextlib, io
buf = io.StringIO()
with contextlib.redirect_stdout(buf): test_eq(bench_cli(['memory', '--sizes', 'mu', '--batches', '4']), 0)
rec = json.loads(buf.getvalue().splitlines()[-1])
test_eq((rec['bench'], rec['size'], rec['batch']), ('memory', 'mu', 4)); assert rec['peak'] > 0 and 'cpu' in rec['machine']
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(bench_cli(['nonsense']), 2)
assert 'invalid choice' in err.getvalue()
test_eq((bench_parser().parse_args(['all']).sizes, bench_parser().parse_args(['peak', '--peak-n', '64']).peak_n), (['S/2', 'B/2'], 64))
