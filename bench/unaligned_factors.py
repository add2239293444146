"""Which part of the unaligned glyphs stops the generator: the placement, the colours, or both?

    python bench/unaligned_factors.py DEMO OUT [--styles unaligned placed-gray centred-colour centred-gray]
                                      [--classes 16] [--steps 2000] [--set model.conv=32 ...] [--tag NAME]
    python bench/unaligned_factors.py DEMO OUT --figure NAME=CAPTION ...     # the runs' grids in one picture

DEMO is an unaligned demo folder with its encoder and judge (`fsdit demo --data unaligned --until judge`). For each
style the same first `--classes` training characters of DEMO are rendered again, 20 images a class at 24 px RGB,
with one factor of the unaligned style switched off:

- `unaligned`: anywhere in the frame, half to the full side, +-25 degrees, random ink on random paper (the demo's);
- `placed-gray`: the same placement, size and angle, black ink on white paper;
- `centred-colour`: the aligned demo's jitter (centred, +-6% shift, 0.85-1.1 scale, +-10 degrees), random colours;
- `centred-gray`: the aligned demo's jitter, black on white (the aligned demo's images, in RGB at 24 px).

Each set is split 3/4 for training; the unaligned demo's model and recipe (`demo_size('full', 'unaligned')`, with
`--set` overrides) train on it for `--steps`; then DEMO's judge reads 10 samples of every *training* class at the
demo's guidance, and a grid of 8 of those classes is written enlarged. A generator that can draw these classes at all
must score near the real images' consistency here: every image was seen about 270 times. Rows go to OUT/factors.json.

The rows of `bench/unaligned_factors.json` were made when the unaligned demo worked on pixels at patch 3 with 6 px
support patches; since the demo moved to the glyph VAE's latents (patch 2, 3x3 support patches), those rows are
remade with `--set model.patch=3 model.context_patch=6`.

`--vae FOLDER` trains the model on the latents of a diffusers `AutoencoderKL` folder (the glyph VAE of an unaligned
demo with a VAE, DEMO/vae) instead of the pixels: its input grid and channels become the latents'.

`--set train.t_shift=S` trains with SD3's resolution shift of the time schedule, t -> t / (t + S (1 - t)) (t = 0 noise,
t = 1 data; `fsdit.flow.shift_t`), so S > 1 spends more of training near the noise. Rows with `"t_shift_probe": true`
come from before that setting: a probe that also moved the sampler's grid (the same weights sampled on the uniform
grid gave the same figures).
"""
import argparse, json, sys, time
from dataclasses import replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from demo_conds import override, median_step_time
from fsdit.glyph import data as glyphs
from fsdit.data import prepare
from fsdit.glyph.demo import demo_size, demo_train, demo_grid, demo_summary, demo_store
from fsdit.vae import SDVAE
from fsdit.eval import evaluate
from fsdit.glyph.encoder import GlyphEncoder
from fsdit.images import save_png
from fsdit.glyph.judge import load_judge
from fsdit.codecs import run_codecs
from fsdit.run import load_run


def _gray(j: dict) -> dict: return {**j, 'ink': (0, 0, 0), 'paper': (255, 255, 255)}


def _colours(j: dict, rng) -> dict:
    u = glyphs.unaligned_jitter(rng)
    return {**j, 'ink': u['ink'], 'paper': u['paper']}


STYLES = {
    'unaligned': glyphs.unaligned_jitter,
    'placed-gray': lambda rng: _gray(glyphs.unaligned_jitter(rng)),
    'centred-colour': lambda rng: _colours(glyphs.glyph_jitter(rng), rng),
    'centred-gray': lambda rng: _gray(glyphs.glyph_jitter(rng)),
}


def figure(root: Path, names: list[str], captions: list[str], out: Path, rows: int = 4):
    "The first `rows` classes of each run's grid (OUT/<name>/samples_seen.png), one under the other, each under its caption."
    from PIL import Image, ImageDraw
    panels = []
    for name, cap in zip(names, captions):
        g = Image.open(root / name / 'samples_seen.png').convert('RGB')
        side = json.loads((root / name / 'run' / 'config.json').read_text())['model']['input_size'] * 4   # the 4x grid
        g = g.crop((0, 0, g.width, 26 + rows * (side + 8)))
        p = Image.new('RGB', (g.width, g.height + 24), 'white')
        ImageDraw.Draw(p).text((4, 4), cap, fill='black'); p.paste(g, (0, 24)); panels.append(p)
    im = Image.new('RGB', (max(p.width for p in panels), sum(p.height for p in panels)), 'white')
    y = 0
    for p in panels: im.paste(p, (0, y)); y += p.height
    im.save(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo'); ap.add_argument('out')
    ap.add_argument('--styles', nargs='+', default=list(STYLES), choices=list(STYLES))
    ap.add_argument('--classes', type=int, default=16)
    ap.add_argument('--steps', type=int, default=2000)
    ap.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE')
    ap.add_argument('--tag', default='')
    ap.add_argument('--vae', default=None, help='a diffusers AutoencoderKL folder: the model trains on its latents')
    ap.add_argument('--figure', nargs='+', metavar='NAME=CAPTION', help='only compose the grids of these runs into OUT/factors.png')
    a = ap.parse_args(argv)
    d, root = Path(a.demo), Path(a.out); root.mkdir(parents=True, exist_ok=True)
    if a.figure:
        pairs = [f.split('=', 1) for f in a.figure]
        figure(root, [n for n, _ in pairs], [c for _, c in pairs], root / 'factors.png'); return 0
    chars = ''.join(glyphs.glyph_char(c) for c in sorted(p.name for p in (d / 'split' / 'train').iterdir())[:a.classes])
    s = demo_size('full', 'unaligned')
    s = replace(s, train={**s.train, 'max_steps': a.steps, 'save_every': a.steps, 'eval_every': a.steps,
                          'sample_every': a.steps, 'fewshot_every': 0})
    s = override(replace(s, vae=None), a.set)      # pixels, unless --vae names the latents to train on
    judge, enc = load_judge(d / 'judge'), GlyphEncoder.from_pretrained(d / 'encoder')
    rows = json.loads((root / 'factors.json').read_text()) if (root / 'factors.json').exists() else {}
    n = len(chars); ntr = n * 3 // 4
    for style in a.styles:
        name = f'{style}@{a.tag}' if a.tag else style
        out = root / name; out.mkdir(parents=True, exist_ok=True)
        glyphs.GLYPH_STYLES[style] = STYLES[style]
        glyphs.make_offline_dataset(out / 'glyphs', per_class=20, size=s.image_size, chars=chars, style=style)
        prepare(out / 'glyphs', out / 'split', train=ntr, val=(n - ntr) // 2, test=n - ntr - (n - ntr) // 2, seed=0)
        v = None
        if a.vae:
            v = SDVAE.from_pretrained(Path(a.vae).absolute(), latent_channels=None)
            s = replace(s, model={**s.model, 'input_size': s.image_size // v.config.downsample_factor,
                                  'in_channels': v.config.latent_channels})
        store = demo_store(out, s, enc, v, progress=False)
        t0 = time.time()
        run_dir = demo_train(out, s, store, log=print, progress=False)
        train_s = time.time() - t0
        run = load_run(run_dir)
        save_png(demo_grid(run, run_codecs(run, store.path), store, 'train', s), out / 'samples_seen.png')
        res = evaluate(run, store, split='train', seen_split=None, n_per_class=10, shots=(run.tc.shots,),
                       cfg_scales=(s.cfg,), steps=s.sample_steps, max_real_per_class=None, judge=judge,
                       out=out / 'eval', cfg_interval=s.cfg_interval)
        last = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines() if l.strip()]
        rows[name] = {'style': style, 'classes': ntr, 'steps': run.step, 'train_s': round(train_s),
                      'step_s': median_step_time(run_dir), 'set': a.set, 't_shift': run.tc.t_shift,
                      'train_loss': next(r['train/loss'] for r in reversed(last) if 'train/loss' in r),
                      **demo_summary(res, s.cfg)}
        (root / 'factors.json').write_text(json.dumps(rows, indent=1))
        m = rows[name]['train']
        print(f"{name}: seen consistency {m['model']['judge_acc']:.1%} (real {m['real']['judge_acc']:.1%}, "
              f"mean {m['mean']['judge_acc']:.1%})", flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
