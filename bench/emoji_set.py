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
"""
import argparse, json, sys
from pathlib import Path

from PIL import Image

VENDORS = ('apple', 'google', 'twitter', 'facebook')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--src', required=True, help='the unpacked emoji-datasource packages (holds emoji.json and img/<vendor>/64)')
    ap.add_argument('--dst', required=True)
    ap.add_argument('--size', type=int, default=32)
    ap.add_argument('--min-images', type=int, default=6)
    a = ap.parse_args(argv)
    src, dst = Path(a.src), Path(a.dst)
    classes = 0
    for e in json.loads((src / 'emoji.json').read_text()):
        if not e.get('skin_variations'): continue
        files = [(v, 'default', e['image']) for v in VENDORS if e.get(f'has_img_{v}')]
        files += [(v, tone, s['image']) for tone, s in e['skin_variations'].items() for v in VENDORS if s.get(f'has_img_{v}')]
        files = [(v, t, src / 'img' / v / '64' / f) for v, t, f in files if (src / 'img' / v / '64' / f).exists()]
        if len(files) < a.min_images: continue
        d = dst / e['short_name'].replace(' ', '_'); d.mkdir(parents=True, exist_ok=True)
        for v, t, f in files:
            im = Image.open(f).convert('RGBA')
            bg = Image.new('RGBA', im.size, (255, 255, 255, 255)); bg.alpha_composite(im)
            bg.convert('RGB').resize((a.size, a.size), Image.LANCZOS).save(d / f"{v}_{t}.png")
        classes += 1
    print(f"{dst}: {classes} classes")
    return 0


if __name__ == '__main__':
    sys.exit(main())
