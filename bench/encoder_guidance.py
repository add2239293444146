"""Guidance by the frozen support encoder: does steering each sampler step towards the supports' embedding draw their class?

    python bench/encoder_guidance.py DEMO [--split val] [--classes 32] [--n 6] [--scales 0 1 2] [--upto 0.7]
                                          [--through-model] [--augs 0] [--cfg 8] [--steps 15] [--out DEMO/guidance]
                                          [--guide-encoder FOLDER] [--start T] [--guide-others] [--best-of N]

The support encoder knows every class (SigLIP2 knows ImageNet's; the unaligned demo's stand-in was trained on its
own renderings of all of them), while the DiT has learned only what its training classes taught it. At each Euler
step the model's estimate of the clean latent, x1 = x + (1 - t) v, is decoded by the VAE and embedded by the frozen
encoder; the gradient g of its cosine similarity to the supports' mean embedding (unit RMS per example) moves that
estimate by `scale` latent units, v += scale * g / (1 - t), for t <= `--upto`, on top of the run's CFG. The gradient
is taken at the estimate (one decoder and encoder pass), or with `--through-model` with respect to x through the
model too, which is what `fsdit.sampler.encoder_guided` does; `--augs N` averages the similarity over N random
rescalings and shifts of the decoded image. This is CLIP guidance (GLIDE, universal guidance) with the conditioning
encoder. The demo's judge (another network, trained on its own renderings) reads the samples: a gain that only the
encoder sees would be an adversarial pattern, not a class. The settings are chosen here on validation classes;
held-out figures come from `bench/demo_wide_eval.py --guide`. Rows go to OUT/guidance.json, grids (8 classes,
enlarged 4x) to OUT/grid_SPLIT_SCALE.png; bench/encoder_guidance.json holds the sweep that chose the demo's setting.
`--guide-encoder FOLDER` guides by another glyph encoder (an adversarially trained one: `train_encoder(adv_eps=...)`)
towards its own embedding of the decoded supports, while the model stays conditioned on the store's embeddings.
`--start T` starts episode i at time T from its support i mod K, noised (SDEdit, as `fsdit.sampler.start_noise`);
the rows then carry each sample's distance to its nearest support, to set beside real images'. `--best-of N` draws N
candidates an episode and keeps the one whose encoder embedding is nearest the supports' mean (leaving out the
support it started from, so that a near copy of it is not what wins): reranking by the conditioning encoder, as
DALL-E reranks by CLIP; the encoder chooses, the judge reads. `--guide-others` guides each sample from a support
towards the mean of the other supports only.
"""
import argparse, json, sys, time
from functools import partial
from pathlib import Path

import numpy as np
import jax, jax.numpy as jnp

from fsdit.eval import Pipeline, class_set, evaluate_classes
from fsdit.features import open_store
from fsdit.flow import condition
from fsdit.glyph.demo import DemoSize
from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderNet
from fsdit.glyph.judge import load_judge
from fsdit.images import class_rows_grid, save_png, to_uint8
from fsdit.run import load_run
from fsdit.codecs import encoder_guide
from fsdit.config import GUIDE_UPTO
from fsdit.sampler import _dit, _model_space_guide, _noise, encoder_guided, guided_velocity, integrate, start_noise
from fsdit.utils import l2_normalize
from fsdit.vae import SDVAE


def guided_sampler(run, vae: SDVAE, enc: GlyphEncoder, steps: int, cfg: float, interval, upto: float,
                   through_model: bool = False, augs: int = 0):
    """jit (x0, cond, proto, scale) -> model latents: the run's CFG sampler plus encoder guidance. Through the model
    without augmentations it is `fsdit.sampler.encoder_guided` itself; the other variants are this bench's."""
    mc, params, model = run.mc, run.params, _dit(run.mc)
    guide = _model_space_guide(encoder_guide(enc, vae), run.scaling.scale)     # the package's guide, model latents in
    net, scale_lat = GlyphEncoderNet(enc.spec), run.scaling.scale

    def sim(x1, proto, key=None):               # x1: model latents (B, h, w, c); proto (B, E) unit rows
        if not augs: return (guide.fn(guide.params, x1) * proto).sum()
        img = jnp.clip(vae.module.apply({'params': vae.params}, x1 / scale_lat, method='decode'), -1, 1)
        embed = lambda im: l2_normalize(net.apply({'params': enc.params}, im)[1], eps=1e-6)
        B, H, W, C = img.shape                   # the mean over random rescalings and shifts of the image
        def one(k):
            ks, kt = jax.random.split(k)
            sc = jax.random.uniform(ks, (), minval=0.85, maxval=1.1)
            tr = jax.random.uniform(kt, (2,), minval=-3, maxval=3) + (1 - sc) * H / 2
            im = jax.image.scale_and_translate(img + 1, (B, H, W, C), (1, 2), jnp.stack([sc, sc]), tr, 'linear') - 1
            return (embed(im) * proto).sum()
        return jnp.mean(jax.vmap(one)(jax.random.split(key, augs)))

    @partial(jax.jit, static_argnames=('i0',))
    def run_sampler(x0, cond, proto, gscale, i0=0):
        vel = guided_velocity(model.apply, params, cond, cfg, interval)
        h = 1.0 / steps
        if through_model and not augs:
            v = encoder_guided(vel, guide.fn, guide.params, proto, gscale, upto)
            return integrate(v, x0, steps, start=i0)

        def body(i, x):
            t = i.astype(jnp.float32) / steps
            key = jax.random.fold_in(jax.random.PRNGKey(7), i)
            v = vel(x, t)
            if through_model:                    # d sim / d x through the model's estimate (universal guidance)
                g = jax.grad(lambda x: sim(x + (1 - t) * vel(x, t), proto, key))(x)
            else:                                # d sim / d x1 at the estimate (one decoder and encoder pass)
                g = jax.grad(sim)(x + (1 - t) * v, proto, key)
            g = g / (jnp.sqrt((g ** 2).mean((1, 2, 3), keepdims=True)) + 1e-8)
            v = v + jnp.where(t <= upto, gscale, 0.0) * g / (1 - t)
            return x + h * v

        return jax.lax.fori_loop(i0, steps, body, x0)

    return run_sampler


def class_target(e, offset: int = 0, leave_start: bool = False):
    """Unit (n, E): each episode's supports' mean embedding, e (n, K, E); with `leave_start`, episode j's mean leaves
    out the support it starts from, (offset + j) mod K."""
    e = np.asarray(e, np.float32)
    keep = np.ones(e.shape[:2], bool)
    if leave_start: keep[np.arange(len(e)), (offset + np.arange(len(e))) % e.shape[1]] = False
    return l2_normalize(jnp.asarray((e * keep[..., None]).sum(1)), eps=1e-6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('demo')
    ap.add_argument('--split', default='val')
    ap.add_argument('--classes', type=int, default=32)
    ap.add_argument('--n', type=int, default=6, help='samples per class')
    ap.add_argument('--scales', type=float, nargs='+', default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument('--upto', type=float, default=GUIDE_UPTO)
    ap.add_argument('--cfg', type=float, default=DemoSize().cfg)
    ap.add_argument('--interval', type=float, nargs=2, default=DemoSize().cfg_interval)
    ap.add_argument('--steps', type=int, default=15)
    ap.add_argument('--augs', type=int, default=0, help='average the similarity over this many random rescalings and shifts')
    ap.add_argument('--through-model', action='store_true', help='differentiate through the model too')
    ap.add_argument('--seen', action='store_true', help='also the same number of training classes')
    ap.add_argument('--out', default=None)
    ap.add_argument('--start', type=float, default=0.0,
                    help='SDEdit: start at this t from one of the supports, noised (0: from pure noise)')
    ap.add_argument('--guide-encoder', default=None, help='guide by this glyph encoder folder instead of the store\'s')
    ap.add_argument('--guide-others', action='store_true',
                    help='with --start: guide towards the mean of the supports other than the one it starts from')
    ap.add_argument('--best-of', type=int, default=1,
                    help='draw this many candidates an episode and keep the one the encoder puts nearest the class '
                         '(the mean embedding of the supports other than the one it started from)')
    a = ap.parse_args(argv)
    d = Path(a.demo); out = Path(a.out or d / 'guidance'); out.mkdir(parents=True, exist_ok=True)
    run, store, judge = load_run(d / 'run'), open_store(d / 'feats'), load_judge(d / 'judge')
    enc, vae = GlyphEncoder.from_pretrained(store.meta['encoder']), SDVAE.from_pretrained(store.meta['vae'])
    genc = GlyphEncoder.from_pretrained(a.guide_encoder) if a.guide_encoder else enc
    sampler = guided_sampler(run, vae, genc, a.steps, a.cfg, tuple(a.interval), a.upto, a.through_model, a.augs)
    decode = lambda z: vae.decode(z)
    mc, scaling = run.mc, run.scaling
    shape = (mc.input_size, mc.input_size, mc.in_channels)
    sets = {a.split: class_set(store, a.split, None, a.classes, seed=0)}
    if a.seen: sets['train'] = class_set(store, 'train', None, a.classes, seed=0)
    rows = []
    for gs in a.scales:
        def gen(emb, lat, cfg, seed, gs=gs):
            res = []
            for i in range(0, len(lat), 64):
                b = {'support_embeds': emb[i:i + 64], 'support_latents': lat[i:i + 64]}
                n = len(b['support_latents'])
                cond = condition({k: jnp.asarray(v) for k, v in b.items()}, mc, scaling)
                if genc is enc: e = b['support_embeds']
                else:                                  # the guide's own embedding of the supports, as decoded
                    sl = np.asarray(b['support_latents'])
                    e = np.asarray(genc.embed(decode(sl.reshape(-1, *sl.shape[2:])))).reshape(n, sl.shape[1], -1)
                proto = class_target(e, i, a.start > 0 and a.guide_others)
                x0 = _noise(jax.random.PRNGKey(seed), i, n, shape)
                init = None
                if a.start:                            # episode j starts from its support j mod K, noised
                    sl = np.asarray(b['support_latents'])
                    init = scaling.to_model(jnp.asarray(sl[np.arange(n), np.arange(i, i + n) % sl.shape[1]]))
                i0, x0 = start_noise(x0, init, a.start, a.steps)
                res.append(scaling.to_posterior(sampler(x0, cond, proto, jnp.float32(gs), i0=i0)))
            return np.concatenate(res)

        def best_of(emb, lat, cfg, seed, gen=gen):     # candidate j from seed + 7919 j; candidate 0 is the plain draw
            cands = [gen(emb, lat, cfg, seed + 7919 * j) for j in range(a.best_of)]
            n, proto = len(lat), np.asarray(class_target(emb, 0, a.start > 0))   # leave out the support it started from
            score = np.stack([(np.asarray(enc.embed(decode(c))) * proto).sum(-1) for c in cands])   # (N, n)
            return np.stack(cands)[score.argmax(0), np.arange(n)]

        draw = gen if a.best_of == 1 else best_of
        pipe = Pipeline(decode, enc.embed, draw, judge=judge)
        for name, cs in sets.items():
            t0 = time.time()
            recs = evaluate_classes(pipe, cs, n_per_class=a.n, shots=(run.tc.shots,), cfg_scales=(a.cfg,),
                                    split=name, baselines=False)
            for r in recs:
                row = {'scale': gs, 'upto': a.upto, 'split': name, 'method': r['method'], 'classes': r['classes'],
                       **{k: r.get(k) for k in ('judge_acc', 'glyph_fd', 'glyph_kid', 'proto_acc', 'diversity_judge',
                                                'nn_support_judge')},
                       'seconds': round(time.time() - t0)}
                row.update(best_of=a.best_of, guide_others=a.guide_others, start=a.start, steps=a.steps, through_model=a.through_model, cfg=a.cfg, augs=a.augs, guide_encoder=a.guide_encoder); rows.append(row); print(json.dumps(row), flush=True)
            # a grid of the first 8 classes: supports | samples
            k = run.tc.shots
            idx = [np.flatnonzero(cs.labels == c) for c in range(min(8, cs.n_classes))]
            sup = np.stack([ix[:k] for ix in idx])                               # (8, k)
            lat = draw(cs.embeds[sup].repeat(8, 0), cs.latents[sup].repeat(8, 0), a.cfg, 0)
            px = to_uint8(np.asarray(decode(lat))).reshape(len(idx), 8, *to_uint8(np.asarray(decode(lat[:1]))).shape[1:])
            sp = to_uint8(np.asarray(decode(cs.latents[sup.reshape(-1)]))).reshape(len(idx), k, *px.shape[2:])
            save_png(class_rows_grid(list(sp), list(px), scale=4, titles=(f'{k} supports', f'8 samples, guidance {gs:g}')),
                     out / f'grid_{name}_{gs:g}{f"_start{a.start:g}" if a.start else ""}{f"_best{a.best_of}" if a.best_of > 1 else ""}{"_others" if a.guide_others else ""}.png')
    (out / 'guidance.json').write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
