"""Conditionings side by side on one demo's data: each trained at the demo's budget, judged on held-out and seen classes.

    python bench/demo_conds.py DEMO [--data unaligned] [--conds xattn support support-randproj aligned context]
                               [--classes 200] [--n 10] [--steps N] [--out DEMO/conds]
                               [--set model.conv=32 train.max_steps=20000 cfg=4 ...] [--tag NAME]

DEMO is a demo folder whose data, encoder, store and judge are made (`fsdit demo --until judge`). Each
conditioning trains in DEMO/conds/<name>/run with the demo size's recipe, then draws its grids and is judged on
`--classes` held-out and as many seen classes (one table row each, `bench/demo_conds.json` style). `support-randproj`
is the seed's conditioning on a second store embedded with the random pixel projection instead of the demo's
encoder. `--set` changes the demo size's recipe (`model.*`, `train.*` or a `DemoSize` field, values read as JSON);
`--tag` names such a variant, whose rows are `<cond>@<tag>`; `--set train.t_shift=S` trains with times shifted toward
the noise (`fsdit.flow.shift_t`). Rows from before that setting existed, marked `"t_shift_probe": true`, also moved the
sampler's grid; the same weights sampled on the uniform grid gave the same figures. The step time is the median logged `train/step_time`; FLOPs per step are XLA's count of the compiled
training step.
"""
import argparse, json, sys, time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fsdit.codecs import PixelEncoder
from fsdit.glyph.demo import demo_size, demo_train, demo_samples, demo_summary, demo_configs, demo_store
from fsdit.vae import SDVAE
from fsdit.eval import evaluate
from fsdit.features import open_store
from fsdit.glyph.judge import load_judge
from fsdit.run import load_run


def step_flops(mc, tc) -> float | None:
    "XLA's FLOP count of one compiled training step of `mc` at `tc.batch_size` (None when the backend gives none)."
    from fsdit import bench as B
    try: return float(B.cost(B.train_step_exe(mc, tc.batch_size)[0])['flops'])
    except Exception: return None


def median_step_time(run: Path) -> float:
    recs = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    return float(np.median([r['train/step_time'] for r in recs if 'train/step_time' in r]))


def override(s, pairs: list[str]):
    "The demo size `s` with `KEY=VALUE` overrides: `model.X` / `train.X` go into those dicts, other keys are fields."
    for kv in pairs:
        k, _, v = kv.partition('=')
        try: v = json.loads(v)
        except json.JSONDecodeError: pass
        if isinstance(v, list): v = tuple(v)
        if k.startswith(('model.', 'train.', 'judge.')):
            part, key = k.split('.', 1); s = replace(s, **{part: {**getattr(s, part), key: v}})
        else: s = replace(s, **{k: v})
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--data', default='unaligned', choices=('aligned', 'unaligned'))
    ap.add_argument('--size', default='full')
    ap.add_argument('--conds', nargs='+', default=['xattn', 'support', 'support-randproj', 'aligned', 'context'])
    ap.add_argument('--classes', type=int, default=200)
    ap.add_argument('--n', type=int, default=10)
    ap.add_argument('--steps', type=int, default=None, help='training steps (default: the size\'s)')
    ap.add_argument('--out', default=None)
    ap.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='recipe overrides, e.g. model.conv=32 train.lr=1e-3')
    ap.add_argument('--tag', default='', help='names the variant: rows and folders are <cond>@<tag>')
    a = ap.parse_args(argv)
    d = Path(a.demo); root = Path(a.out or d / 'conds')
    s = demo_size(a.size, a.data)
    if a.steps: s = replace(s, train={**s.train, 'max_steps': a.steps, 'warmup': min(s.train.get('warmup', 0), a.steps)})
    s = override(s, a.set)
    judge = load_judge(d / 'judge')
    rows = json.loads((root / 'conds.json').read_text()) if (root / 'conds.json').exists() else {}   # add to earlier rows
    for cname in a.conds:
        name = f'{cname}@{a.tag}' if a.tag else cname
        out = root / name; out.mkdir(parents=True, exist_ok=True)
        cond, store = cname.split('-')[0], open_store(d / 'feats')
        if cname.endswith('-randproj'):
            vae = SDVAE.from_pretrained(store.meta['vae'], latent_channels=None) if store.meta['space'] == 'latent' else None
            store = demo_store(out, s, PixelEncoder(dim=s.embed_dim), vae, progress=False)   # the demo's space, the projection
        mc, tc = demo_configs(s, cond)
        t0 = time.time()
        run_dir = demo_train(out, s, store, cond=cond, log=print, progress=False, judge=judge)
        train_s = time.time() - t0
        sc = replace(s, cond=cond)
        demo_samples(out, sc, store, log=print)
        run = load_run(run_dir)
        res = evaluate(run, store, split='test', seen_split='train', n_per_class=a.n, shots=(run.tc.shots,),
                       cfg_scales=(s.cfg,), steps=s.sample_steps, max_real_per_class=None, judge=judge,
                       n_classes=a.classes, out=out / 'eval_wide', cfg_interval=s.cfg_interval)
        rows[name] = {'t_shift': tc.t_shift, 'step': run.step, 'train_s': round(train_s), 'step_s': median_step_time(run_dir),
                      'flops_per_step': step_flops(mc, tc), 'encoder': store.meta['encoder'], **demo_summary(res, s.cfg)}
        (root / 'conds.json').write_text(json.dumps(rows, indent=1))
        print(name, json.dumps(rows[name]['test'].get('model', {})), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
