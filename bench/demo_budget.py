"""Where `fsdit demo`'s minutes go, and how close its train step comes to the machine's matmul peak.

    python bench/demo_budget.py [--demo DEMO] [--batch 64] [--reps 5] [--out demo_budget.json]

- the matmul peak measured here (float32 2048x2048 matmul, `fsdit.bench.matmul_peak`);
- the demo's train step (its model and batch, float32) as the trainer runs it (`jax.pmap` over the one
  CPU device) and as a plain `jax.jit` of the same step function, interleaved; FLOPs from XLA's cost
  analysis, so each figure is also a fraction of the peak; for the demo's conditioning and the seed's;
- with `--demo DEMO`: the minutes of each stage of that demo run (`DEMO/timings.json`).
"""
import argparse, functools, json, statistics, sys, time
from pathlib import Path

import jax
import numpy as np

from fsdit import bench as B
from fsdit.dit import DiT
from fsdit.state import make_optimizer
from fsdit.steps import train_step
from fsdit.glyph.demo import demo_configs, demo_size
from fsdit.utils import LatentScaling


def jit_runner(mc, batch: int):
    "The trainer's step function under one `jax.jit` (no data axis), warmed; returns (run, flops)."
    tc = demo_configs(demo_size('full'))[1]
    step = jax.jit(functools.partial(train_step, model=DiT(mc), tx=make_optimizer(tc), mc=mc, tc=tc,
                                     scaling=LatentScaling()))
    state, b = B.train_inputs(mc, tc, batch)
    c = step.lower(state, b).compile()
    box = {'state': state}

    def run():
        t0 = time.perf_counter()
        box['state'], m = c(box['state'], b)
        B.block((box['state'], m))
        return time.perf_counter() - t0

    run()
    return run, B.cost(c)['flops']


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--demo', default=None, help='a demo folder whose stage timings to report')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    res = {'machine': B.machine_info(), 'batch': a.batch}
    peak = B.matmul_peak()
    res['matmul_peak_flops_per_s'] = peak['flops_per_s']
    runners, flops = {}, {}
    for cond in ('aligned', 'support'):
        mc = demo_configs(demo_size('full'), cond)[0]
        runners[f'{cond}/pmap'], facts = B.train_runner(mc, a.batch)
        flops[f'{cond}/pmap'] = facts['flops']
        runners[f'{cond}/jit'], flops[f'{cond}/jit'] = jit_runner(mc, a.batch)
    times = B.interleave(runners, a.reps)
    res['train_step'] = {k: {**B.summarize_step(times[k], flops[k], a.batch, peak['flops_per_s']), 'flops': flops[k]}
                         for k in runners}
    peak_after = B.matmul_peak()
    res['matmul_peak_after_flops_per_s'] = peak_after['flops_per_s']
    if a.demo:
        t = Path(a.demo) / 'timings.json'
        res['demo_minutes'] = {k: round(v / 60, 2) for k, v in json.loads(t.read_text()).items()} if t.exists() else None
    text = json.dumps(res, indent=1)
    print(text)
    if a.out: Path(a.out).write_text(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
