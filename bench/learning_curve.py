"""Learning curves of demo runs: the judge's class consistency and glyph-FD on validation classes against
training minutes, read from each run's metrics.jsonl (the trainer's few-shot metrics, `val_fs/*`).

    python bench/learning_curve.py NAME=DEMO_OR_RUN_DIR[@STEP_S] ... [--out nbs/images/learning_curve.png] [--json curve.json]

Training minutes are the sum of the logged step times (`train/step_time` x steps in each log window), so
evaluation, checkpointing and compilation are not counted. A run that shared the machine logs inflated step
times: `--step-s S` counts its minutes as steps x S instead (S: the bare step time measured on a quiet machine,
`bench/demo_budget.json`), which puts runs made under different loads on one axis; `NAME=DIR@S` gives one run
its own S (runs of different sizes, or one trained on another machine, counted at their quiet CPU step).
"""
import argparse, json, sys
from pathlib import Path


def curve(run: Path, step_s: float | None = None) -> list[dict]:
    "Records of the few-shot metrics with the training minutes spent up to their step (steps x `step_s` if given)."
    run = run / 'run' if (run / 'run' / 'metrics.jsonl').exists() else run
    out, minutes, prev = [], 0.0, 0
    for line in (run / 'metrics.jsonl').read_text().splitlines():
        if not line.strip(): continue
        r = json.loads(line)
        if 'train/step_time' in r:
            minutes += r['train/step_time'] * (r['step'] - prev) / 60; prev = r['step']
        if 'val_fs/judge_acc' in r:
            out.append(dict(step=r['step'], minutes=round(r['step'] * step_s / 60 if step_s else minutes, 2), judge_acc=r['val_fs/judge_acc'],
                            real_judge_acc=r.get('val_fs/real_judge_acc'), glyph_fd=r.get('val_fs/glyph_fd'),
                            real_glyph_fd=r.get('val_fs/real_glyph_fd')))
    return out


def plot(curves: dict, path: Path, x: str = 'minutes', title: str = 'validation classes'):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in curves.items():
        if not c: continue
        m = [r[x] for r in c]
        a.plot(m, [r['judge_acc'] for r in c], 'o-', label=name)
        b.plot(m, [r['glyph_fd'] for r in c], 'o-', label=name)
    real = next((c[-1] for c in curves.values() if c), None)
    if real and real['real_judge_acc'] is not None: a.axhline(real['real_judge_acc'], color='k', ls='--', lw=1, label='real images')
    if real and real['real_glyph_fd'] is not None: b.axhline(real['real_glyph_fd'], color='k', ls='--', lw=1, label='real vs real')
    xl = 'training minutes (2-core CPU)' if x == 'minutes' else 'training steps'
    a.set(xlabel=xl, ylabel='judge class consistency', title=title, ylim=(0, 1))
    b.set(xlabel=xl, ylabel='glyph-FD (log)', yscale='log', title=title)
    a.legend(fontsize=8); b.legend(fontsize=8)
    fig.tight_layout(); path.parent.mkdir(parents=True, exist_ok=True); fig.savefig(path, dpi=110); plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('runs', nargs='+', help='NAME=FOLDER (a demo folder or a run folder)')
    ap.add_argument('--out', default='learning_curve.png')
    ap.add_argument('--json', default=None)
    ap.add_argument('--step-s', type=float, default=None, help='seconds per step for the minutes axis (default: the logged step times)')
    ap.add_argument('--by-step', action='store_true', help='steps on the x axis instead of minutes')
    ap.add_argument('--title', default='validation classes')
    a = ap.parse_args(argv)
    curves = {}
    for spec in a.runs:
        name, _, folder = spec.partition('=')
        folder = folder or name
        head, _, tail = folder.rpartition('@')
        try: folder, step_s = head, float(tail)       # DIR@S
        except ValueError: step_s = a.step_s          # an '@' that is part of the folder's name
        curves[name] = curve(Path(folder), step_s)
    plot(curves, Path(a.out), 'step' if a.by_step else 'minutes', a.title)
    text = json.dumps(curves, indent=1)
    if a.json: Path(a.json).write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
