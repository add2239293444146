"""Learning curves of a demo run with and without encoder guidance: every saved checkpoint sampled on validation
classes, read by the demo's judge.

    python bench/guided_curve.py DEMO [--run DEMO/run] [--steps 1100 2200 ...] [--classes 100] [--n 4]
                                 [--guide 0 1] [--from-support T] [--cfg C] [--interval LO HI] [--sample-steps N]
                                 [--json curve.json] [--plot curve.png NAME=JSON ...]

The trainer's own few-shot hook (`val_fs/*`) samples 16 validation classes x 6 without guidance; this samples
`--classes` of them (all 100 by default) x `--n` at the run's CFG, interval and sampler steps, once per `--guide`
scale (t <= GUIDE_UPTO), from each checkpoint's EMA weights, so the guided demo's curve is measured as it samples.
`--from-support T` starts each sample from a support noised to T (SDEdit, as `fsdit sample --from-support`);
`--cfg`, `--interval` and `--sample-steps` replace the run's own sampler settings (to compare runs at one setting).
Each point is appended to `--json` as soon as it is done (a rerun skips the points already there).
`--plot OUT NAME=JSON ...` only draws curves already measured.
"""
import argparse, json, sys, tempfile, time
from pathlib import Path

from fsdit.config import GUIDE_UPTO
from fsdit.eval import evaluate
from fsdit.features import open_store
from fsdit.glyph.demo import demo_summary
from fsdit.glyph.judge import load_judge
from fsdit.run import saved_steps

from class_curve import run_at          # the run as it was at one checkpoint


def point(run, store, judge, split, classes, n, guide, out, from_support=0.0, cfg=None, interval=None, steps=None) -> dict:
    "One point: the run's summary on `classes` of `split` at encoder guidance `guide` (the run's sampler unless given)."
    t0 = time.time()
    cfg = run.tc.cfg_scale if cfg is None else cfg
    res = evaluate(run, store, split=split, seen_split=None, n_per_class=n, shots=(run.tc.shots,), cfg_scales=(cfg,),
                   steps=steps or run.tc.sample_steps, max_real_per_class=None, judge=judge, n_classes=classes, out=out,
                   cfg_interval=tuple(interval or run.tc.cfg_interval), guide_scale=guide, guide_upto=GUIDE_UPTO,
                   from_support=from_support)
    s = demo_summary(res, cfg)[split]
    return dict(step=run.step, guide=guide, from_support=from_support, classes=s['classes'], n=n, seconds=round(time.time() - t0, 1),
                judge_acc=s['model']['judge_acc'], real_judge_acc=s['real']['judge_acc'], glyph_fd=s['model']['glyph_fd'],
                real_glyph_fd=s['real']['glyph_fd'], glyph_kid=s['model'].get('glyph_kid'), mean_judge_acc=s['mean']['judge_acc'],
                nn_support_judge=s['model'].get('nn_support_judge'), real_nn_support_judge=s['real'].get('nn_support_judge'))


def plot(out, curves: dict):
    "Consistency (share of real) and glyph-FD against training steps, guided solid, unguided dashed."
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, pts) in enumerate(curves.items()):
        for g in sorted({p['guide'] for p in pts}):
            ps = sorted((p for p in pts if p['guide'] == g), key=lambda p: p['step'])
            kw = dict(color=f'C{i}', ls='-' if g else '--', marker='o', ms=3, label=f"{name}, guide {g:g}")
            ax[0].plot([p['step'] for p in ps], [100 * p['judge_acc'] / p['real_judge_acc'] for p in ps], **kw)
            ax[1].plot([p['step'] for p in ps], [p['glyph_fd'] / p['real_glyph_fd'] for p in ps], **kw)
    ax[0].axhline(70, color='gray', lw=0.8, ls=':'); ax[1].axhline(3, color='gray', lw=0.8, ls=':')
    ax[0].set(xlabel='training step', ylabel='judge consistency, % of real', title='validation classes')
    ax[1].set(xlabel='training step', ylabel='glyph-FD / real-vs-real floor', yscale='log', title='validation classes')
    ax[0].legend(fontsize=7); fig.tight_layout(); fig.savefig(out, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo', nargs='?')
    ap.add_argument('--run', default=None, help='the run folder (default DEMO/run)')
    ap.add_argument('--steps', type=int, nargs='*', default=None, help='checkpoints (default: every saved one)')
    ap.add_argument('--split', default='val')
    ap.add_argument('--classes', type=int, default=100)
    ap.add_argument('--n', type=int, default=4, help='samples per class')
    ap.add_argument('--guide', type=float, nargs='+', default=[0.0, 1.0])
    ap.add_argument('--from-support', type=float, default=0.0, help='start from a support noised to this t (0: from noise)')
    ap.add_argument('--cfg', type=float, default=None, help="CFG scale (default: the run's)")
    ap.add_argument('--interval', type=float, nargs=2, default=None, help="CFG interval (default: the run's)")
    ap.add_argument('--sample-steps', type=int, default=None, help="Euler steps (default: the run's)")
    ap.add_argument('--json', default=None, help='points file (default DEMO/guided_curve.json)')
    ap.add_argument('--plot', nargs='+', default=None, metavar='OUT NAME=JSON', help='draw measured curves and stop')
    a = ap.parse_args(argv)
    if a.plot:
        out, *named = a.plot
        plot(out, {k: json.loads(Path(v).read_text())['points'] for k, v in (x.split('=', 1) for x in named)})
        print(f"wrote {out}"); return 0
    if not a.demo: ap.error('DEMO is required unless --plot is given')
    d = Path(a.demo); run_dir = Path(a.run) if a.run else d / 'run'
    path = Path(a.json) if a.json else d / 'guided_curve.json'
    doc = json.loads(path.read_text()) if path.exists() else {'run': str(run_dir), 'split': a.split, 'points': []}
    done = {(p['step'], p['guide'], p.get('from_support', 0.0)) for p in doc['points']}   # a point per start, too
    store, judge = open_store(d / 'feats'), load_judge(d / 'judge')
    with tempfile.TemporaryDirectory() as tmp:
        for step in a.steps or saved_steps(run_dir):
            todo = [g for g in a.guide if (step, g, a.from_support) not in done]
            if not todo: continue
            run = run_at(run_dir, step, Path(tmp))
            for g in todo:
                p = point(run, store, judge, a.split, a.classes, a.n, g, Path(tmp) / 'eval', a.from_support, a.cfg,
                          a.interval, a.sample_steps)
                doc['points'].append(p); path.write_text(json.dumps(doc, indent=1))
                print(json.dumps(p), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
