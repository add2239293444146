"""The explorer driven headless, as a user would: its controls' actions are plain methods and its widgets
hold what a browser would show (the browser itself: tests/test_browser.py)."""
import json, shutil
from pathlib import Path
import numpy as np
import pytest

from fsdit.explorer import Explorer, find_runs, find_store, metrics_view


@pytest.fixture(scope='module')
def explorer(demo_tiny):
    ex = Explorer(demo_tiny / 'demo', n=2, steps=3)
    return ex


def test_opens_on_held_out_classes(explorer):
    ex = explorer
    assert ex.split_w.options == ('train', 'val', 'test') and ex.split_w.value == 'test'
    assert ex.class_w.value == ex.view.classes('test')[0] and len(ex.supports) == ex.shots == 5
    assert [c._dom_classes for c in ex.support_box.children] == [('fsdit-support',)] * 5
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
