"""`fsdit demo` end to end at the tiny size, through the console entry point, in a subprocess (the unaligned data;
the aligned chain, its resume after `--until store` and its reruns are checked in-process in nbs/11_demo.ipynb)."""
import json, os, subprocess, sys

import numpy as np
from PIL import Image


def fsdit(*args, timeout=600):
    "Run `fsdit ARGS` as the console script does; returns stdout (fails with the output on a non-zero exit)."
    r = subprocess.run([sys.executable, '-c', 'import sys; from fsdit.cli import main; sys.exit(main(sys.argv[1:]))', *args],
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, 'WANDB_MODE': 'disabled'})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


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
    lines = [l for l in log.splitlines() if not l.startswith(('judge epoch', 'glyph encoder step', 'glyph VAE step'))]
    assert [l.split(':')[0] for l in lines[1:9]] == ['data', 'encoder', 'vae', 'store', 'judge', 'train', 'samples', 'eval']
    assert 'unaligned glyph classes' in lines[1] and 'held-out nearest-prototype accuracy' in lines[2]
    enc = out / 'encoder'
    assert (enc / 'model.safetensors').exists() and json.loads((enc / 'config.json').read_text())['model_type'] == 'fsdit-glyph-encoder'
    meta = json.loads((out / 'feats' / 'metadata.json').read_text())
    assert meta['encoder'] == str(enc) and meta['image_size'] == 24
    assert meta['space'] == 'latent' and meta['vae'] == str((out / 'vae').absolute())             # the glyph VAE's latents
    assert json.loads((out / 'vae' / 'config.json').read_text())['_class_name'] == 'AutoencoderKL'
    im = np.asarray(Image.open(next((out / 'glyphs').glob('*/*.png'))))
    assert im.shape == (24, 24, 3) and im.std((0, 1)).max() > 10                     # colour on colour
    s = json.loads((out / 'summary.json').read_text())
    assert s['cond'] == 'xattn' and s['step'] == 30
    assert json.loads((out / 'judge' / 'judge.json').read_text())['settings']['style'] == 'unaligned'
    log2 = fsdit('demo', '--out', str(out), '--size', 'tiny', '--data', 'unaligned', '--no-progress')
    assert log2.count('reused') == 8
    r = subprocess.run([sys.executable, '-c', 'import sys; from fsdit.cli import main; sys.exit(main(sys.argv[1:]))',
                        'demo', '--out', str(out), '--size', 'tiny', '--no-progress'], capture_output=True, text=True)
    assert r.returncode == 1 and 'holds unaligned glyphs, not aligned' in r.stderr and 'Traceback' not in r.stderr
