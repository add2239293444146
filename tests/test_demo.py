"""`fsdit demo` end to end at the tiny size, through the console entry point, in a subprocess."""
import json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
from PIL import Image


def fsdit(*args, timeout=600):
    "Run `fsdit ARGS` as the console script does; returns stdout (fails with the output on a non-zero exit)."
    r = subprocess.run([sys.executable, '-c', 'import sys; from fsdit.cli import main; sys.exit(main(sys.argv[1:]))', *args],
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, 'WANDB_MODE': 'disabled'})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_demo_cli_tiny_end_to_end_and_rerun(tmp_path):
    out = tmp_path / 'demo'
    log = fsdit('demo', '--out', str(out), '--size', 'tiny', '--until', 'store', '--no-progress')
    assert (out / 'feats' / 'metadata.json').exists() and not (out / 'run').exists()
    t0 = time.time()
    log = fsdit('demo', '--out', str(out), '--size', 'tiny', '--no-progress')
    first = time.time() - t0
    lines = [l for l in log.splitlines() if not l.startswith('judge epoch')]       # the judge's progress lines
    assert lines[0] == f"fsdit demo -> {out.resolve()}"
    assert [l.split(':')[0] for l in lines[1:7]] == ['data', 'store', 'judge', 'train', 'samples', 'eval']
    assert 'reused' in lines[1] and 'reused' in lines[2] and 'reused' not in lines[3]   # resumed after the store
    assert 'not SigLIP2' in lines[2] and 'judge_acc' in log and 'glyph_fd' in log      # honest about the stand-in
    assert lines[-1].startswith('minutes: data ')
    for f in ('samples_seen.png', 'samples_heldout.png', 'eval/eval.json', 'eval/fig_judge_acc.png', 'eval/fig_glyph_fd.png',
              'summary.json', 'timings.json', 'judge/judge.json'):
        assert (out / f).exists(), f
    assert str(out / 'samples_heldout.png') in log and str(out / 'eval' / 'eval.json') in log
    grid = np.asarray(Image.open(out / 'samples_heldout.png'))
    assert 10 <= grid.shape[0] - 4 * 3 * (16 + 2) <= 40 and grid.shape[1] > 4 * (5 + 3) * 16   # 3 classes: 5 supports | 3 samples, 4x, titled
    s = json.loads((out / 'summary.json').read_text())
    assert s['step'] == 30 and s['cond'] == 'aligned' and s['cfg'] == 3.0
    for split in ('test', 'train'):
        assert s[split]['classes'] == 4 and s[split]['judge_chance'] == 1 / 24          # the judge reads all 24 classes
        assert {'real', 'copy', 'mean', 'model', 'vs_real'} <= set(s[split])
        assert all(0 <= s[split][m]['judge_acc'] <= 1 for m in ('real', 'copy', 'mean', 'model'))
        assert s[split]['copy']['nn_support_judge'] < 1e-6 < s[split]['real']['nn_support_judge']
    ev = json.loads((out / 'eval' / 'eval.json').read_text())
    assert ev['step'] == 30 and set(ev['classes']) == {'test', 'train'}
    assert not set(ev['classes']['test']) & set(ev['classes']['train'])                # held-out means unseen
    assert ev['settings']['judge']['classes'] == 24

    t0 = time.time()
    log2 = fsdit('demo', '--out', str(out), '--size', 'tiny', '--no-progress')
    assert log2.count('reused') == 6 and time.time() - t0 < first
    assert json.loads((out / 'summary.json').read_text()) == s


def test_demo_cli_help_and_bad_args(tmp_path):
    r = subprocess.run([sys.executable, '-c', 'import sys; from fsdit.cli import main; sys.exit(main(sys.argv[1:]))',
                        'demo', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and '--size' in r.stdout and '--cond' in r.stdout
    r = subprocess.run([sys.executable, '-c', 'import sys; from fsdit.cli import main; sys.exit(main(sys.argv[1:]))',
                        'demo', '--size', 'huge'], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr


def test_demo_cli_tiny_unaligned(tmp_path):
    "Unaligned glyphs: RGB images, a trained stand-in encoder saved as a folder the store names, cross-attention to the supports."
    out = tmp_path / 'demo'
    log = fsdit('demo', '--out', str(out), '--size', 'tiny', '--data', 'unaligned', '--no-progress')
    lines = [l for l in log.splitlines() if not l.startswith(('judge epoch', 'glyph encoder step'))]
    assert [l.split(':')[0] for l in lines[1:8]] == ['data', 'encoder', 'store', 'judge', 'train', 'samples', 'eval']
    assert 'unaligned glyph classes' in lines[1] and 'held-out nearest-prototype accuracy' in lines[2]
    enc = out / 'encoder'
    assert (enc / 'model.safetensors').exists() and json.loads((enc / 'config.json').read_text())['model_type'] == 'fsdit-glyph-encoder'
    meta = json.loads((out / 'feats' / 'metadata.json').read_text())
    assert meta['encoder'] == str(enc) and meta['image_size'] == 24
    im = np.asarray(Image.open(next((out / 'glyphs').glob('*/*.png'))))
    assert im.shape == (24, 24, 3) and im.std((0, 1)).max() > 10                     # colour on colour
    s = json.loads((out / 'summary.json').read_text())
    assert s['cond'] == 'xattn' and s['step'] == 30
    assert json.loads((out / 'judge' / 'judge.json').read_text())['settings']['style'] == 'unaligned'
    log2 = fsdit('demo', '--out', str(out), '--size', 'tiny', '--data', 'unaligned', '--no-progress')
    assert log2.count('reused') == 7
    r = subprocess.run([sys.executable, '-c', 'import sys; from fsdit.cli import main; sys.exit(main(sys.argv[1:]))',
                        'demo', '--out', str(out), '--size', 'tiny', '--no-progress'], capture_output=True, text=True)
    assert r.returncode == 1 and 'holds unaligned glyphs, not aligned' in r.stderr and 'Traceback' not in r.stderr
