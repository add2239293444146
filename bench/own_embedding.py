"""Does a run use its pooled embedding at all? Each image drawn from its own embedding, read by the demo's judge.

    python bench/own_embedding.py DEMO [--run RUN] [--split val] [--classes 100] [--n 4] [--cfg 4] [--steps 20]

Episode i is conditioned on the embedding of one real image (all K support embeddings set to it; the supports'
latents, which `xattn` also reads, are K other images of its class) and drawn from noise, unguided, with the
run's CFG interval. If the model reads its pooled embedding, its samples are that image's class: the judge's
consistency then comes near the real images'. A run trained with `TrainConfig.self_cond` has seen this kind of
condition in training; one trained without it has only seen the mean of K supports. One JSON row to stdout.
"""
import argparse, json, sys, time
from pathlib import Path

import numpy as np

from fsdit.eval import class_set, draw_episodes
from fsdit.features import open_store
from fsdit.glyph.judge import judge_accuracy, load_judge
from fsdit.run import load_run
from fsdit.sampler import generate
from fsdit.vae import SDVAE


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo'); ap.add_argument('--run', default=None)
    ap.add_argument('--split', default='val'); ap.add_argument('--classes', type=int, default=100)
    ap.add_argument('--n', type=int, default=4, help='images a class'); ap.add_argument('--cfg', type=float, default=4.0)
    ap.add_argument('--steps', type=int, default=20)
    a = ap.parse_args(argv)
    d, t0 = Path(a.demo), time.time()
    run_dir = Path(a.run or d / 'run')
    run, store, judge = load_run(run_dir), open_store(d / 'feats'), load_judge(d / 'judge')
    vae = SDVAE.from_pretrained(store.meta['vae'])
    cs = class_set(store, a.split, None, a.classes, seed=0)
    k = run.tc.shots
    sup, held, lab = draw_episodes(cs.labels, a.n, k, 0)          # held: one real image per episode, not a support
    own = np.repeat(cs.embeds[held][:, None], k, 1)                # its embedding as every support's
    row = {'run': str(run_dir), 'split': a.split, 'classes': a.classes, 'n': a.n,
           'cfg': a.cfg, 'steps': a.steps, 'self_cond': run.tc.self_cond}
    labels = np.asarray(judge.index(cs.names))[lab]
    read = lambda z: judge_accuracy(judge(np.clip(np.asarray(vae.decode(z)), -1, 1))[0], labels)   # as the episodes' class
    for name, emb in (('own', own), ('supports', cs.embeds[sup])):
        row[f'judge_acc_{name}'] = read(generate(run.params, run.mc, emb, cs.latents[sup], scaling=run.scaling, seed=0,
                                                 steps=a.steps, cfg_scale=a.cfg, cfg_interval=run.tc.cfg_interval))
    row['judge_acc_real'] = read(cs.latents[held])
    row['seconds'] = round(time.time() - t0)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
