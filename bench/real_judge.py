"""Do the samples look like the data? A plain CNN trained only on the dataset's own real images reads a demo run's samples.

    python bench/real_judge.py DEMO [--classes 200] [--n 10] [--epochs 30] [--augment] [--guide S --guide-upto U] [--from-support T] [--out DEMO/eval_realjudge.json]
    python bench/real_judge.py DEMO --augment --epochs 80 --split val --setting 8,0.6,0.9 --setting 4,0.6,0.9,30 [--raw]

The demo's judge learns from fresh renderings, so it is tolerant of whatever a renderer can draw. This reader
has seen nothing but the dataset: half of every class's images (all splits: a reader must know a class to
read it), the other half held back. Its accuracy on those unseen real images is the reference; its class
consistency on the model's samples (each read as its supports' class), on held-out and seen classes, is
compared with it. Samples drawn with the demo's guidance and sampler steps.

`--split val` with one or more `--setting SCALE,LO,HI[,STEPS]` (guidance scale, the part of the path it acts on,
sampler steps) reads each setting's samples on validation classes with the one reader, to choose a setting there;
`--raw` samples the run's raw parameters instead of their EMA.

`--augment` moves, scales, turns and recolours the reader's real images at every step (no new renderings): with
ten unaligned images a class a plain CNN does not learn these characters otherwise.
"""
import argparse, json, sys, time
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates

from fsdit.config import GUIDE_UPTO
from fsdit.data import SPLITS, list_classes, list_images, load_image
from fsdit.glyph.demo import demo_summary
from fsdit.eval import evaluate
from fsdit.features import open_store
from fsdit.glyph.data import glyph_char
from fsdit.glyph.judge import fit_judge, judge_accuracy
from fsdit.run import load_run


def real_images(split_dir: Path):
    "Gray images (N, S, S, 1) in [-1, 1], labels into the sorted class names of every split, their split, and the names."
    names = sorted(c for sp in SPLITS for c in list_classes(split_dir / sp))
    index = {n: i for i, n in enumerate(names)}
    X, y, where = [], [], []
    for sp in SPLITS:
        for c in list_classes(split_dir / sp):
            for f in list_images(split_dir / sp / c):
                X.append(load_image(f).astype(np.float32).mean(-1)); y.append(index[c]); where.append(sp)
    return (np.stack(X) / 127.5 - 1)[..., None], np.array(y), np.array(where), names


def augment(x, rng, shift=0.15, scale=(0.8, 1.25), turn=20.0):
    """Each gray image (B, S, S, 1) in [-1, 1] moved by up to `shift` of the side, scaled, turned up to `turn` degrees
    (edges extended: the paper continues), then its ink and paper brightness redrawn: contrast 0.5-1, offset, inverted
    half the time (unaligned ink may be lighter or darker than its paper)."""
    B, S = x.shape[0], x.shape[1]
    a, k = np.deg2rad(rng.uniform(-turn, turn, B)), 1 / rng.uniform(*scale, B)       # output -> input coordinates
    t = rng.uniform(-shift, shift, (B, 2)) * S
    c = (S - 1) / 2
    yy, xx = np.meshgrid(np.arange(S) - c, np.arange(S) - c, indexing='ij')
    cos, sin = (np.cos(a) * k)[:, None, None], (np.sin(a) * k)[:, None, None]
    ys = cos * yy - sin * xx + c - t[:, 0, None, None]
    xs = sin * yy + cos * xx + c - t[:, 1, None, None]
    bs = np.broadcast_to(np.arange(B)[:, None, None], ys.shape).astype(np.float64)
    out = map_coordinates(x[..., 0], [bs, ys, xs], order=1, mode='nearest')
    sign = np.where(rng.random(B) < 0.5, -1.0, 1.0) * rng.uniform(0.5, 1.0, B)
    out = out * sign[:, None, None] + rng.uniform(-0.3, 0.3, B)[:, None, None]
    return np.clip(out, -1, 1)[..., None].astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--classes', type=int, default=200)
    ap.add_argument('--n', type=int, default=10, help='generated images per class')
    ap.add_argument('--epochs', type=int, default=30)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--augment', action='store_true', help="move, scale, turn and recolour the reader's real images")
    ap.add_argument('--real-only', action='store_true', help='fit and measure the reader on real images only (no samples)')
    ap.add_argument('--guide', type=float, default=None, help="encoder guidance scale (default: the demo summary's, else 0)")
    ap.add_argument('--guide-upto', type=float, default=None)
    ap.add_argument('--from-support', type=float, default=None, help="start from a support, noised (default: the demo summary's, else 0)")
    ap.add_argument('--split', default='test', help="'test' (held-out and seen classes) or 'val' (validation classes only)")
    ap.add_argument('--setting', action='append', default=None, metavar='SCALE,LO,HI[,STEPS]',
                    help="guidance scale, interval and sampler steps to read (repeatable; default: the demo's)")
    ap.add_argument('--raw', action='store_true', help="sample the raw parameters, not their EMA")
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    d = Path(a.demo); t0 = time.time()
    X, y, where, names = real_images(d / 'split')
    rng = np.random.default_rng(a.seed)
    train = np.zeros(len(y), bool)
    for c in np.unique(y):
        m = rng.permutation(np.flatnonzero(y == c)); train[m[: len(m) // 2]] = True
    chars = ''.join(glyph_char(n) for n in names)
    reader = fit_judge(X[train], y[train], chars, X.shape[1], epochs=a.epochs, batch_size=128, seed=a.seed,
                       augment=augment if a.augment else None)
    real = {sp: judge_accuracy(reader(X[~train & (where == sp)])[0], y[~train & (where == sp)]) for sp in ('test', 'train')}
    if a.real_only:
        print(json.dumps({'augment': a.augment, 'epochs': a.epochs, 'real_unseen': real, 'seconds': round(time.time() - t0)}))
        return 0
    run, store = load_run(d / 'run', ema=not a.raw), open_store(d / 'feats')
    demo = json.loads((d / 'summary.json').read_text()) if (d / 'summary.json').exists() else \
        {'cfg': run.tc.cfg_scale, 'sample_steps': run.tc.sample_steps, 'cfg_interval': run.tc.cfg_interval}
    guide, upto = demo.get('guide', [0.0, GUIDE_UPTO])
    guide, upto = (guide if a.guide is None else a.guide), (upto if a.guide_upto is None else a.guide_upto)
    start = demo.get('from_support', 0.0) if a.from_support is None else a.from_support
    settings = [tuple(float(v) for v in st.split(',')) for st in a.setting] if a.setting else \
        [(demo['cfg'], *demo['cfg_interval'])]
    if any(len(st) not in (3, 4) for st in settings):
        ap.error("--setting takes SCALE,LO,HI or SCALE,LO,HI,STEPS, e.g. --setting 8,0.6,0.9")
    settings = [(*st[:3], int(st[3]) if len(st) == 4 else demo['sample_steps']) for st in settings]
    splits = ('test', 'train') if a.split == 'test' else (a.split,)
    if a.split != 'test':
        m = ~train & (where == a.split)
        real[a.split] = judge_accuracy(reader(X[m])[0], y[m])
    rows = []
    for scale, lo, hi, steps in settings:
        res = evaluate(run, store, split=a.split, seen_split=(splits[1:] or [None])[0], n_per_class=a.n,
                       shots=(run.tc.shots,), cfg_scales=(scale,), steps=steps, max_real_per_class=None, judge=reader,
                       n_classes=a.classes, cfg_interval=(lo, hi), guide_scale=guide, guide_upto=upto, from_support=start)
        summ = demo_summary(res, scale)
        row = {'cfg': scale, 'cfg_interval': [lo, hi], 'steps': steps,
               **{sp: {'real_unseen': real[sp], 'model': summ[sp]['model']['judge_acc'], 'mean': summ[sp]['mean']['judge_acc'],
                       'model_vs_real': summ[sp]['model']['judge_acc'] / real[sp],
                       'glyph_fd': summ[sp]['model']['glyph_fd'], 'real_glyph_fd': summ[sp]['real']['glyph_fd']}
                   for sp in splits}}
        print(json.dumps(row), flush=True); rows.append(row)
    out = {'step': run.step, 'cond': run.mc.cond, 'guide': [guide, upto], 'from_support': start, 'classes': a.classes, 'epochs': a.epochs,
           'augment': a.augment, 'split': a.split, 'ema': not a.raw, 'seconds': round(time.time() - t0)}
    out.update(rows[0] if len(rows) == 1 else {'settings': rows})
    print(json.dumps(out, indent=1))
    Path(a.out or d / 'eval_realjudge.json').write_text(json.dumps(out, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
