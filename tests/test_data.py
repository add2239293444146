"""fsdit.data: prepare (odd files, errors, atomicity, the two splits), episodes, stratified batches,
exact resume, per-process shares, the episode source."""
import json, os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fsdit.data as D
import fsdit.commands.prepare as P
from fsdit.data import (EpisodeBatches, RAVI_SPLIT, episode_table, host_batch, prepare,
                        process_share, split_classes, stratified_order, validation_batches)


def _img(path, size=8, seed=0, mode='RGB'):
    a = np.random.RandomState(seed).randint(0, 255, (size, size, 3), np.uint8)
    Image.fromarray(a).convert(mode).save(path)


def _flat(root: Path, classes, n=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n): _img(root / c / f'{i}.png', seed=hash((c, i)) % 1000)
    return root


# ---------------------------------------------------------------- prepare

def test_odd_images_and_defects(tmp_path):
    src = _flat(tmp_path / 'flat', ['a', 'b', 'c'], n=6)
    d = src / 'a'
    _img(d / 'gray.JPG', mode='L'); _img(d / 'cmyk.JPEG', mode='CMYK'); _img(d / 'pal.Png', mode='P')
    _img(d / 'alpha.png', mode='RGBA'); _img(d / 'la.png', mode='LA')
    (d / '.hidden.png').write_bytes(b'\x89PNG junk'); (d / 'Thumbs.db').write_bytes(b'x'); (d / 'sub').mkdir()
    _img(d / 'trunc.jpg', size=64); (d / 'trunc.jpg').write_bytes((d / 'trunc.jpg').read_bytes()[:500])
    (d / 'empty.png').write_bytes(b'')
    m = prepare(src, tmp_path / 'split', train=1, val=1, test=1, seed=0)
    split_of_a = next(k for k, v in m['classes'].items() if 'a' in v)
    names = sorted(os.listdir(tmp_path / 'split' / split_of_a / 'a'))
    assert names == sorted(['0.png', '1.png', '2.png', '3.png', '4.png', '5.png',
                            'gray.JPG', 'cmyk.JPEG', 'pal.Png', 'alpha.png', 'la.png'])
    assert sorted(Path(p).name for p, _ in m['skipped']) == ['empty.png', 'trunc.jpg']
    for n in names:
        a = D.load_image(tmp_path / 'split' / split_of_a / 'a' / n)
        assert a.dtype == np.uint8 and a.shape == (8, 8, 3)
    assert m['counts'][split_of_a]['a'] == 11


def test_too_few_images_names_class_and_writes_nothing(tmp_path):
    src = _flat(tmp_path / 'flat', ['good', 'poor'], n=6)
    (src / 'poor' / '0.png').unlink()
    with pytest.raises(ValueError, match=r"'poor' \(5\)"):
        prepare(src, tmp_path / 'split', train=1, val=1, test=0, seed=0)
    assert sorted(os.listdir(tmp_path)) == ['flat']


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    src = _flat(tmp_path / 'flat', ['a', 'b', 'c'])
    real = D._build
    def boom(tmp, splits, good, copy):
        real(tmp, {'train': splits['train']}, good, copy); raise OSError('disk full')
    monkeypatch.setattr(D, '_build', boom)
    with pytest.raises(OSError, match='disk full'):
        prepare(src, tmp_path / 'split', train=1, val=1, test=1)
    assert sorted(os.listdir(tmp_path)) == ['flat']


def test_rerun_noop_and_refusals(tmp_path):
    src = _flat(tmp_path / 'flat', ['a', 'b', 'c', 'd'])
    dst = tmp_path / 'split'
    m = prepare(src, dst, train=2, val=1, test=1, seed=1)
    mtime = (dst / 'prepare.json').stat().st_mtime_ns
    assert prepare(src, dst, train=2, val=1, test=1, seed=1) == m
    assert (dst / 'prepare.json').stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match='different split'):
        prepare(src, dst, train=2, val=1, test=1, seed=2)
    with pytest.raises(FileExistsError, match='different split'):
        prepare(src, dst, train=2, val=1, test=1, seed=1, copy=True)
    other = tmp_path / 'other'; other.mkdir(); (other / 'x').write_text('x')
    with pytest.raises(FileExistsError, match='not a prepared split'):
        prepare(src, other, train=2, val=1, test=1)
    empty = tmp_path / 'empty'; empty.mkdir()
    prepare(src, empty, train=2, val=1, test=1)                 # an empty folder is fine
    assert (empty / 'prepare.json').exists()


def test_copy_and_symlink(tmp_path):
    src = _flat(tmp_path / 'flat', ['a', 'b', 'c'])
    prepare(src, tmp_path / 's', 1, 1, 1); prepare(src, tmp_path / 'c', 1, 1, 1, copy=True)
    f = next((tmp_path / 's' / 'train').rglob('*.png')); g = next((tmp_path / 'c' / 'train').rglob('*.png'))
    assert f.is_symlink() and not g.is_symlink() and g.read_bytes() == f.read_bytes()


def test_seed_split_is_the_seeds_rule():
    names = [f'n{i:08d}' for i in range(100)]
    s = split_classes(list(reversed(names)), 60, 16, 20, seed=42)
    # the seed's prepare_data.py, restated
    all_classes = sorted(names)
    indices = np.random.RandomState(42).permutation(len(all_classes))[:96]
    assert s['train'] == [all_classes[i] for i in indices[:60]]
    assert s['val'] == [all_classes[i] for i in indices[60:76]]
    assert s['test'] == [all_classes[i] for i in indices[76:96]]
    assert len(set(sum(s.values(), []))) == 96


def test_ravi_split(tmp_path):
    wnids = sorted(sum(RAVI_SPLIT.values(), ()))
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert [len(RAVI_SPLIT[k]) for k in ('train', 'val', 'test')] == [64, 16, 20]
    src = tmp_path / 'flat'
    for w in wnids + ['extra']:
        (src / w).mkdir(parents=True)
        for i in range(6): _img(src / w / f'{w}_{i}.jpg', size=4, seed=i)
    m = prepare(src, tmp_path / 'split', split='ravi')
    for k in ('train', 'val', 'test'):
        assert sorted(os.listdir(tmp_path / 'split' / k)) == sorted(RAVI_SPLIT[k])
    assert 'n01930112' in m['classes']['test'] and 'n01855672' in m['classes']['val']
    with pytest.raises(ValueError, match='missing'):
        split_classes(wnids[:50], split='ravi')


def test_prepare_cli(tmp_path, capsys):
    src = _flat(tmp_path / 'flat', ['a', 'b', 'c'])
    assert P.prepare_cli(['--src', str(src), '--dst', str(tmp_path / 's'), '--train', '1', '--val', '1', '--test', '1']) == 0
    assert P.prepare_cli(['--src', str(src), '--dst', str(tmp_path / 's'), '--train', '1', '--val', '1', '--test', '1',
                          '--seed', '7']) == 1
    out = capsys.readouterr()
    assert out.err.startswith('fsdit prepare: refusing') and 'refusing' not in out.out


# ---------------------------------------------------------------- episodes and batches

def _rows(counts):
    starts = np.cumsum([0] + list(counts))
    return [np.arange(s, s + n) for s, n in zip(starts, counts)]


def test_disjoint_episodes_every_image_once():
    rows = _rows([600, 600, 37])
    for epoch in range(3):
        t = episode_table(rows, shots=5, seed=1, epoch=epoch)
        for (tg, sp), r in zip(t, rows):
            assert len(tg) == len(r) // 6 * 6 and len(np.unique(tg)) == len(tg)       # each image at most once
            assert np.isin(tg, r).all() and np.isin(sp, r).all()
            assert not (sp == tg[:, None]).any()
            # each set of 6 gives 6 episodes; supports of one target are the other five of its set
            sets = np.sort(np.concatenate([tg[:, None], sp], 1), 1)
            assert (np.unique(sets, axis=0, return_counts=True)[1] == 6).all()
    assert sum(len(t) for t, _ in episode_table(_rows([600] * 60))) == 36_000


def test_fixed_episodes_are_the_seeds_table():
    rows = _rows([20, 30])
    paths = [[f'c{c}/{i:03d}.jpg' for i in range(len(r))] for c, r in enumerate(rows)]
    # the seed's build_episode_table, restated over paths
    rng = np.random.RandomState(42); want = []
    for cls_idx, imgs in enumerate(paths):
        for _ in range(100):
            chosen = [imgs[i] for i in rng.choice(len(imgs), 6, replace=False)]
            for rot in range(6):
                want.append((chosen[rot], [chosen[j] for j in range(6) if j != rot], cls_idx))
    flat = sum(paths, [])
    got = [(flat[t], [flat[s] for s in ss], c) for c, (tt, sss) in enumerate(episode_table(rows, 5, 'fixed', 42))
           for t, ss in zip(tt, sss)]
    assert got == want
    assert (episode_table(rows, 5, 'fixed', 42, epoch=3)[1][1] == episode_table(rows, 5, 'fixed', 42)[1][1]).all()


@pytest.mark.parametrize('B,C', [(16, 7), (128, 60), (32, 100), (60, 60)])
def test_stratified_equal_classes(B, C):
    it = EpisodeBatches(_rows([60] * C), B, seed=5)
    for _ in range(2 * it.batches_per_epoch + 3):
        b = next(it)
        cnt = np.bincount(b['labels'], minlength=C)
        assert (cnt > 0).sum() == min(B, C)
        assert cnt[cnt > 0].max() - cnt[cnt > 0].min() <= 1
        assert (b['target_index'] // 60 == b['labels']).all()


def test_stratified_unequal_classes_and_rotating_leftovers():
    rows = _rows([60, 120, 30, 90])                       # 300 episodes an epoch
    B = 32
    it = EpisodeBatches(rows, B, seed=0)
    assert it.batches_per_epoch == 300 // B
    seen = []
    for e in range(4):
        got = np.concatenate([next(it)['target_index'] for _ in range(it.batches_per_epoch)])
        assert len(np.unique(got)) == len(got) == it.batches_per_epoch * B  # no episode twice in an epoch
        seen.append(set(range(300)) - set(got))
    assert all(len(s) == 300 - 9 * B for s in seen)
    assert len(set(map(frozenset, seen))) == 4            # a different few wait out each epoch
    # round-robin: the first batch still has every class
    it2 = EpisodeBatches(rows, B, seed=0)
    assert len(np.unique(next(it2)['labels'])) == 4


def test_stratified_order_interleaves():
    per_class = [(np.arange(n) + 100 * c, np.zeros((n, 5), int)) for c, n in enumerate([3, 1, 2])]
    t, s, l = stratified_order(per_class, np.random.default_rng(0))
    first = l[:3]; assert sorted(first) == [0, 1, 2]
    rest = [c for c in first if c != 1]
    assert list(l[3:5]) == rest and list(l[5:]) == [0]      # round-robin continues over the classes left


@pytest.mark.parametrize('mode', ['disjoint', 'fixed'])
def test_exact_resume_and_determinism(mode):
    rows = _rows([60] * 9 + [42])
    a = EpisodeBatches(rows, 24, mode=mode, seed=11, num_sets=10)
    for k in range(a.batches_per_epoch * 2 - 3): next(a)   # stop just before an epoch boundary
    state = json.loads(json.dumps(a.state()))               # survives a checkpoint
    want = [next(a) for _ in range(10)]
    b = EpisodeBatches(rows, 24, mode=mode, seed=11, num_sets=10); b.restore(state)
    for w in want:
        g = next(b)
        assert all(np.array_equal(g[k], w[k]) for k in w)
    c = EpisodeBatches(rows, 24, mode=mode, seed=12, num_sets=10)
    assert not np.array_equal(next(c)['target_index'], next(EpisodeBatches(rows, 24, mode=mode, seed=11, num_sets=10))['target_index'])


def test_validation_fixed():
    rows = _rows([30] * 5)
    v = validation_batches(rows, 10, 4, seed=3); w = validation_batches(rows, 10, 4, seed=3)
    assert len(v) == 4 and all(np.array_equal(x['target_index'], y['target_index']) for x, y in zip(v, w))


def test_batch_too_big():
    with pytest.raises(ValueError, match='fewer than the batch size'):
        EpisodeBatches(_rows([6, 6]), 64)


# ---------------------------------------------------------------- host batch, processes

def _store(n=600, d=16, lat=(4, 4, 3)):
    r = np.random.RandomState(0)
    return r.randn(n, d).astype(np.float16), r.randn(n, 2, 2, *lat).astype(np.float16)


def test_host_batch_contract():
    E, M = _store()
    idx = next(EpisodeBatches(_rows([60] * 10), 32, seed=0))
    b = host_batch(E, M, idx)
    assert b['moments'].dtype == np.float16 and b['moments'].shape == (32, 2, 2, 4, 4, 3)
    assert b['support_embeds'].shape == (32, 5, 16) and b['support_latents'].shape == (32, 5, 4, 4, 3)
    assert b['labels'].dtype == np.int32 and b['target_index'].dtype == np.int64
    np.testing.assert_array_equal(b['support_embeds'][7, 3], E[idx['support_index'][7, 3]])
    np.testing.assert_array_equal(b['moments'][5], M[idx['target_index'][5]])
    np.testing.assert_array_equal(b['support_latents'][2, 4], M[idx['support_index'][2, 4], 0, 0])


def test_process_shares_make_the_global_batch():
    E, M = _store()
    idx = next(EpisodeBatches(_rows([60] * 10), 32, seed=0))
    g = host_batch(E, M, idx)
    for P in (1, 2, 4):
        parts = [host_batch(E, M, process_share(idx, p, P)) for p in range(P)]
        for k in g: np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), g[k])
    with pytest.raises(ValueError): process_share(idx, 0, 3)


def test_state_at_matches_consumed_batches_across_epochs():
    rows = _rows([60] * 5)
    it = EpisodeBatches(rows, 32, seed=2)
    drawn = [next(it) for _ in range(3 * it.batches_per_epoch + 2)]
    for n in (0, 5, it.batches_per_epoch, 2 * it.batches_per_epoch + 1):
        r = EpisodeBatches(rows, 32, seed=2); r.restore(it.state_at(n))
        for w in drawn[n:n + 3]:
            g = next(r); assert all(np.array_equal(g[k], w[k]) for k in w)
