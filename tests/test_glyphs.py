"""fsdit.glyph.data: the offline dataset renders, splits by `prepare`, and its default classes exist in the fonts."""
from fsdit.data import load_image, prepare
import fsdit.glyph.data as G


def test_offline_dataset_small(tmp_path):
    counts = G.make_offline_dataset(tmp_path / 'g', per_class=6, size=16, chars='AbλΩ&')
    assert len(counts) == 5 and all(v == 6 for v in counts.values())
    m = prepare(tmp_path / 'g', tmp_path / 's', train=3, val=1, test=1, seed=0)
    assert m['skipped'] == []
    imgs = [load_image(p) for p in (tmp_path / 'g' / G.glyph_name('λ')).iterdir() if p.suffix == '.png']
    assert len(imgs) == 6 and all(i.shape == (16, 16, 3) for i in imgs)
    assert len({i.tobytes() for i in imgs}) == 6                 # every image differs


def test_offline_glyph_classes():
    # every default class renders in at least 4 of the 16 fonts; at least 120 classes
    n = sum(sum(G._has_glyph(G._font_path(f), ch) for f in G.GLYPH_FONTS) >= 4 for ch in G.GLYPHS)
    assert n >= 120 and len(set(G.GLYPHS)) == len(G.GLYPHS)
