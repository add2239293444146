"""A real colour data set of a few hundred classes with a handful of images each, for the CLI's own-images path.

    npm pack emoji-datasource-apple@16.0.0 emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 \
             emoji-datasource-facebook@16.0.0          # then: tar xzf each .tgz (they unpack into package/)
    python bench/emoji_set.py --src package --dst EMOJI [--size 32] [--min-images 6]

Classes are the emoji that come in skin tones (hands, people, gestures: 323 in emoji-datasource 16.0.0); the
images of a class are its drawings by four vendors (Apple, Google/Noto, Twitter/Twemoji, Facebook), each in
the default yellow and the five skin tones, 64 px RGBA composited on white and resized to `--size`. Every
vendor draws a class its own way, so five supports and a target differ in outline, pose, detail and colour,
as photographs of one class do. The result is flat, `EMOJI/<class>/<vendor>_<tone>.png`, as `fsdit prepare
--src` takes it. The images stay on the machine that makes them (each vendor's own licence applies).

`--vendors` keeps some vendors only (a vendor left out can train a stand-in encoder: `bench/emoji_encoder.py`).
`--placed SEED` draws every image as photographs frame their subject: at a random place, at half to the full
side, turned up to 25 degrees either way, on a random paper colour, so five supports of a class no longer line up.
"""
import argparse, json, sys
from pathlib import Path

import numpy as np
from PIL import Image

VENDORS = ('apple', 'google', 'twitter', 'facebook')


def place(im: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    "An RGBA drawing at a random place, scale (0.5-1 of the side) and angle (+-25 degrees) on a random paper: RGB `size` px."
    big = 2 * size                                                   # drawn at twice the size, then reduced
    paper = Image.new('RGBA', (big, big), tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,))
    s = max(4, round(big * rng.uniform(0.5, 1.0)))
    fig = im.convert('RGBA').resize((s, s), Image.LANCZOS).rotate(rng.uniform(-25, 25), Image.BICUBIC, expand=True)
    if max(fig.size) > big: fig = fig.resize((min(fig.width, big), min(fig.height, big)), Image.LANCZOS)
    x, y = (int(rng.integers(0, big - d + 1)) for d in fig.size)
    paper.alpha_composite(fig, (x, y))
    return paper.convert('RGB').resize((size, size), Image.LANCZOS)


def drawings(src: Path, vendors=VENDORS, min_images: int = 6):
    "(class name, [(vendor, tone, path)]) of the emoji that come in skin tones, with at least `min_images` drawings."
    for e in json.loads((src / 'emoji.json').read_text()):
        if not e.get('skin_variations'): continue
        files = [(v, 'default', e['image']) for v in vendors if e.get(f'has_img_{v}')]
        files += [(v, tone, s['image']) for tone, s in e['skin_variations'].items() for v in vendors if s.get(f'has_img_{v}')]
        files = [(v, t, src / 'img' / v / '64' / f) for v, t, f in files if (src / 'img' / v / '64' / f).exists()]
        if len(files) >= min_images: yield e['short_name'].replace(' ', '_'), files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--src', required=True, help='the unpacked emoji-datasource packages (holds emoji.json and img/<vendor>/64)')
    ap.add_argument('--dst', required=True)
    ap.add_argument('--size', type=int, default=32)
    ap.add_argument('--min-images', type=int, default=6)
    ap.add_argument('--vendors', nargs='+', default=list(VENDORS), choices=VENDORS)
    ap.add_argument('--placed', type=int, default=None, metavar='SEED', help='random place, size, angle and paper (seeded)')
    a = ap.parse_args(argv)
    src, dst = Path(a.src), Path(a.dst)
    rng, classes = np.random.default_rng(a.placed), 0
    for name, files in drawings(src, tuple(a.vendors), a.min_images):
        d = dst / name; d.mkdir(parents=True, exist_ok=True)
        for v, t, f in files:
            im = Image.open(f).convert('RGBA')
            if a.placed is not None: place(im, a.size, rng).save(d / f"{v}_{t}.png"); continue
            bg = Image.new('RGBA', im.size, (255, 255, 255, 255)); bg.alpha_composite(im)
            bg.convert('RGB').resize((a.size, a.size), Image.LANCZOS).save(d / f"{v}_{t}.png")
        classes += 1
    print(f"{dst}: {classes} classes")
    return 0


if __name__ == '__main__':
    sys.exit(main())
