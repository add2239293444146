"""The explorer driven headless, as a user would: its controls' actions are plain methods and its widgets
hold what a browser would show (the browser itself: tests/test_browser.py)."""
import base64, datetime, io, json, re, shutil
from pathlib import Path
import numpy as np
import pytest

from fsdit.explorer import Explorer, find_runs, find_store, metrics_view
from fsdit.images import to_uint8
from fsdit.supports import read_supports, sample_from_supports


def _png(im, side=None) -> bytes:
    from PIL import Image
    x = Image.fromarray(im)
    buf = io.BytesIO(); (x.resize((side, side)) if side else x).save(buf, 'png'); return buf.getvalue()


def _upload_value(name, data):
    "A FileUpload value entry, as the browser sends one."
    return {'name': name, 'type': 'image/png', 'size': len(data), 'content': memoryview(data),
            'last_modified': datetime.datetime.now(datetime.timezone.utc)}


@pytest.fixture(scope='module')
def explorer(demo_tiny):
    ex = Explorer(demo_tiny / 'demo', n=2, steps=3)
    return ex


def test_opens_on_held_out_classes(explorer):
    ex = explorer
    assert ex.split_w.options == ('train', 'val', 'test') and ex.split_w.value == 'test'
    assert ex.class_w.value == ex.view.classes('test')[0] and len(ex.supports) == ex.shots == 5
    assert [c._dom_classes for c in ex.support_imgs] == [('fsdit-support',)] * 5 and len(ex.support_box.children) == 5
    assert [t._dom_classes for t in ex.toggles] == [('fsdit-toggle',)] * 5 and ex.on.tolist() == [True] * 5
    assert (ex.cfg_w.value, ex.steps_w.value) == (3.0, 3)


def test_generate_cfg0_beside_scale_and_seeded(explorer):
    ex = explorer
    ex.cfg_w.value, ex.seed_w.value = 2.0, 7
    ex.gen_w.click()
    assert sorted(ex.last) == [0.0, 2.0] and ex.last[2.0].shape == (2, 16, 16, 3) and ex.last[2.0].dtype == np.uint8
    assert [len(r.children) for r in ex.sample_box.children] == [3, 3]
    assert 'generated 2 images at CFG 0 and 2' in ex.status.value
    first = {k: v.copy() for k, v in ex.last.items()}
    # the run guides over its own interval (the tiny demo's: 0.5 <= t <= 1), but the CFG 0 row is unconditional all along
    assert ex.view.run.tc.cfg_interval == (0.5, 1.0)
    kw = dict(n=2, steps=3, seed=7)
    np.testing.assert_array_equal(first[2.0], ex.view.generate(ex.supports, cfg_scale=2.0, **kw))
    np.testing.assert_array_equal(first[0.0], ex.view.generate(ex.supports, cfg_scale=0.0, cfg_interval=(0.0, 1.0), **kw))
    assert not np.array_equal(first[0.0], ex.view.generate(ex.supports, cfg_scale=0.0, **kw))
    out = ex.generate()
    np.testing.assert_array_equal(out[2.0], first[2.0])                   # same seed, same images
    ex.seed_w.value = 8
    assert not np.array_equal(ex.generate()[2.0], first[2.0])
    ex.cfg_w.value = 0.0                                                  # CFG 0 alone: one row
    assert list(ex.generate()) == [0.0] and len(ex.sample_box.children) == 1


def test_class_and_split_changes_redraw(explorer):
    ex = explorer
    ex.split_w.value = 'test'
    c1 = ex.view.classes('test')[1]
    ex.class_w.value = c1
    assert set(ex.supports) <= set(ex.view.rows('test', c1)) and ex.last == {} and ex.sample_box.children == ()
    before = ex.supports.copy()
    ex.draw_w.click()                                                     # another draw of the same class
    assert set(ex.supports) <= set(ex.view.rows('test', c1)) and not np.array_equal(before, ex.supports)
    ex.split_w.value = 'train'
    assert ex.class_w.options == tuple(ex.view.classes('train')) and ex.class_w.value == ex.view.classes('train')[0]


def test_pick_images_by_name_and_errors(explorer):
    ex = explorer
    names = [n for n, _ in ex.pick_w.options[-3:]]
    ex.pick(names)
    assert ex.view.names(ex.supports) == names and len(ex.support_box.children) == 3
    with pytest.raises(ValueError, match='pick needs images of class'):
        ex.pick(['nope.png'])
    ex.supports = np.zeros(0, int)
    ex.gen_w.click()                                                      # errors land in the status line
    assert 'no support set' in ex.status.value
    ex.draw_supports()


def test_metrics_view_of_the_run(explorer):
    mv = explorer.metrics_view()
    assert mv['step'] == 30 and {'train', 'val', 'val_ema'} <= set(mv['t_bins'])
    assert all(len(v) == 10 for v in mv['t_bins'].values()) and sorted(mv['entropy']) == ['early', 'late', 'mid']
    assert explorer.metrics_w.value[:4] == b'\x89PNG'
    assert metrics_view([]) == {'step': None, 't_bins': {}, 'entropy': {}}


def test_pick_a_run_among_several(demo_tiny, tmp_path):
    root = tmp_path / 'runs'
    for name in ('a', 'b'):
        shutil.copytree(demo_tiny / 'demo' / 'run', root / name / 'run')
    cfg = json.loads((root / 'b' / 'run' / 'config.json').read_text())
    assert Path(cfg.pop('feats')) == (demo_tiny / 'demo' / 'feats').absolute()          # the store the run names...
    (root / 'b' / 'run' / 'config.json').write_text(json.dumps(cfg))
    (root / 'b' / 'feats').symlink_to(demo_tiny / 'demo' / 'feats')                     # ...else `feats` beside it
    runs = find_runs(root)
    assert [p.parent.name for p in runs] == ['a', 'b']
    assert find_store(runs[0]) == demo_tiny / 'demo' / 'feats' and find_store(runs[1]) == root / 'b' / 'feats'
    ex = Explorer(root, n=1, steps=2)
    assert ex.view.run.path == runs[0]
    ex.run_w.value = str(runs[1])
    assert ex.view.run.path == runs[1] and ex.split_w.value == 'test' and len(ex.supports) == 5
    with pytest.raises(ValueError, match='no run directory'):
        Explorer(tmp_path / 'empty')


def test_switch_supports_off(explorer):
    ex = explorer
    ex.split_w.value = 'test'
    ex.class_w.value = ex.view.classes('test')[0]
    ex.cfg_w.value, ex.seed_w.value = 2.0, 0
    ex.toggles[2].value = False                                           # a click on its button
    assert ex.on.tolist() == [True, True, False, True, True] and ex.toggles[2].description == 'off'
    assert 'fsdit-off' in ex.support_imgs[2]._dom_classes and '4 of 5 supports on' in ex.status.value
    ex.gen_w.click()
    np.testing.assert_array_equal(ex.last[2.0], ex.view.generate(ex.supports[ex.on], n=2, cfg_scale=2.0, steps=3, seed=0))
    assert 'from 4 supports' in ex.status.value
    for i in (0, 1, 3): ex.toggle(i)                                      # flip them off: one left
    ex.toggles[4].value = False                                           # refused: the last one stays on
    assert ex.on.tolist() == [False, False, False, False, True] and ex.toggles[4].value
    assert 'at least one support must stay on' in ex.status.value
    with pytest.raises(ValueError, match='at least one support must stay on'):
        ex.toggle(4, False)
    ex.toggle(2, True)
    assert ex.on.tolist() == [False, False, True, False, True] and 'fsdit-off' not in ex.support_imgs[2]._dom_classes
    ex.draw_w.click()                                                     # a new set starts all on
    assert ex.on.tolist() == [True] * 5


def test_download_the_samples(explorer):
    from PIL import Image
    ex = explorer
    ex.split_w.value, ex.cfg_w.value = 'test', 2.0
    ex.draw_supports()
    assert ex.download_w.value == ''                                      # nothing generated for this set yet
    ex.toggle(0, False)
    ex.gen_w.click()
    m = re.fullmatch(r'<a class="fsdit-download" download="fsdit_samples.png" href="data:image/png;base64,([^"]+)"[^>]*>.*</a>',
                     ex.download_w.value)
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(m[1]))))
    np.testing.assert_array_equal(grid, ex.grid)
    assert grid.shape == (3 * 18, 4 * 18, 3)                              # 4 supports on top, CFG 0 and 2 rows of 2
    np.testing.assert_array_equal(grid[:16, :16], ex.support_images[1])   # the first support that was on
    np.testing.assert_array_equal(grid[36:52, 18:34], ex.last[2.0][1])
    ex.class_w.value = ex.view.classes('test')[1]                         # a new set: the link goes
    assert ex.download_w.value == ''


def test_upload_own_supports(explorer, tmp_path):
    ex = explorer
    ex.split_w.value = 'test'
    ex.cfg_w.value = 2.0
    imgs = ex.view.images(ex.view.rows('test', ex.view.classes('test')[2])[:3])
    files = {f'own{i}.png': _png(im, 24) for i, im in enumerate(imgs)}
    ex.upload_w.value = tuple(_upload_value(k, v) for k, v in files.items())   # what choosing files in the browser does
    assert ex.upload_w.value == () and len(ex.supports) == 0 and ex.support_names == list(files)
    assert ex.uploaded.shape == (3, 16, 16, 3) and len(ex.support_box.children) == 3 and ex.on.tolist() == [True] * 3
    for k, v in files.items(): (tmp_path / k).write_bytes(v)
    np.testing.assert_array_equal(ex.uploaded, read_supports(sorted(tmp_path.glob('*.png')), ex.view.codecs.image_size))
    ex.toggle(1, False)
    ex.gen_w.click()
    want = sample_from_supports(ex.view.run, ex.view.codecs, ex.uploaded[[0, 2]], 2, cfg_scale=2.0, steps=3, seed=ex.seed_w.value,
                                cfg_interval=ex.view.run.tc.cfg_interval)   # what `fsdit sample --support` draws
    np.testing.assert_array_equal(ex.last[2.0], to_uint8(want, rgb=True))
    assert 'from 2 supports' in ex.status.value and ex.grid.shape == (3 * 18, 2 * 18, 3)
    ex.upload_w.value = (_upload_value('notes.txt', b'not an image'), _upload_value('ok.png', files['own0.png']))
    assert 'cannot read support image(s): notes.txt (' in ex.status.value and 'ok.png' not in ex.status.value
    assert len(ex.uploaded) == 3 and ex.upload_w.value == ()             # the set stays as it was
    with pytest.raises(ValueError, match='no image uploaded'):
        ex.upload([])
    ex.set_class(ex.view.classes('test')[0])                              # back to the store
    assert ex.uploaded is None and len(ex.supports) == 5
