"""Choose the demo's guidance on validation classes: the judge's metrics of a demo run at several CFG scales and
guidance intervals.

    python bench/demo_cfg.py DEMO [--cfg 1 1.5 2 3 4] [--start 0 0.6] [--end 1] [--classes 50] [--n 10] [--steps 15]
                                  [--method euler] [--out DEMO/eval_val]

Every scale is tried with guidance over [start, end] for every `--start` (t=0 noise, t=1 data; 0 = all along the
path). Held-out (test) classes are not touched: the setting the demo reports on them is chosen here, on `val`.
"""
import argparse, json, sys
from pathlib import Path

from fsdit.eval import evaluate
from fsdit.features import open_store
from fsdit.glyph.judge import JUDGE_METRICS, load_judge
from fsdit.run import load_run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--cfg', type=float, nargs='+', default=[1.0, 1.5, 2.0, 3.0, 4.0])
    ap.add_argument('--start', type=float, nargs='+', default=[0.0], help='guidance interval starts (t)')
    ap.add_argument('--end', type=float, default=1.0, help='guidance interval end (t)')
    ap.add_argument('--classes', type=int, default=50)
    ap.add_argument('--n', type=int, default=10)
    ap.add_argument('--steps', type=int, default=15)
    ap.add_argument('--method', default='euler', choices=['euler', 'heun'])
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    d = Path(a.demo)
    run, store, judge = load_run(d / 'run'), open_store(d / 'feats'), load_judge(d / 'judge')
    rows, real = [], None
    for start in a.start:
        out = Path(a.out or d / 'eval_val') / f'from_{start:g}'
        res = evaluate(run, store, split='val', seen_split=None, n_per_class=a.n, cfg_scales=a.cfg, steps=a.steps,
                       method=a.method, max_real_per_class=None, judge=judge, n_classes=a.classes, out=out,
                       cfg_interval=(start, a.end))
        for r in res['records']:
            m = {k: round(r[k], 4) for k in JUDGE_METRICS}
            if r['method'] == 'real': real = m
            if r['method'] == 'model':
                rows.append({'cfg': r['cfg'], 'interval': [start, a.end], **m,
                             'vs_real': {k: round(r[k] / real[k], 3) for k in ('judge_acc', 'glyph_fd')}})
        print(json.dumps(rows[-len(a.cfg):]), flush=True)
    print(json.dumps({'step': run.step, 'cond': run.mc.cond, 'split': 'val', 'steps': a.steps, 'method': a.method,
                      'real': real, 'rows': rows}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
