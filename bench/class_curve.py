"""Can the generator draw the classes it trains on? Judge consistency of a class-conditioned run at each checkpoint.

    python bench/class_curve.py RUN JUDGE OUT [--n 10] [--cfg 8] [--interval 0.6 0.9] [--steps 15]

RUN is a run trained with `cond='class'` (`bench/unaligned_factors.py ... --set cond=class model.num_classes=N`), whose
store names its training classes (RUN/../split/train); JUDGE a glyph judge folder (DEMO/judge). For every checkpoint
RUN keeps, `--n` samples of each training class are drawn by label (no supports) at CFG `--cfg` over `--interval`,
decoded through the run's codecs (the VAE of its store, or the pixels) and read by the judge. This separates the two
halves of few-shot generation: a model that cannot draw the classes it was given by label cannot draw them from
supports either. Rows go to OUT/curve.json and the grids (a row per class, enlarged 4x) to OUT/class_STEP.png.
"""
import argparse, json, shutil, sys, tempfile
from pathlib import Path

import numpy as np

from fsdit.codecs import run_codecs
from fsdit.data import list_classes
from fsdit.glyph.judge import load_judge
from fsdit.images import save_png
from fsdit.run import load_run, saved_steps
from fsdit.sampler import generate


def run_at(run_dir: Path, step: int, tmp: Path):
    "The run as it was at checkpoint `step` (a copy of its config and that checkpoint only)."
    d = tmp / f'at_{step}'; (d / 'checkpoints').mkdir(parents=True)
    for f in ('config.json', 'metrics.jsonl'):
        if (run_dir / f).exists(): shutil.copy(run_dir / f, d / f)
    shutil.copytree(run_dir / 'checkpoints' / str(step), d / 'checkpoints' / str(step))
    return load_run(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run'); ap.add_argument('judge'); ap.add_argument('out')
    ap.add_argument('--n', type=int, default=10); ap.add_argument('--cfg', type=float, default=8.0)
    ap.add_argument('--interval', type=float, nargs=2, default=(0.6, 0.9)); ap.add_argument('--steps', type=int, default=15)
    a = ap.parse_args(argv)
    run_dir, out = Path(a.run), Path(a.out); out.mkdir(parents=True, exist_ok=True)
    judge = load_judge(a.judge)
    names = list_classes(run_dir.parent / 'split' / 'train')
    labels = np.repeat(np.arange(len(names)), a.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in saved_steps(run_dir):
            run = run_at(run_dir, step, Path(tmp))
            if run.mc.cond != 'class': raise SystemExit(f"{run_dir} is conditioned by {run.mc.cond!r}, not by class label")
            z = generate(run.params, run.mc, labels=labels, scaling=run.scaling, steps=a.steps, cfg_scale=a.cfg,
                         cfg_interval=tuple(a.interval))
            im = np.asarray(run_codecs(run).decode(z))
            acc = float((judge(im)[0].argmax(1) == np.repeat(judge.index(names), a.n)).mean())
            rows.append({'step': step, 'consistency': acc, 'classes': len(names), 'n': a.n, 'cfg': a.cfg,
                         'interval': list(a.interval), 'steps': a.steps, 'space': run.space})
            print(f"step {step}: consistency {acc:.1%} ({len(names)} classes x {a.n})", flush=True)
            g = im.reshape(len(names), a.n, *im.shape[1:]).transpose(0, 2, 1, 3, 4)
            g = g.reshape(len(names) * im.shape[1], a.n * im.shape[2], im.shape[3])
            save_png(((np.clip(g, -1, 1) + 1) * 127.5).astype(np.uint8).repeat(4, 0).repeat(4, 1), out / f'class_{step}.png')
    (out / 'curve.json').write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
