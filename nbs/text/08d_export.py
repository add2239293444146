# %% [markdown]
# # Sharing a run
#
# > `fsdit export RUN OUT`: a trained run as a folder anyone can sample from — the EMA weights as safetensors, the model, training and sampling configs and the codecs as JSON, the encoder folder it needs, and a model card with the run's few-shot figures and held-out grid. No pickle. `load_run`, `fsdit sample`, `fsdit eval` and the explorer read it, from the folder or from its hub id.

# %%
#| default_exp export

# %%
#| export
from __future__ import annotations
import json, shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from fsdit.codecs import DEFAULT_ENCODER, Codecs, PixelEncoder, PixelSpace, run_codecs, store_meta
from fsdit.config import config_to_dict, interval_text
from fsdit.files import building
from fsdit.run import EXPORT_FORMAT, Run, copy_run_log, flat_params, load_run, run_eval
from fsdit.vae import DEFAULT_VAE

# %%
import contextlib, io, os, tempfile
import jax
from fastcore.test import test_eq, test_fail
from PIL import Image
from fsdit.config import train_config
from fsdit.codecs import offline_model_config
from fsdit.run import is_export, write_run_config, checkpoint_manager, save_checkpoint
from fsdit.sampler import generate
from fsdit.state import create_state
from fsdit.testing import perturb, raises

tmp = Path(tempfile.mkdtemp())


def fresh_run(d, mc, tc, extra=None):
    "A run saved as `fsdit train` saves one, its EMA weights perturbed so that its samples depend on them."
    write_run_config(d, mc, tc, 'pixel', extra)
    s = create_state(mc, tc); s = s.replace(ema_params=perturb(s.ema_params, 0.1))
    with checkpoint_manager(d, keep=1) as m: save_checkpoint(m, s, {})
    return Path(d)


def samples(run, codecs, supports, seed=0):
    "Two samples of the class of the uint8 `supports`, as `fsdit sample` draws them (2 Euler steps)."
    emb, lat = codecs.encode(supports)
    tile = lambda a: np.repeat(a[None], 2, 0)
    z = generate(run.params, run.mc, tile(emb), tile(lat), scaling=run.scaling, seed=seed, steps=2, cfg_scale=3.0,
                 cfg_interval=run.tc.cfg_interval)
    return np.asarray(codecs.decode(z))


mc, tc = offline_model_config('mu', size=8, channels=3, embed_dim=16), train_config('test', shots=3, cfg_interval=(0.5, 1.0))
run_dir = fresh_run(tmp / 'run', mc, tc)
sup = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)


# %% [markdown]
# ## What the run's codecs are
#
# A run samples from support images through its codecs (`fsdit.codecs.run_codecs`): the support encoder and
# the VAE (or pixel space) its feature store names, at the store's image size. An export cannot rely on the
# store — it stays behind — so it records them: `codec_names` says what they are without loading any (the
# store's names, else what `run_codecs` falls back to without a store), with the space and the latent scale.
# `codecs_of` builds the codecs of a run: a plain run's as `run_codecs` does, an export's from what it
# recorded (the encoder folder it carries, the image size), whatever store is given; `--encoder`/`--vae` still
# override.

# %%
#| export
def codec_names(run: Run, warn: Callable[[str], None] | None = None) -> dict:
    "The run's codecs by name, loading none: encoder, vae, image_size (of the supports), its space and latent scale."
    if run.config.get('codecs'): c = {k: run.config['codecs'][k] for k in ('encoder', 'vae', 'image_size')}   # an export
    else:
        mc, pixel, meta = run.mc, run.space == 'pixel', store_meta(run)
        if meta is None and run.config.get('feats') and warn:
            warn(f"the run's feature store {run.config['feats']} is not there: recorded the codecs `fsdit sample` uses without it")
        meta = meta or {}
        c = {'encoder': meta.get('encoder') or (PixelEncoder(dim=mc.support_dim).name if pixel else DEFAULT_ENCODER),
             'vae': PixelSpace(mc.input_size, mc.in_channels).name if pixel else meta.get('vae') or DEFAULT_VAE,
             'image_size': int(meta.get('image_size', mc.input_size if pixel else 224))}
    return {**c, **run.space_record()}


def codecs_of(run: Run, feats=None, encoder: str | None = None, vae: str | None = None) -> Codecs:
    "The run's codecs: `run_codecs` for a run; for an export, the ones it recorded and carries (a store given is not asked)."
    c = run.config.get('codecs')
    if not c: return run_codecs(run, feats, encoder, vae)
    return replace(run_codecs(run, None, encoder or c['encoder'], vae or c['vae']), image_size=int(c['image_size']))


# %% [markdown]
# A pixel-space run without a store has the stand-ins of its model's shape:

# %%
run = load_run(run_dir)
test_eq(codec_names(run), {'encoder': PixelEncoder(dim=16).name, 'vae': 'pixel-8x3', 'image_size': 8, 'space': 'pixel',
                           'latent_scale': 1.0})
test_eq(codecs_of(run).names, run_codecs(run).names)


# %% [markdown]
# ## The model card
#
# `README.md` of the export, front matter for the Hugging Face hub included. It says what the model is (its
# configs, its codecs — and when the support encoder is a stand-in, that it is not SigLIP2), how to sample from
# it, and how well it does: the run's few-shot figures when there are any — `RUN/eval/eval.json` (`fsdit eval`),
# else the demo's `summary.json` beside the run — with the step they were measured at, and its held-out grid
# (`samples_heldout.png` in or beside the run). When there are none, the card says so instead of leaving a gap.

# %%
#| export
def _demo_summary(p: Path) -> dict:
    try: data = json.loads(p.read_text())
    except ValueError as e: raise ValueError(f"{p} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict): raise ValueError(f"{p} cannot be read (no figures in it)")
    return data


def few_shot_figures(run_dir) -> tuple[str, dict] | None:
    "('eval.json', RUN/eval/eval.json) of `fsdit eval`, else ('summary.json', the demo's summary beside the run); None when neither is there."
    d = Path(run_dir)
    try:
        if (ev := run_eval(d)) is not None: return 'eval.json', ev
        p = next((p for p in (d / 'summary.json', d.parent / 'summary.json') if p.is_file()), None)
        return None if p is None else ('summary.json', _demo_summary(p))
    except ValueError as e: raise ValueError(f"{e}: make it again, or move it away to export without figures") from None


def heldout_grid(run_dir) -> Path | None:
    "The run's held-out sample grid: samples_heldout.png in the run, else beside it (the demo's)."
    d = Path(run_dir)
    return next((p for p in (d / 'samples_heldout.png', d.parent / 'samples_heldout.png') if p.is_file()), None)


# %% [markdown]
# A run that was never evaluated has neither; the demo's summary beside a run is found, and a figures file that is
# there but cannot be read is refused, naming it:

# %%
_sm = {'step': 2200, 'cfg': 8.0, 'test': {'classes': 40, 'real': {'judge_acc': 0.853, 'glyph_fd': 25.2},
                                         'model': {'judge_acc': 0.693, 'glyph_fd': 42.9},
                                         'vs_real': {'judge_acc': 0.812, 'glyph_fd': 1.70}}}
test_eq(few_shot_figures(run_dir), None); test_eq(heldout_grid(run_dir), None)
_fx = tmp / 'figs' / 'run'; (_fx / 'eval').mkdir(parents=True); (_fx.parent / 'summary.json').write_text(json.dumps(_sm))
test_eq(few_shot_figures(_fx), ('summary.json', _sm))
(_fx / 'eval' / 'eval.json').write_text('{"records": [')                 # an eval cut short is refused, not skipped
assert raises(lambda: few_shot_figures(_fx), 'eval.json cannot be read (JSONDecodeError').endswith('to export without figures')

# %% [markdown]
# The figures become a Markdown table: one row per record of an eval.json, one per split and method of a summary.

# %%
#| export
HEADLINE = {'judge_acc': 'judge class consistency', 'glyph_fd': 'glyph-FD', 'glyph_kid': 'glyph-KID',
            'proto_acc': 'class consistency (prototypes)', 'fd_embed': 'FD (embedding)', 'fid': 'FID',
            'diversity_judge': 'diversity (judge)', 'diversity_embed': 'diversity (embedding)',
            'nn_support_judge': 'distance to nearest support (judge)', 'nn_support_embed': 'distance to nearest support (embedding)'}
SPLIT_NAMES = {'test': 'held-out (test)', 'val': 'validation', 'train': 'seen (train)'}


def _fmt(metric: str, v, ratio: bool = False) -> str:
    if not isinstance(v, (int, float)) or v != v: return '-'
    if ratio: return f"{v:.2f}x"
    return f"{100 * v:.1f}%" if metric.endswith('_acc') else f"{v:.4g}"


def _table(head: list, rows: list) -> str:
    return '\n'.join('| ' + ' | '.join(map(str, r)) + ' |' for r in [head, ['---'] * len(head), *rows])


def figures_table(source: str, data: dict) -> str:
    "A Markdown table of the few-shot figures of an eval.json (one row a record) or a demo summary.json (vs_real = model / real)."
    if source == 'eval.json':
        recs = [r for r in data['records'] if isinstance(r, dict)]
        ms = [m for m in HEADLINE if any(isinstance(r.get(m), (int, float)) for r in recs)]
        rows = [[SPLIT_NAMES.get(r.get('split'), r.get('split')), r.get('method'), r.get('shots'),
                 '-' if r.get('cfg') is None else f"{r['cfg']:g}", *(_fmt(m, r.get(m)) for m in ms)] for r in recs]
        return _table(['classes', 'method', 'shots', 'CFG', *(HEADLINE[m] for m in ms)], rows)
    rows = [(s, d, m) for s, d in data.items() if isinstance(d, dict) and 'model' in d
            for m in ('real', 'copy', 'mean', 'model', 'vs_real') if isinstance(d.get(m), dict)]
    ms = [m for m in HEADLINE if any(isinstance(d[meth].get(m), (int, float)) for _, d, meth in rows)]
    return _table(['classes', 'method', *(HEADLINE[m] for m in ms)],
                  [[f"{SPLIT_NAMES.get(s, s)}, {d.get('classes', '?')}", meth, *(_fmt(m, d[meth].get(m), meth == 'vs_real') for m in ms)]
                   for s, d, meth in rows])


# %%
_ev = {'step': 30, 'records': [{'split': 'test', 'method': 'real', 'shots': 5, 'cfg': None, 'proto_acc': 0.5, 'fd_embed': 1.25},
                               {'split': 'test', 'method': 'model', 'shots': 5, 'cfg': 3.0, 'proto_acc': 0.4, 'fd_embed': 2.5}]}
test_eq(figures_table('eval.json', _ev).splitlines()[-1], '| held-out (test) | model | 5 | 3 | 40.0% | 2.5 |')
_t = figures_table('summary.json', _sm)
assert '| held-out (test), 40 | model | 69.3% | 42.9 |' in _t and '| held-out (test), 40 | vs_real | 0.81x | 1.70x |' in _t


# %%
#| export
def _encoder_note(name: str, carried: bool) -> str:
    if name.startswith('stand-in/'): return 'a fixed random projection of downsampled pixels, a stand-in: **not SigLIP2**'
    if carried: return 'carried in this folder'
    return 'a Hugging Face hub id' if not Path(name).is_absolute() else 'a local folder'


def model_card(run: Run, name: str, codecs: dict, carried: set, figures: tuple[str, dict] | None, grid: bool) -> str:
    "The export's README.md: what the model is, how to sample from it, its few-shot figures and held-out grid (or that there are none)."
    mc, tc = run.mc, run.tc
    n_params = sum(int(np.prod(np.shape(v))) for v in flat_params(run.params).values())
    space = 'pixel space' if run.space == 'pixel' else f"VAE latent space, latent scale {run.scaling.scale:g}"
    shots = ' '.join(f's{i}.png' for i in range(1, tc.shots + 1))
    enc, vae = codecs['encoder'], codecs['vae']
    lines = ['---', 'library_name: fsdit', 'tags:', *(f'- {t}' for t in ('few-shot', 'image-generation', 'flow-matching',
             'diffusion-transformer', 'jax')), '---', '', f'# {name}', '',
             'A few-shot image generator: a flow-matching Diffusion Transformer (fsdit) that, given a few support images '
             'of a class (also of a class it never saw in training), draws new images of that class. Exported with '
             f'`fsdit export` from a run at step {run.step}: its EMA weights (`model.safetensors`) and its configs '
             '(`config.json`), no pickle.', '', '## Use', '', '```bash',
             f'fsdit sample --run USER/NAME --support {shots} --n 16 --out grid.png',
             '```', '',
             '`--run` takes this folder or its hub id (`USER/NAME`, resolved through `huggingface_hub` and its cache); the '
             'samples are the same as the run\'s, seed for seed. In Python: `fsdit.run.load_run(\'USER/NAME\')`. '
             '`fsdit eval --run USER/NAME --feats FEATS` scores it on a feature store (`fsdit precompute`).', '',
             '## Model', '', _table(['setting', 'value'], [
                 ['conditioning on the supports', f'`{mc.cond}`'], ['width, depth, heads', f'{mc.hidden}, {mc.depth}, {mc.heads}'],
                 ['input', f'{mc.input_size}x{mc.input_size}x{mc.in_channels}, {space}'],
                 ['patch, tokens', f'{mc.patch}, {mc.tokens}'], ['parameters', f'{n_params:,}'],
                 ['training', f'{run.step} steps of {tc.batch_size} {tc.shots}-shot episodes, lr {tc.lr:g}, EMA {tc.ema_decay:g}'],
                 ['support encoder', f'`{enc}` ({_encoder_note(enc, "encoder" in carried)})'],
                 ['VAE', f'`{vae}`' + (' (carried in this folder)' if 'vae' in carried else ' (the images themselves)'
                                        if run.space == 'pixel' else '')],
                 ['support image size', f"{codecs['image_size']} px"],
                 ['sampling (the run\'s defaults)', f'{tc.sample_steps} Euler steps, CFG {tc.cfg_scale:g}'
                  f'{interval_text(tc.cfg_interval)}, {tc.shots} supports']]), '', '## Few-shot figures', '']
    if figures:
        src, data = figures
        step = data.get('step')
        where = ('`fsdit eval` (`eval/eval.json` here)' if src == 'eval.json' else "`fsdit demo`'s judge (`summary.json` here)")
        lines += [f"Measured by {where} at step {step if step is not None else '?'}"
                  + ('' if step in (None, run.step) else f", not the exported step {run.step}") + '; real images are the reference '
                  '(`vs_real` = model / real), with copying a support and the supports\' mean where they were measured:', '',
                  figures_table(src, data), '']
    else:
        lines += ['None: the run was not evaluated before it was exported (no `RUN/eval/eval.json` of `fsdit eval`, no '
                  "`fsdit demo` `summary.json` beside the run). Score it with `fsdit eval`.", '']
    lines += ['## Held-out classes', '']
    lines += (['![held-out classes: supports | samples](samples_heldout.png)', '',
               'One class a row, classes the model never saw in training: the supports, then samples.', '']
              if grid else ['No held-out sample grid was found in or beside the run.', ''])
    return '\n'.join(lines)


# %% [markdown]
# The card of a run without figures or a grid says so; with the demo's figures it gives the step they were measured at:

# %%
_card = model_card(run, 'tiny', codec_names(run), set(), None, False)
assert _card.startswith('---\nlibrary_name: fsdit') and 'None: the run was not evaluated' in _card and 'not SigLIP2' in _card
assert 'No held-out sample grid' in _card and f'at step {run.step}' in _card
_c2 = model_card(run, 'tiny', codec_names(run), set(), ('summary.json', _sm), True)
assert 'at step 2200, not the exported step 0' in _c2 and '](samples_heldout.png)' in _c2


# %% [markdown]
# ## Writing the export
#
# ```
# OUT/config.json         the run's model and train configs, space, latent scale, step; "format": "fsdit-export";
#                         "sampling" (the run's defaults) and "codecs" (encoder, vae, image_size, space, latent_scale)
# OUT/model.safetensors   the EMA weights, one float32 tensor per parameter (`block_0/attn/q/kernel`)
# OUT/encoder/ OUT/vae/   a codec the run's store names by a local folder, copied (its JSON and safetensors files)
# OUT/README.md           the model card
# OUT/samples_heldout.png the held-out grid, when the run has one
# OUT/eval/eval.json or OUT/summary.json   the figures the card shows (eval.json without local paths)
# OUT/metrics.jsonl       the training log, for the explorer's curves
# ```
#
# A codec named by a local folder — the glyph encoder `fsdit demo --data unaligned` trains, a SigLIP2 or VAE
# folder passed to `fsdit precompute` — is copied in and recorded by its name in the export (`encoder`), so the
# export samples on a machine without that folder; hub ids and stand-ins are recorded as they are. Only the
# files a loader reads are copied (`*.json`, `*.safetensors`): a `.bin` or `.ckpt` beside them is a pickle.
#
# The folder is built whole or not at all (`fsdit.files.building`): written into a hidden sibling and renamed
# onto `OUT` when complete, so an interrupted export leaves no folder that could be taken for a whole one. An
# `OUT` that exists and is not empty is refused, as a folder that is not a run, before anything is written.

# %%
#| export
def _copy_codec(src: Path, dst: Path):
    "Copy a codec folder's loader files (JSON, safetensors; never a pickle) into `dst`."
    files = [p for p in sorted(src.iterdir()) if p.is_file() and p.suffix in ('.json', '.safetensors')]
    if not any(p.suffix == '.safetensors' for p in files):
        raise ValueError(f"{src} holds no safetensors weights to carry: save the codec as safetensors and precompute again")
    dst.mkdir()
    for p in files: shutil.copy2(p, dst / p.name)


def export_run(run_dir, out, log: Callable[[str], None] | None = None) -> dict:
    "Write the run at `run_dir` (or an export, or its hub id) as the folder `out` to share; returns what went in."
    from safetensors.numpy import save_file
    out = Path(out)
    if out.is_dir() and any(out.iterdir()): raise FileExistsError(f"{out} exists and is not empty: delete it or choose another folder")
    run = load_run(run_dir, warn=log)
    codecs, carried = codec_names(run, log), set()
    figures, grid = few_shot_figures(run.path), heldout_grid(run.path)
    with building(out) as tmp:
        for k in ('encoder', 'vae'):
            p = Path(codecs[k]).expanduser()
            if p.is_dir(): _copy_codec(p, tmp / k); codecs[k] = k; carried.add(k)
            elif p.is_absolute(): raise ValueError(f"the run's {k} folder {p} is not there: put it back, the export carries it")
        cfg = {'format': EXPORT_FORMAT, 'format_version': 1, 'step': run.step, 'model': config_to_dict(run.mc),
               'train': config_to_dict(run.tc), **run.space_record(),
               'sampling': {'steps': run.tc.sample_steps, 'cfg_scale': run.tc.cfg_scale, 'cfg_interval': list(run.tc.cfg_interval),
                            'shots': run.tc.shots, 'method': 'euler'},
               'codecs': codecs}
        save_file({k: np.ascontiguousarray(v) for k, v in flat_params(run.params).items()}, str(tmp / 'model.safetensors'),
                  metadata={'format': EXPORT_FORMAT, 'step': str(run.step)})
        (tmp / 'config.json').write_text(json.dumps(cfg, indent=1))
        if figures:
            src, data = figures
            data = {k: v for k, v in data.items() if k not in ('run', 'store')}     # local paths, meaningless elsewhere
            f = tmp / ('eval/eval.json' if src == 'eval.json' else 'summary.json'); f.parent.mkdir(exist_ok=True)
            f.write_text(json.dumps(data, indent=1))
        if grid: shutil.copyfile(grid, tmp / 'samples_heldout.png')
        copy_run_log(run.path, tmp / 'metrics.jsonl')
        (tmp / 'README.md').write_text(model_card(run, out.name, codecs, carried, figures, grid is not None))
    return {'out': out, 'step': run.step, 'codecs': codecs, 'carried': sorted(carried),
            'figures': figures[0] if figures else None, 'grid': grid}


# %% [markdown]
# The fresh run exported: every file there, the weights read back to the bit as safetensors, and the export
# samples exactly as the run does:

# %%
info = export_run(run_dir, tmp / 'shared')
ex = tmp / 'shared'
test_eq(sorted(p.name for p in ex.iterdir()), ['README.md', 'config.json', 'model.safetensors'])
test_eq((info['figures'], info['grid'], info['carried']), (None, None, []))
from safetensors.numpy import load_file
_w = load_file(str(ex / 'model.safetensors'))
for k, v in flat_params(run.params).items(): test_eq(_w[k], np.asarray(v))
_cfg = json.loads((ex / 'config.json').read_text())
test_eq((_cfg['format'], _cfg['step'], _cfg['sampling']['cfg_interval'], _cfg['codecs']['image_size']), (EXPORT_FORMAT, 0, [0.5, 1.0], 8))
shared = load_run(ex)
assert is_export(ex) and shared.config['codecs'] == codec_names(run)
test_eq(samples(shared, codecs_of(shared), sup), samples(run, codecs_of(run), sup))

# %% [markdown]
# ## A run that needs its encoder folder
#
# A store made with a saved glyph encoder (`fsdit.glyph.encoder`) names its folder; the export carries a copy.
# The original folder can then go: the export still samples exactly as the run did. The demo's figures and
# held-out grid beside the run go into the card.

# %%
from fsdit.data import prepare
from fsdit.features import precompute
from fsdit.glyph.data import make_offline_dataset, offline_split_sizes
from fsdit.glyph.encoder import GlyphEncoder, GlyphEncoderSpec, GlyphEncoderNet
make_offline_dataset(tmp / 'glyphs', per_class=6, size=16, chars='0123λ€')
prepare(tmp / 'glyphs', tmp / 'split', **offline_split_sizes(6), seed=0)
_gs = GlyphEncoderSpec(embed_dim=8)
_gdir = GlyphEncoder(_gs, GlyphEncoderNet(_gs).init(jax.random.PRNGKey(0), np.zeros((1, 24, 24, 3)))['params']).save_pretrained(tmp / 'demo' / 'encoder')
(_gdir / 'pytorch_model.bin').write_bytes(b'a pickle that must not travel')
precompute(tmp / 'split', tmp / 'demo' / 'feats', GlyphEncoder.from_pretrained(_gdir), PixelSpace(16, 3), 16, 'pixel', progress=False)
mc2 = offline_model_config('mu', size=16, channels=3, embed_dim=8, cond='aligned')
run2_dir = fresh_run(tmp / 'demo' / 'run', mc2, tc, {'feats': str(tmp / 'demo' / 'feats'), 'latent_scale': 1.0})
(tmp / 'demo' / 'summary.json').write_text(json.dumps(_sm))
Image.new('RGB', (40, 20), 'white').save(tmp / 'demo' / 'samples_heldout.png')
run2 = load_run(run2_dir); sup2 = np.random.default_rng(1).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
before = samples(run2, codecs_of(run2), sup2)
info2 = export_run(run2_dir, tmp / 'shared2')
ex2 = tmp / 'shared2'
test_eq((info2['carried'], info2['figures'], sorted(p.name for p in (ex2 / 'encoder').iterdir())),
        (['encoder'], 'summary.json', ['config.json', 'model.safetensors']))
test_eq(json.loads((ex2 / 'config.json').read_text())['codecs']['encoder'], 'encoder')
card = (ex2 / 'README.md').read_text()
assert '69.3%' in card and '](samples_heldout.png)' in card and (ex2 / 'samples_heldout.png').is_file() and 'carried in this folder' in card
shutil.move(tmp / 'demo' / 'encoder', tmp / 'encoder-gone')                      # the original folder goes away
shared2 = load_run(ex2)
test_eq(codecs_of(shared2).names['encoder'], str(ex2 / 'encoder'))
test_eq(samples(shared2, codecs_of(shared2), sup2), before)
shutil.move(tmp / 'encoder-gone', tmp / 'demo' / 'encoder')

# %% [markdown]
# Refused, before anything is written: an `OUT` that is not empty, a folder that is not a run. An export that
# fails half way leaves nothing behind:

# %%
raises(lambda: export_run(run_dir, ex), 'exists and is not empty', FileExistsError)
raises(lambda: export_run(tmp / 'split', tmp / 'x'), 'not a run directory')
_card_fn = model_card
def model_card(*a, **k): raise OSError('No space left on device')
raises(lambda: export_run(run_dir, tmp / 'half'), 'No space left', OSError)
model_card = _card_fn
test_eq([p.name for p in tmp.iterdir() if 'half' in p.name], [])

# %% [markdown]
# ## From the hub
#
# Uploaded (`hf upload USER/NAME OUT`), an export is read by its hub id. Here the hub's cache is laid out by
# hand, as `huggingface_hub` lays it out after a download, and the hub is off: the id resolves from the cache.

# %%
from huggingface_hub import constants as _hc
_rev = 'a' * 40
_snap = tmp / 'hub' / 'models--user--tiny' / 'snapshots' / _rev
shutil.copytree(ex2, _snap); (_snap.parents[1] / 'refs').mkdir(); (_snap.parents[1] / 'refs' / 'main').write_text(_rev)
_saved = _hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE
_hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE = True, str(tmp / 'hub')
try:
    hubbed = load_run('user/tiny')
    test_eq(hubbed.path, _snap)
    test_eq(samples(hubbed, codecs_of(hubbed), sup2), before)
finally: _hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE = _saved

# %% [markdown]
# ## Command line
#
# `fsdit export RUN OUT`. `RUN` is the `--out` folder of `fsdit train` (the demo's `DEMO/run`), an export,
# or a hub id. Prints what went in; a refusal is one line, exit status 1, and writes nothing. The command is
# `fsdit.commands.export`; on the runs above:

# %%
from fsdit.commands.export import export_cli
with contextlib.redirect_stdout(io.StringIO()) as o, contextlib.redirect_stderr(io.StringIO()) as e:
    test_eq(export_cli([str(run2_dir), str(tmp / 'shared3')]), 0)
    test_eq(export_cli([str(run2_dir), str(tmp / 'shared3')]), 1)
    test_eq(export_cli([str(tmp / 'split'), str(tmp / 'shared4')]), 1)
    test_eq(export_cli([str(run2_dir), str(tmp / 'demo' / 'summary.json')]), 1)
assert 'step 0, encoder encoder (carried), figures: summary.json, held-out grid: yes' in o.getvalue()
_lines = e.getvalue().splitlines()
test_eq(len(_lines), 3); assert all(l.startswith('fsdit export: ') for l in _lines)
assert 'exists and is not empty' in _lines[0] and 'not a run directory' in _lines[1] and 'is a file' in _lines[2]
assert not (tmp / 'shared4').exists()
