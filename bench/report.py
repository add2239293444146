"""Markdown tables from the JSON lines that `fsdit bench ... --out F` and `bench/compare_original.py --out F` write.

    python bench/report.py results.jsonl [more.jsonl ...]

One table per kind of record (compare, train, online, sample, memory, peak), rows in file order, each with
the load average and time it was measured at.
"""
from __future__ import annotations
import json, sys
from pathlib import Path

G = 1e9


def _load(m: dict) -> str: return f"{m['load'][0]:.1f}" if m.get('load') else '?'


def _when(m: dict) -> str: return m.get('time', '?')[11:16]


def table(head: list[str], rows: list[list]) -> str:
    return '\n'.join(['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] +
                     ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows])


def compare(recs):
    return table(['size', 'impl', 'params', 'GFLOP/sample', 'step s median (min-max, n)', 'samples/s', 'GFLOP/s',
                  'of matmul peak', 'peak GFLOP/s', 'memory peak GB', 'load', 'UTC'],
                 [[r['size'], r['impl'], f"{r['params']:,}", f"{r['flops_per_sample'] / G:.1f}",
                   f"{r['step_s']:.2f} ({r['step_min_s']:.2f}-{r['step_max_s']:.2f}, {r['reps']})",
                   f"{r['samples_per_s']:.2f}", f"{r['flops_per_s'] / G:.1f}", f"{r['mfu']:.0%}",
                   f"{r['peak_flops_per_s'] / G:.0f}", f"{r['memory']['peak'] / G:.2f}",
                   _load(r['machine']), _when(r['machine'])] for r in recs])


def profile(recs):
    rows = []
    for r in recs:
        p = r.get('profile')
        if not p: continue
        sh = p['shares']
        rows.append([r['size'], r.get('impl', 'ours'), f"{r.get('dot_flops_share', float('nan')):.1%}"] +
                    [f"{sh.get(k, 0):.1%}" for k in ('matmul/conv', 'elementwise', 'reduction', 'data movement')])
    return table(['size', 'impl', 'FLOPs in dots', 'matmul/conv', 'elementwise', 'reduction', 'data movement'], rows)


def train(recs):
    return table(['size', 'batch', 'params', 'GFLOP/sample', 'step s median (min-max, n)', 'samples/s', 'GFLOP/s',
                  'of matmul peak', 'load', 'UTC'],
                 [[r['size'], r['batch'], f"{r['params']:,}", f"{r['flops_per_sample'] / G:.1f}",
                   f"{r['step_s']:.2f} ({r['step_min_s']:.2f}-{r['step_max_s']:.2f}, {r['reps']})",
                   f"{r['samples_per_s']:.2f}", f"{r['flops_per_s'] / G:.1f}", f"{r.get('mfu', float('nan')):.0%}",
                   _load(r['machine']), _when(r['machine'])] for r in recs])


def online(recs):
    rows = []
    for r in recs:
        f, s, fs = r['flops_per_sample'], r['median_s'], r['flops_per_s']
        rows.append([r['size'], r['batch'], f"{f['store'] / G:.1f}", f"{f['siglip'] / G:.1f}", f"{f['vae'] / G:.1f}",
                     f"{r['predicted_ratio']:.2f}", f"{r['measured_ratio']:.2f}", f"{r['pieces_ratio']:.2f}",
                     f"{s['store']:.2f} / {s['siglip']:.2f} / {s['vae']:.2f} / {s['online']:.2f}",
                     f"{fs['store'] / G:.0f} / {fs['siglip'] / G:.0f} / {fs['vae'] / G:.0f}",
                     _load(r['machine']), _when(r['machine'])])
    return table(['size', 'batch', 'GFLOP/sample step', 'SigLIP (5 supports)', 'VAE enc', 'predicted ratio (FLOPs)',
                  'measured ratio', 'ratio from pieces', 's: store / SigLIP / VAE / online', 'GFLOP/s: step / SigLIP / VAE',
                  'load', 'UTC'], rows)


def sample(recs):
    return table(['size', 'images', 'steps timed', 'loop s', 'one step s', 'images/s (50 steps)', 'loop overhead',
                  'GFLOP/step', 'GFLOP/s', 'load', 'UTC'],
                 [[r['size'], r['n'], r['steps'], f"{r['loop_s']:.3f}", f"{r['step_s']:.4f}", f"{r['images_per_s_at_50']:.3g}",
                   f"{r['overhead']:+.1%}", f"{r['flops_per_step'] / G:.2f}", f"{r['flops_per_s'] / G:.1f}",
                   _load(r['machine']), _when(r['machine'])] for r in recs])


def memory(recs):
    return table(['size', 'batch/device', 'arguments GB', 'outputs GB', 'aliased (donated) GB', 'temporaries GB', 'peak GB'],
                 [[r['size'], r['batch'], *(f"{r[k] / G:.2f}" for k in ('argument', 'output', 'alias', 'temp', 'peak'))]
                  for r in recs])


def peak(recs):
    return table(['n', 'dtype', 'median GFLOP/s', 'best GFLOP/s', 'load', 'UTC'],
                 [[r['n'], r['dtype'], f"{r['flops_per_s'] / G:.1f}", f"{r['best_flops_per_s'] / G:.1f}",
                   _load(r['machine']), _when(r['machine'])] for r in recs])


def main(paths: list[str]) -> int:
    recs = [json.loads(l) for p in paths for l in Path(p).read_text().splitlines() if l.strip()]
    by = {}
    for r in recs: by.setdefault(r['bench'], []).append(r)
    for kind, fn in (('compare', compare), ('train', train), ('online', online), ('sample', sample),
                     ('memory', memory), ('peak', peak)):
        if kind in by:
            print(f"### {kind}\n\n{fn(by[kind])}\n")
    prof = [r for r in by.get('compare', []) + by.get('train', []) if r.get('profile')]
    if prof: print(f"### op classes (share of profiled thread time)\n\n{profile(prof)}\n")
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
