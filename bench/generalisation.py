"""Does the conditioning generalise to unseen classes? The seed's mean-vector conditioning (cond='support') against
in-context supports (cond='context') at equal training FLOPs, on the offline glyph dataset (pixel space 16x16x3 by
default, stand-in encoder), evaluated with fsdit.eval on seen (train) and held-out (test) classes beside real
images and two trivial baselines (copy a support, the support mean).

    python bench/generalisation.py cost --out OUT          # XLA FLOPs per sample at B/2, interleaved step times
    python bench/generalisation.py run  --out OUT          # data, store, FLOPs-matched training, eval, table
    python bench/generalisation.py all  --out OUT          # both

Writes OUT/cost.json, OUT/generalisation.json and OUT/generalisation.md; re-running reuses finished data, store and
runs (a run resumes from its checkpoint) and evaluations. `--only NAME` trains one run and stops (to train runs in
parallel processes after the data exists). Nothing here is tuned to make a number look good.
"""
from __future__ import annotations
import argparse, json, statistics, sys, time
from pathlib import Path

from fsdit.config import model_config, train_config, config_to_dict
from fsdit.data import prepare
from fsdit.glyph.data import make_offline_dataset, offline_split_sizes
from fsdit.codecs import offline_model_config, PixelEncoder, PixelSpace
from fsdit import bench as B


def log(*a):
    print(time.strftime('%H:%M:%S'), *a, flush=True)


# ---------------------------------------------------------------- the experiment's sizes
def exp_configs(a) -> dict:
    "Model configs of the compared conditionings: pixel `size` x `size` x 3, patch 4 ((size/4)^2 target tokens)."
    base = dict(hidden=a.hidden, depth=a.depth, heads=a.heads)
    mk = lambda **kw: offline_model_config('debug', size=a.size, channels=3, embed_dim=a.embed_dim, **base, **kw)
    out = {'support': mk(cond='support')}
    # support patch = 2x the target patch, as the B/2 on 28x28 latents (patch 2, supports patch 4): at 16 px
    # 16 + 5 x 4 tokens, the same 2.25x token ratio as 196 + 5 x 49 at B/2
    out['context'] = mk(cond='context', context_patch=2 * 4)
    if a.variants:  # supports at the target's resolution: 16 + 5 x 16 tokens at 16 px
        out['context_p4'] = mk(cond='context', context_patch=4)
    return out


def exp_train_config(a, steps: int):
    "The same recipe for every run; only max_steps differs (FLOPs-matched)."
    return train_config('short', batch_size=a.batch, max_steps=steps, warmup=min(200, steps // 10), ema_decay=a.ema,
                        log_every=100, eval_every=steps, sample_every=steps, save_every=steps, keep=1,
                        sample_steps=a.sample_steps, seed=a.seed, wandb_mode='disabled')


# ---------------------------------------------------------------- cost
def step_flops(mc, batch: int) -> float:
    "XLA's FLOPs of one compiled train step (forward, backward, AdamW, EMA) on `batch` examples."
    return B.cost(B.train_step_exe(mc, batch)[0])['flops']


def cost(a) -> dict:
    "FLOPs per training sample at B/2 (seed vs context) from XLA, and interleaved step times at the experiment size."
    out = {'machine': B.machine_info(), 'b2': {}}
    for cond in ('support', 'context'):
        mc = model_config('B/2', cond=cond)
        f1, f2 = step_flops(mc, 1), step_flops(mc, 2)
        tokens = mc.tokens + (5 * (mc.input_size // mc.context_patch) ** 2 if cond == 'context' else 0)
        out['b2'][cond] = dict(tokens=tokens, flops_step_b1=f1, flops_step_b2=f2, flops_per_sample=f2 - f1,
                               flops_per_sample_b2=f2 / 2)
        log(f"B/2 {cond}: {tokens} tokens, {(f2 - f1) / 1e9:.1f} GFLOP per sample (marginal), step b1 {f1 / 1e9:.1f} b2 {f2 / 1e9:.1f}")
    s, c = out['b2']['support']['flops_per_sample'], out['b2']['context']['flops_per_sample']
    out['b2']['ratio'] = c / s
    cfgs = exp_configs(a)
    runners, facts = {}, {}
    for name, mc in cfgs.items():
        runners[name], f = B.train_runner(mc, a.batch)
        facts[name] = dict(params=f['params'], flops_step=f['flops'], flops_per_sample=f['flops_per_sample'])
    times = B.interleave(runners, reps=a.reps)
    out['small'] = {'batch': a.batch, 'model': {k: config_to_dict(v) for k, v in cfgs.items()}}
    for name in cfgs:
        out['small'][name] = dict(**facts[name], step_s_median=statistics.median(times[name]), step_s=times[name])
        log(f"{name}: {facts[name]['flops_step'] / 1e9:.2f} GFLOP/step, median {out['small'][name]['step_s_median'] * 1e3:.0f} ms/step")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / 'cost.json').write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------- data
def data(a):
    "The glyph dataset, its class split and the pixel-space store with the stand-in encoder (all reused when complete)."
    from fsdit.features import precompute
    out = Path(a.out)
    counts = make_offline_dataset(out / 'glyphs', per_class=a.per_class, size=a.size, seed=0)
    prepare(out / 'glyphs', out / 'split', **offline_split_sizes(len(counts)), seed=0)
    return precompute(out / 'split', out / 'feats', PixelEncoder(dim=a.embed_dim), PixelSpace(size=a.size),
                      image_size=a.size, space='pixel', chunk_size=1024, batch_size=256, progress=False)


# ---------------------------------------------------------------- train + eval
def train_runs(a, store) -> dict:
    "Train every conditioning for the same FLOPs as `a.steps` steps of the seed's conditioning."
    from fsdit.train import train
    from fsdit.data import EpisodeSource
    cfgs = exp_configs(a)
    names = [k for k in cfgs if not a.only or k in a.only]
    flops = {k: step_flops(cfgs[k], a.batch) for k in dict.fromkeys(['support', *names])}
    runs = {}
    for name in names:
        mc = cfgs[name]
        steps = int(round(a.steps * flops['support'] / flops[name]))
        tc = exp_train_config(a, steps)
        d = Path(a.out) / 'runs' / name
        src = EpisodeSource(store.embeds, store.moments, store.class_rows('train'), store.class_rows('val'), tc, 'pixel')
        t0 = time.time()
        log(f"train {name}: {steps} steps of {a.batch} ({flops[name] / 1e9:.2f} GFLOP/step, {steps * flops[name] / 1e12:.2f} TFLOP)")
        last = train(mc, tc, src, d, extra={'feats': str(Path(store.path).absolute()), 'val_batches': 2})
        wall = time.time() - t0
        lines = [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines() if l.strip()]
        final = {k: v for k, v in lines[-1].items() if k in ('train/loss', 'val/loss', 'val_ema/loss')} if lines else {}
        prev, train_s = 0, 0.0   # measured step time x steps, summed over the log intervals (compilation excluded)
        for l in lines:
            if 'train/step_time' in l: train_s += l['train/step_time'] * (l['step'] - prev)
            if 'train/loss' in l: prev = l['step']
        final['train_s'] = train_s
        runs[name] = dict(dir=str(d), cond=mc.cond, context_patch=mc.context_patch if mc.cond == 'context' else None,
                          steps=steps, batch=a.batch, flops_step=flops[name], flops_total=steps * flops[name],
                          wall_s_this_call=wall, **final)
        log(f"train {name}: done in {wall:.0f} s, {final}")
    return runs


def eval_runs(a, store, runs: dict) -> dict:
    "fsdit.eval on test (held-out) and train (seen) classes at CFG 1 and 3, each run; real and baselines once."
    from fsdit.eval import evaluate
    res = {}
    for name, r in runs.items():
        t0, done = time.time(), Path(a.out) / 'eval' / name / 'eval.json'
        if done.exists():   # reuse a finished evaluation of the same checkpoint and settings
            old = json.loads(done.read_text())
            if old['step'] == r['steps'] and old['settings']['n_per_class'] == a.n_per_class and old['settings']['steps'] == a.sample_steps:
                res[name] = old; log(f"eval {name}: reused"); continue
        res[name] = evaluate(r['dir'], store, split='test', seen_split='train', n_per_class=a.n_per_class, shots=(5,),
                             cfg_scales=(1.0, 3.0), steps=a.sample_steps, seed=a.seed, max_real_per_class=None,
                             out=Path(a.out) / 'eval' / name)
        log(f"eval {name}: {time.time() - t0:.0f} s")
    return res


COLS = [('proto_acc', 'class consistency (proto. acc.)', '{:.1%}'), ('fd_embed', 'Fréchet dist. (embed)', '{:.3f}'),
        ('diversity_embed', 'diversity (cos)', '{:.3f}'), ('diversity_pixel', 'diversity (pixel RMS)', '{:.3f}'),
        ('nn_support_embed', 'dist. to nearest support (cos)', '{:.3f}'),
        ('nn_support_pixel', 'dist. to nearest support (pixel RMS)', '{:.3f}')]


def table(res: dict, runs: dict) -> str:
    "Markdown: one row per (split, method), baselines and real images once, every run at each CFG."
    rows, first = [], next(iter(res.values()))
    label = {'real': 'real images', 'copy': 'baseline: copy a support', 'mean': 'baseline: support mean'}
    for split in ('test', 'train'):
        recs = [r for r in first['records'] if r['split'] == split and r['method'] != 'model']
        rows += [(split, label[r['method']], r) for r in recs]
        for name, rr in res.items():
            rows += [(split, f"{name} (cond='{runs[name]['cond']}'), CFG {r['cfg']:g}", r)
                     for r in rr['records'] if r['split'] == split and r['method'] == 'model']
    head = '| classes | method | ' + ' | '.join(c[1] for c in COLS) + ' |'
    out = [head, '|' + '---|' * (len(COLS) + 2)]
    for split, m, r in rows:
        cells = ['-' if r.get(k) is None else f.format(r[k]) for k, _, f in COLS]
        out.append(f"| {'held-out' if split == 'test' else 'seen'} ({r['classes']}, chance {r['chance']:.1%}) | {m} | " + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def run(a) -> dict:
    store = data(a)
    log(f"store: {len(store.embeds)} images; classes train {len(store.class_rows('train'))}, "
        f"val {len(store.class_rows('val'))}, test {len(store.class_rows('test'))}")
    runs = train_runs(a, store)
    if a.only: return runs
    res = eval_runs(a, store, runs)
    md = table(res, runs)
    train_md = '\n'.join([f"| {k} | {r['cond']} | {r['context_patch'] or '-'} | {r['steps']} | {r['batch']} | "
                          f"{r['flops_step'] / 1e9:.2f} | {r['flops_total'] / 1e12:.2f} | "
                          f"{r.get('val_ema/loss', float('nan')):.4f} | {r['train_s'] / 60:.1f} |" for k, r in runs.items()])
    train_md = ('| run | cond | support patch | steps | batch | GFLOP/step (XLA) | total TFLOP | val loss (EMA) | train min (2-core CPU, shared) |\n'
                '|---|---|---|---|---|---|---|---|---|\n' + train_md)
    out = dict(machine=B.machine_info(), args=vars(a), runs=runs,
               model={k: config_to_dict(v) for k, v in exp_configs(a).items()},
               train=config_to_dict(exp_train_config(a, a.steps)),
               results={k: v['records'] for k, v in res.items()}, table=md, train_table=train_md)
    (Path(a.out) / 'generalisation.json').write_text(json.dumps(out, indent=1, default=float))
    (Path(a.out) / 'generalisation.md').write_text(train_md + '\n\n' + md + '\n')
    print(train_md + '\n\n' + md)
    return out


def parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=('cost', 'run', 'all'))
    p.add_argument('--out', required=True, help='output folder (data, store, runs, eval, JSON, markdown)')
    p.add_argument('--steps', type=int, default=3000, help="steps of the seed's conditioning; the others get the same FLOPs")
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--hidden', type=int, default=64); p.add_argument('--depth', type=int, default=4)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--size', type=int, default=16); p.add_argument('--embed-dim', type=int, default=64)
    p.add_argument('--per-class', type=int, default=24, help='images per glyph class')
    p.add_argument('--ema', type=float, default=0.995)
    p.add_argument('--n-per-class', type=int, default=8, help='generated images per class, per CFG')
    p.add_argument('--sample-steps', type=int, default=25)
    p.add_argument('--variants', action='store_true', help='also context with supports at patch 4 (64 tokens each)')
    p.add_argument('--reps', type=int, default=5, help='interleaved timing rounds (cost)')
    p.add_argument('--only', nargs='+', help='train only these runs (e.g. to train them in parallel processes), no eval')
    p.add_argument('--seed', type=int, default=0)
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    if a.what in ('cost', 'all'): cost(a)
    if a.what in ('run', 'all'): run(a)
    return 0


if __name__ == '__main__':
    sys.exit(main())
