"""Choose the demo's CFG scale on validation classes: the judge's metrics of a demo run at several scales.

    python bench/demo_cfg.py DEMO [--cfg 1 1.5 2 3 4] [--classes 50] [--n 10] [--steps 25] [--method euler] [--out DEMO/eval_val]

Held-out (test) classes are not touched: the scale the demo reports on them is chosen here, on `val`.
"""
import argparse, json, sys
from pathlib import Path

from fsdit.eval import evaluate, JUDGE_METRICS
from fsdit.features import open_store
from fsdit.judge import load_judge
from fsdit.run import load_run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--cfg', type=float, nargs='+', default=[1.0, 1.5, 2.0, 3.0, 4.0])
    ap.add_argument('--classes', type=int, default=50)
    ap.add_argument('--n', type=int, default=10)
    ap.add_argument('--steps', type=int, default=25)
    ap.add_argument('--method', default='euler', choices=['euler', 'heun'])
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    d = Path(a.demo)
    run, store, judge = load_run(d / 'run'), open_store(d / 'feats'), load_judge(d / 'judge')
    res = evaluate(run, store, split='val', seen_split=None, n_per_class=a.n, cfg_scales=a.cfg, steps=a.steps, method=a.method,
                   max_real_per_class=None, judge=judge, n_classes=a.classes, out=a.out or d / 'eval_val')
    rows = [{'method': r['method'], 'cfg': r['cfg'], **{k: round(r[k], 4) for k in JUDGE_METRICS}} for r in res['records']]
    print(json.dumps({'step': run.step, 'cond': run.mc.cond, 'split': 'val', 'steps': a.steps, 'method': a.method, 'rows': rows}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
