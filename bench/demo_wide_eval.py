"""A demo run judged on more classes than the demo's eval (40 per split): held-out and seen, same settings.

    python bench/demo_wide_eval.py DEMO [--classes 200] [--n 10] [--cfg 8] [--interval 0.6 0.9] [--steps 15]
                                        [--guide 0] [--guide-upto 0.7] [--from-support 0]
                                        [--split test] [--out DEMO/eval_wide]

The demo reports 40 held-out and 40 seen classes x 10 images to stay within its minutes. Class consistency
then has a standard error of several points, and glyph-FD's real-vs-real floor is inflated by the small
sample (the Frechet distance of two finite samples is biased upward). This prints the demo's summary
(real, copy, mean, model, model / real) for `--classes` of each split; `--split val` judges validation classes
alone (to choose settings there).
"""
import argparse, json, sys
from pathlib import Path

from fsdit.config import GUIDE_UPTO
from fsdit.glyph.demo import demo_summary, DemoSize
from fsdit.eval import evaluate
from fsdit.features import open_store
from fsdit.glyph.judge import load_judge
from fsdit.run import load_run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--classes', type=int, default=200)
    ap.add_argument('--n', type=int, default=10, help='generated images per class')
    ap.add_argument('--cfg', type=float, default=DemoSize().cfg)
    ap.add_argument('--interval', type=float, nargs=2, default=DemoSize().cfg_interval, help='guidance interval (t)')
    ap.add_argument('--steps', type=int, default=15)
    ap.add_argument('--guide', type=float, default=0.0, help='encoder guidance scale (0: off)')
    ap.add_argument('--guide-upto', type=float, default=GUIDE_UPTO)
    ap.add_argument('--from-support', type=float, default=0.0, help='start at this t from a support, noised (0: from noise)')
    ap.add_argument('--split', default='test', help="'test' (held-out and seen classes) or 'val' (validation classes only)")
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    d = Path(a.demo)
    run, store, judge = load_run(d / 'run'), open_store(d / 'feats'), load_judge(d / 'judge')
    res = evaluate(run, store, split=a.split, seen_split='train' if a.split == 'test' else None, n_per_class=a.n, shots=(run.tc.shots,),
                   cfg_scales=(a.cfg,), steps=a.steps, max_real_per_class=None, judge=judge, n_classes=a.classes,
                   out=a.out or d / 'eval_wide', cfg_interval=a.interval, guide_scale=a.guide, guide_upto=a.guide_upto,
                   from_support=a.from_support)
    print(json.dumps({'step': run.step, 'cond': run.mc.cond, 'cfg': a.cfg, 'cfg_interval': list(a.interval), 'steps': a.steps,
                      'guide': a.guide, 'guide_upto': a.guide_upto, 'from_support': a.from_support, **demo_summary(res, a.cfg)}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
