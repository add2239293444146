"""Is the paper clean? The share of paper pixels that are slightly off the paper colour, in real images and in samples.

    python bench/speckle.py DEMO [--run RUN] [--split test] [--classes 40] [--n 8] [--cfg 8] [--interval 0.6 1] [--steps 15 50] [--method euler]
                                 [--raw] [--out DEMO/speckle.json] [--grid DEMO/speckle_grid.png]

A glyph sits on a flat paper: away from the strokes every pixel is the paper's colour, and only the antialiased
edge of a stroke takes values in between. Grey speckle is the opposite: paper pixels a few levels off. For each
image the paper is the median colour of its border; a pixel is paper when it is within 64 levels of it (farther
is ink or stroke edge); `speckle` is the share of paper pixels more than 6 levels away (about 2.5% of the range),
`paper_rms` their RMS distance from the paper colour. Each sampling setting is drawn on the same held-out
episodes; `--raw` samples the run's raw (not EMA) parameters too.
"""
import argparse, json, sys
from pathlib import Path

import numpy as np

from fsdit.codecs import run_codecs
from fsdit.eval import class_set, draw_episodes
from fsdit.features import open_store
from fsdit.images import to_uint8, save_png
from fsdit.run import load_run
from fsdit.sampler import generate


def paper_stats(u8: np.ndarray, near: int = 64, off: int = 6) -> dict:
    "speckle and paper_rms of uint8 images (N, H, W, C) (see the module's docstring)."
    x = u8.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)        # (N, 4S, C)
    paper = np.median(border, axis=1)[:, None, None]                                       # (N, 1, 1, C)
    d = np.abs(x - paper).max(-1)                                                          # (N, H, W)
    is_paper = d <= near
    return {'speckle': float(((d > off) & is_paper).sum() / is_paper.sum()),
            'paper_rms': float(np.sqrt((d[is_paper] ** 2).mean()))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--split', default='test', help="the classes' split ('val' to choose settings)")
    ap.add_argument('--classes', type=int, default=40)
    ap.add_argument('--n', type=int, default=8)
    ap.add_argument('--cfg', type=float, nargs='+', default=[8.0])
    ap.add_argument('--interval', type=float, nargs=2, default=[0.6, 0.9])
    ap.add_argument('--steps', type=int, nargs='+', default=[15, 50])
    ap.add_argument('--method', default='euler', choices=('euler', 'heun'))
    ap.add_argument('--raw', action='store_true', help='also sample the raw (not EMA) parameters')
    ap.add_argument('--run', default=None, help="a run trained on DEMO's store (default DEMO/run)")
    ap.add_argument('--out', default=None); ap.add_argument('--grid', default=None)
    a = ap.parse_args(argv)
    d = Path(a.demo)
    store = open_store(d / 'feats')
    run_dir = Path(a.run) if a.run else d / 'run'
    runs = {'ema': load_run(run_dir)}
    if a.raw: runs['raw'] = load_run(run_dir, ema=False)
    codecs = run_codecs(runs['ema'], store.path)
    cs = class_set(store, a.split, None, a.classes)
    sup, held, lab = draw_episodes(cs.labels, a.n, runs['ema'].tc.shots, seed=1)
    real = to_uint8(codecs.decode(cs.latents[held]), rgb=True)
    res, rows = {'real': paper_stats(real)}, [real[:16]]
    for which, run in runs.items():
        for cfg in a.cfg:
            for steps in a.steps:
                lat = generate(run.params, run.mc, cs.embeds[sup], cs.latents[sup], scaling=run.scaling, seed=0,
                               steps=steps, cfg_scale=cfg, method=a.method, cfg_interval=tuple(a.interval))
                u8 = to_uint8(codecs.decode(np.asarray(lat)), rgb=True)
                key = f"{which} cfg {cfg:g} over [{a.interval[0]:g}, {a.interval[1]:g}] steps {steps}"
                res[key] = paper_stats(u8); rows.append(u8[:16])
                print(key, res[key], flush=True)
    print('real', res['real'])
    Path(a.out or d / 'speckle.json').write_text(json.dumps(res, indent=1))
    g = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)                   # a row per setting, real first
    save_png(np.kron(g, np.ones((4, 4, 1), np.uint8)), a.grid or d / 'speckle_grid.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
