"""A stand-in encoder that knows the emoji classes, as SigLIP2 knows ImageNet's: trained on vendors the data set leaves out.

    python bench/emoji_encoder.py --src package --vendor facebook [twitter] --out ENCODER [--vae-out VAE] [--per-class 48]
                                  [--size 32] [--steps 2500] [--seed 2027] [--adv-eps 0.5]
                                  [--eval SPLIT/test ...]

The emoji set that `fsdit` trains and is judged on is then made from the other vendors' drawings
(`bench/emoji_set.py --vendors apple google twitter --placed SEED`), so the encoder has seen every class, as
SigLIP2's web images include miniImageNet's classes, but never a file of the data set. Each of the vendor's six
drawings of a class (the default yellow and five skin tones) is placed at random `--per-class` times in all, the
way `emoji_set.py --placed` places the data set's (its own seed), and `fsdit.glyph.encoder.train_encoder` trains
the small tower with cosine class proxies. The folder it saves (safetensors + config) is what
`fsdit precompute --stand-in --encoder ENCODER` loads. `--eval` prints its 5-shot nearest-prototype accuracy on
the data set's images of each split given (a class-folder tree, such as `fsdit prepare`'s `SPLIT/test`).
`--vae-out` also trains the small autoencoder of the glyph demo (`fsdit.glyph.vae.train_vae`, f = 2, 4 latent
channels) on the same vendor's placed drawings, saved as the diffusers folder `fsdit precompute --vae` takes, as
SD-VAE stands to photographs: the DiT then works on latents, as a miniImageNet run does.
"""
import argparse, json, sys, time
from pathlib import Path

import numpy as np
from PIL import Image

from emoji_set import drawings, place
from fsdit.data import folder_images, to_unit
from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderSpec, is_glyph_encoder, prototype_accuracy, train_encoder
from fsdit.glyph.vae import GlyphVAESpec, train_vae


def vendor_set(src: Path, vendors: tuple, per_class: int, size: int, seed: int):
    "Images (N, size, size, 3) in [-1, 1] of every class the vendors draw, placed at random, their labels and the class names."
    rng, X, y, names = np.random.default_rng(seed), [], [], []
    for name, files in drawings(src, tuple(vendors), min_images=1):
        ims = [Image.open(f).convert('RGBA') for _, _, f in files]
        X += [np.asarray(place(ims[i % len(ims)], size, rng)) for i in range(per_class)]
        y += [len(names)] * per_class; names.append(name)
    return to_unit(np.stack(X)).astype(np.float32), np.asarray(y), names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--src', required=True, help='the unpacked emoji-datasource packages (emoji.json, img/<vendor>/64)')
    ap.add_argument('--vendor', nargs='+', default=['facebook'], help='the vendor(s) whose drawings train it')
    ap.add_argument('--out', required=True)
    ap.add_argument('--vae-out', default=None, help='also train an autoencoder on the same drawings, saved here')
    ap.add_argument('--vae-steps', type=int, default=800)
    ap.add_argument('--per-class', type=int, default=48)
    ap.add_argument('--size', type=int, default=32)
    ap.add_argument('--steps', type=int, default=2500)
    ap.add_argument('--seed', type=int, default=2027)
    ap.add_argument('--adv-eps', type=float, default=0.0,
                    help='train on adversarial examples within this L2 radius (the unaligned glyph demo uses 0.5), so that encoder guidance follows shapes')
    ap.add_argument('--eval', nargs='*', default=[], help='class-folder trees to report 5-shot prototype accuracy on')
    a = ap.parse_args(argv)
    t0 = time.time()
    X, y, names = vendor_set(Path(a.src), a.vendor, a.per_class, a.size, a.seed)
    print(f"{' + '.join(a.vendor)}: {len(names)} classes x {a.per_class} placed drawings ({time.time() - t0:.0f} s)", flush=True)
    if is_glyph_encoder(a.out):          # made by an earlier call: keep it (delete the folder to train anew)
        print(f"{a.out}: kept ({json.dumps(GlyphEncoder.from_pretrained(a.out).info)})", flush=True)
    else: train_and_save(a, X, y, names)
    if a.vae_out:
        held = vendor_set(Path(a.src), a.vendor, 2, a.size, a.seed + 1)[0]       # other placements of the same drawings
        vae = train_vae(X[::4], held, GlyphVAESpec(image_size=a.size), steps=a.vae_steps, batch_size=32, seed=a.seed, log=print,
                        info=dict(data=f"emoji-datasource {' + '.join(a.vendor)} drawings, placed at random", per_class=a.per_class // 4))
        vae.save_pretrained(a.vae_out, sample_size=a.size, replace=True)
        (Path(a.vae_out) / 'emoji_vae.json').write_text(json.dumps(vae.info, indent=1))
        print(f"vae: {a.vae_out} (held-out L1 {vae.info['heldout_l1']:.3f} on [-1, 1]; {vae.info['seconds']:.0f} s)")
    return 0


def train_and_save(a, X, y, names):
    "Train the encoder on the placed drawings, report its prototype accuracy on `a.eval`, save it in `a.out`."
    enc = train_encoder(X, y, GlyphEncoderSpec(image_size=a.size, embed_dim=64), steps=a.steps, seed=a.seed, log=print, adv_eps=a.adv_eps,
                        info=dict(data=f"emoji-datasource {' + '.join(a.vendor)} drawings, placed at random", classes=len(names),
                                  per_class=a.per_class))
    acc = {}
    for split in a.eval:
        Xe, ye = folder_images(split, a.size)
        acc[Path(split).name] = round(prototype_accuracy(enc, Xe, ye), 4)
        print(f"5-shot nearest prototype on {split} ({len(np.unique(ye))} classes, chance {1 / len(np.unique(ye)):.1%}): "
              f"{acc[Path(split).name]:.1%}", flush=True)
    enc.info['prototype_accuracy'] = acc
    enc.save_pretrained(a.out)
    print(json.dumps(enc.info), flush=True)


if __name__ == '__main__':
    sys.exit(main())
