# %% [markdown]
# # Explorer
#
# > An ipywidgets explorer of a trained run: pick a run, a split and a class, draw a support set (or pick the images, or upload your own), switch single supports off, generate with a CFG slider — CFG 0 beside the chosen scale — download the samples, and look at the run's t-bin losses and attention entropy.
#
# The widget is a thin shell: every action is a plain method (`load`, `set_split`, `set_class`,
# `draw_supports`, `pick`, `upload`, `toggle`, `generate`, `metrics_view`) that the buttons and dropdowns
# call, so tests drive it without a browser and read what it shows. Samples come from the same functions as
# `fsdit sample` (the EMA weights, the compiled sampler); supports come from the run's feature store, so the
# condition is exactly the one the model was trained on — or from your own image files, read and encoded
# as `fsdit sample --support FILES` reads and encodes them. `fsdit explore RUN` (`fsdit.app`) serves the
# widget alone as a web app.

# %%
#| default_exp explorer

# %%
#| export
from __future__ import annotations
import base64, io, re, tempfile, time
from pathlib import Path
from typing import Sequence

import numpy as np
import ipywidgets as W
from fsdit.export import codecs_of
from fsdit.features import open_store
from fsdit.images import support_grid, to_uint8
from fsdit.run import is_export, is_run_dir, load_run, run_folder, run_json, run_records
from fsdit.sampler import generate
from fsdit.supports import read_supports, sample_from_supports

# %%
import os, tempfile
from fastcore.test import test_eq, test_fail, test_ne


# %% [markdown]
# ## Runs and their stores
#
# A run is a folder with `config.json` and `checkpoints/` (what `fsdit train --out RUN` writes), or a folder
# of `fsdit export`, or the hub id (`user/name`) of one. Its feature store is the one its `config.json` names,
# else a `feats` folder beside it (the demo's layout), else the one passed in: an export names none, so it
# takes `feats=` (or sits beside a `feats` folder).

# %%
#| export
def is_run(path) -> bool:
    "Whether `path` is a run directory of `fsdit train` or a folder of `fsdit export`."
    return is_run_dir(path) or is_export(path)


def find_runs(root) -> list[Path]:
    "`root` itself if it is a run (or an export, or its hub id), else the runs up to two levels below it, sorted."
    root = run_folder(root)
    if is_run(root): return [root]
    return sorted(p for p in list(root.glob('*')) + list(root.glob('*/*')) if is_run(p))


def find_store(run_dir, config: dict | None = None) -> Path | None:
    "The feature store of a run: named in its config, or `feats` beside the run."
    config = config if config is not None else run_json(run_dir)
    for cand in (config.get('feats'), Path(run_dir).parent / 'feats'):
        if cand and (Path(cand) / 'metadata.json').exists(): return Path(cand)
    return None


# %%
#| export
class RunView:
    "A run, its feature store and codecs: classes, images and samples for the explorer."
    def __init__(self, run_dir, feats=None):
        self.run = load_run(run_dir)
        feats = feats or find_store(run_dir, self.run.config)
        if feats is None: raise ValueError(f"no feature store found for {run_dir}: pass feats=")
        self.store = open_store(feats)
        self.codecs = codecs_of(self.run, self.store.path)
        self._paths = np.asarray(self.store.index['path'])

    @property
    def splits(self) -> list[str]: return [s for s in ('train', 'val', 'test') if len(self.store.rows(s))]

    def classes(self, split: str) -> list[str]: return self.store.classes(split)

    def rows(self, split: str, cls: str) -> np.ndarray:
        "Store rows of the images of class `cls` in `split`."
        return self.store.class_rows(split)[self.classes(split).index(cls)]

    def names(self, rows) -> list[str]: return [Path(p).name for p in self._paths[np.asarray(rows)]]

    def images(self, rows) -> np.ndarray:
        "uint8 (K, H, W, 3) images of store rows, as the model sees them."
        lat = self.store.latents(rows)
        return to_uint8(np.asarray(self.codecs.decode(lat), np.float32), rgb=True)

    def generate(self, rows, n: int, cfg_scale: float, steps: int, seed: int, cfg_interval=None) -> np.ndarray:
        """uint8 (n, H, W, 3): `n` samples conditioned on the supports at store `rows`; guided over the run's `cfg_interval`
        by default, with the run's encoder guidance and start (`TrainConfig.guide_scale`, `from_support`: 0 unless the run sets them)."""
        rows = np.asarray(rows)
        tile = lambda a: np.repeat(np.asarray(a, np.float32)[None], n, 0)
        z = generate(self.run.params, self.run.mc, tile(self.store.embeds[rows]), tile(self.store.latents(rows)),
                     scaling=self.run.scaling, seed=seed, steps=steps, cfg_scale=cfg_scale,
                     cfg_interval=self.run.tc.cfg_interval if cfg_interval is None else cfg_interval,
                     guide=self.codecs.guide, guide_scale=self.run.tc.guide_scale, guide_upto=self.run.tc.guide_upto,
                     from_support=self.run.tc.from_support)
        return to_uint8(np.asarray(self.codecs.decode(z), np.float32), rgb=True)

    def generate_images(self, images, n: int, cfg_scale: float, steps: int, seed: int, cfg_interval=None) -> np.ndarray:
        "uint8 (n, H, W, 3): `n` samples conditioned on uint8 support images (K, H, W, 3), encoded as `fsdit sample` encodes its files."
        x = sample_from_supports(self.run, self.codecs, images, n, cfg_scale=cfg_scale, steps=steps, seed=seed,
                                 cfg_interval=self.run.tc.cfg_interval if cfg_interval is None else cfg_interval,
                                 guide_scale=self.run.tc.guide_scale, guide_upto=self.run.tc.guide_upto,
                                 from_support=self.run.tc.from_support)
        return to_uint8(x, rgb=True)

    def metrics(self) -> list[dict]:
        "The run's logged records (RUN/metrics.jsonl, read by `fsdit.run.run_records`)."
        return run_records(self.run.path)


# %%
#| export
def metrics_view(records: list[dict]) -> dict:
    "{'step', 't_bins': {prefix: [10 values]}, 'entropy': {layer: ([steps], [values])}} from metrics records."
    tb, ent, step = {}, {}, None
    for r in records:
        bins = {}
        for k, v in r.items():
            m = re.fullmatch(r'(.+)/loss_tbin_(\d+)', k)
            if m: bins.setdefault(m[1], {})[int(m[2])] = np.nan if v is None else float(v)
        if bins: tb, step = {p: [b[i] for i in sorted(b)] for p, b in bins.items()}, r['step']
        for k, v in r.items():
            m = re.fullmatch(r'attn/entropy_(early|mid|late)', k)
            if m and v is not None: ent.setdefault(m[1], ([], [])); ent[m[1]][0].append(r['step']); ent[m[1]][1].append(float(v))
    return {'step': step, 't_bins': tb, 'entropy': ent}


def metrics_png(view: dict) -> bytes:
    "A two-panel PNG: t-bin losses, attention entropy over steps."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.8))
    for p, v in view['t_bins'].items(): a.plot((np.arange(len(v)) + 0.5) / len(v), v, 'o-', ms=3, label=p)
    a.set(xlabel='t (0 noise, 1 data)', ylabel='loss', title=f"loss per t-bin (step {view['step']})"); a.legend(fontsize=7)
    for name, (s, v) in view['entropy'].items(): b.plot(s, v, '.-', label=name)
    b.set(xlabel='step', ylabel='nats', title='attention entropy'); b.legend(fontsize=7)
    fig.tight_layout(); buf = io.BytesIO(); fig.savefig(buf, format='png', dpi=80); plt.close(fig)
    return buf.getvalue()


# %% [markdown]
# ## What the explorer needs from a run
#
# `RunView` holds the loaded run (EMA parameters), its store and its codecs. Images of the store are
# shown as the model sees them: the posterior means decoded (in pixel space, the images themselves).
# `generate` uses the store's support embeddings and latents, tiled over the `n` episodes, through
# `fsdit.sampler.generate`, and decodes; `generate_images` takes support images instead and encodes them
# with the run's codecs (`fsdit.supports.sample_from_supports`, the path of `fsdit sample --support`).

# %% [markdown]
# ## The run's training curves
#
# From `metrics.jsonl`: the loss per t-bin (10 bins of $t \in [0, 1]$, 0 = noise, 1 = data) of the last
# record that has them, for the training interval and the validation episodes (live and EMA weights;
# empty bins are `null` and stay gaps), and the attention entropy of the early, middle and late layers
# over the steps.

# %%
recs = [{'step': 5, 'train/loss_tbin_0': 1.0, 'train/loss_tbin_1': None, 'attn/entropy_late': 2.0},
        {'step': 10, 'val/loss_tbin_1': 0.5, 'val/loss_tbin_0': 0.7, 'attn/entropy_late': 1.5, 'attn/entropy_early': 3.0}]
v = metrics_view(recs)
test_eq((v['step'], v['t_bins'], v['entropy']['late']), (10, {'val': [0.7, 0.5]}, ([5, 10], [2.0, 1.5])))
assert metrics_view(recs[:1])['t_bins']['train'][0] == 1.0 and np.isnan(metrics_view(recs[:1])['t_bins']['train'][1])
assert metrics_png(v)[:4] == b'\x89PNG'

# %% [markdown]
# ## The widget
#
# Small images are enlarged with nearest-neighbour so that pixels stay pixels. Every image carries a CSS
# class (`fsdit-support`, `fsdit-sample`), and so do the status line `fsdit-status`, the on/off button
# under each support `fsdit-toggle` and the download link `fsdit-download`: the browser test looks for them.
#
# A generation can be saved: `samples_grid` lays out the supports it used on the top row and one row of
# samples per CFG scale below (the layout of `fsdit sample`'s grid), and `download_link` wraps that PNG in
# a link the browser saves as `fsdit_samples.png`. Images of your own are read by `read_uploads` exactly
# as `fsdit sample --support FILES` reads its files (`fsdit.supports.read_supports`: the store's resize
# rule at the run's image size, every unreadable file named).

# %%
#| export
STYLE = '<style>.fsdit-off { opacity: 0.25; filter: grayscale(1); }</style>'   # a support switched off


def png(image: np.ndarray, min_side: int = 72) -> bytes:
    "PNG bytes of a uint8 image (H, W, 3), enlarged (nearest) to at least `min_side` pixels."
    from PIL import Image
    im = Image.fromarray(np.asarray(image, np.uint8))
    k = max(1, -(-min_side // min(im.size)))
    buf = io.BytesIO(); im.resize((im.width * k, im.height * k), Image.NEAREST).save(buf, 'png')
    return buf.getvalue()


def _image_row(images, css: str) -> list:
    "Image widgets with the CSS class `css` (no tooltips: an Image with a tooltip does not render in Voilà 0.5)."
    out = []
    for im in images:
        w = W.Image(value=png(im), format='png'); w.add_class(css); out.append(w)
    return out


def _sample_rows(samples: dict) -> list:
    "A labelled row of image widgets (`fsdit-sample`) per CFG scale of `samples` {scale: (n, H, W, 3)}."
    label = lambda s: W.HTML(f"<b>CFG {s:g}</b>" + (' (unconditional)' if s == 0 else ''), layout=W.Layout(width='140px'))
    return [W.HBox([label(s)] + _image_row(ims, 'fsdit-sample')) for s, ims in samples.items()]


def samples_grid(supports, samples: dict) -> np.ndarray:
    "uint8 grid: the supports (K, H, W, 3) on the top row, then a row per CFG scale of `samples` {scale: (n, H, W, 3)}."
    ncol = max(len(supports), *(len(s) for s in samples.values()))
    fill = lambda x: np.concatenate([x, np.full((ncol - len(x), *x.shape[1:]), 255, np.uint8)])
    return support_grid(supports, np.concatenate([fill(samples[s]) for s in sorted(samples)]), ncol)


def download_link(image: np.ndarray, name: str = 'fsdit_samples.png') -> str:
    "An HTML link (class `fsdit-download`) that saves the uint8 `image` as the PNG file `name`."
    uri = 'data:image/png;base64,' + base64.b64encode(png(image, 1)).decode()
    style = 'color:#1565c0; text-decoration:underline'
    return f'<a class="fsdit-download" download="{name}" href="{uri}" style="{style}">&#11015; download the samples ({name})</a>'


def read_uploads(files, size: int) -> tuple[list[str], np.ndarray]:
    "Names and uint8 images (K, size, size, 3) of uploaded files (FileUpload values, or (name, bytes) pairs), read as `fsdit sample --support` reads files."
    items = [(f['name'], f['content']) if isinstance(f, dict) else tuple(f) for f in files]
    if not items: raise ValueError('no image uploaded')
    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / str(i) / Path(name).name for i, (name, _) in enumerate(items)]
        for p, (_, data) in zip(paths, items): p.parent.mkdir(); p.write_bytes(bytes(data))
        try: return [p.name for p in paths], read_supports(paths, size)
        except ValueError as e: raise ValueError(re.sub(re.escape(d) + r'/\d+/', '', str(e))) from None


# %%
im = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1).repeat(3, -1)
g = samples_grid(im, {3.0: im[:1], 0.0: np.stack([im[0]] * 3)})          # 2 supports; 1 and 3 samples
test_eq(g.shape, (3 * 5, 3 * 5, 3))                                        # rows: supports, CFG 0, CFG 3
test_eq((g[:3, 5:8], g[5:8, 10:13], g[10:13, :3]), (im[1], im[0], im[0])); assert (g[10:13, 5:] == 255).all()
link = download_link(g)
assert link.startswith('<a class="fsdit-download" download="fsdit_samples.png" href="data:image/png;base64,')
from PIL import Image
_b = io.BytesIO(); Image.fromarray(np.full((20, 30, 3), 9, np.uint8)).save(_b, 'png')
names, ims = read_uploads([('a/b/mine.png', _b.getvalue())], 8)
test_eq((names, ims.shape, int(ims.max())), (['mine.png'], (1, 8, 8, 3), 9))
test_fail(lambda: read_uploads([('notes.txt', b'hello')], 8), contains="cannot read support image(s): notes.txt (")


# %% [markdown]
# The explorer is three layers: its controls (`_Controls`: the widgets and their wiring), its support set
# (`_SupportSet`: drawn, picked or uploaded images, each switched on or off) and the actions on the run
# (`Explorer`). Every control calls a plain method, and a method's error lands in the status line.

# %%
#| export
class _Controls:
    "The explorer's widgets and their wiring: every control calls a plain method of `Explorer`."
    def _controls(self, runs, n: int, seed: int):
        self.run_w = W.Dropdown(options=[(str(p), str(p)) for p in runs], description='run', layout=W.Layout(width='60%'))
        self.split_w, self.class_w = W.Dropdown(description='split'), W.Dropdown(description='class')
        self.pick_w = W.SelectMultiple(description='images', rows=6)
        self.draw_w = W.Button(description='Draw supports', icon='random')
        self.upload_w = W.FileUpload(accept='image/*', multiple=True, description='Your images')
        self.cfg_w = W.FloatSlider(value=3.0, min=0.0, max=10.0, step=0.5, description='CFG scale')
        self.steps_w = W.IntSlider(value=50, min=1, max=200, description='steps')
        self.seed_w = W.IntText(value=seed, description='seed')
        self.n_w = W.IntSlider(value=n, min=1, max=16, description='samples')
        self.gen_w = W.Button(description='Generate', button_style='primary', icon='play')
        self.status = W.HTML(); self.status.add_class('fsdit-status')
        self.support_box, self.sample_box, self.metrics_w, self.download_w = W.HBox(), W.VBox(), W.Image(format='png'), W.HTML()
        self._wire()

    def _wire(self):
        guard = lambda f: (lambda ch: None if self._busy else self._safe(f, ch['new']))
        self.run_w.observe(guard(self.load), 'value')
        self.split_w.observe(guard(self.set_split), 'value')
        self.class_w.observe(guard(self.set_class), 'value')
        self.pick_w.observe(guard(lambda names: self.pick(names) if names else None), 'value')
        self.upload_w.observe(guard(lambda files: self._take_upload(files) if files else None), 'value')
        self.draw_w.on_click(lambda _: self._safe(self.draw_supports))
        self.gen_w.on_click(lambda _: self._safe(self.generate))

    def _take_upload(self, files):
        "Use the uploaded files, then empty the upload control (the same files can be uploaded again)."
        try: self.upload(files)
        finally: self._set(self.upload_w, value=())

    def _safe(self, f, *a):
        "Run a control's action; show an error in the status line instead of losing it in a callback."
        try: return f(*a)
        except Exception as e: self._say(f"<b style='color:#b00'>{type(e).__name__}: {e}</b>")

    def _say(self, html: str): self.status.value = html

    def _set(self, widget, **kw):
        "Change a control without triggering its action."
        self._busy = True
        try:
            for k, v in kw.items(): setattr(widget, k, v)
        finally: self._busy = False

    @property
    def widget(self) -> W.Widget:
        "The explorer as one widget."
        box = lambda *c: W.HBox(list(c))
        return W.VBox([W.HTML(STYLE), self.run_w, box(self.split_w, self.class_w), box(self.draw_w, self.pick_w, self.upload_w),
                       W.HTML('<b>supports</b> (switch one off to leave it out)'), self.support_box,
                       box(W.VBox([self.cfg_w, self.steps_w]), W.VBox([self.n_w, self.seed_w])),
                       self.gen_w, self.status, self.sample_box, self.download_w, W.HTML('<b>training</b>'), self.metrics_w])

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


# %% [markdown]
# The support set is store rows of the current class (`supports`) or uploaded images (`uploaded`); `on`
# says which of them generation uses. Every new set starts all on and clears the samples; switching the
# last one off is refused.

# %%
#| export
class _SupportSet:
    "The explorer's support set: drawn, picked or uploaded images, each switched on or off."
    @property
    def shots(self) -> int: return self.view.run.tc.shots

    def draw_supports(self, seed: int | None = None) -> np.ndarray:
        "Draw `shots` random images of the current class as the support set (seeded by the seed box and draw count)."
        rows = np.asarray([r for _, r in self.pick_w.options])
        if seed is None: seed, self._draws = self.seed_w.value * 10_007 + self._draws, self._draws + 1
        k = min(self.shots, len(rows))
        return self.set_supports(np.sort(np.random.default_rng(seed).choice(rows, k, replace=False)))

    def pick(self, names: Sequence) -> np.ndarray:
        "Use the images named `names` (file names or store rows of the current class) as the support set."
        by_name = dict(self.pick_w.options)
        rows = [by_name.get(x, -1) if isinstance(x, str) else int(x) for x in names]
        if not rows or any(r not in by_name.values() for r in rows):
            raise ValueError(f"pick needs images of class {self.class_w.value!r}; got {list(names)}")
        return self.set_supports(np.asarray(rows))

    def set_supports(self, rows) -> np.ndarray:
        "Use the store `rows` as the support set."
        self.supports, self.uploaded = np.asarray(rows), None
        self._show(self.view.images(self.supports), self.view.names(self.supports),
                   f"of <b>{self.class_w.value}</b> ({self.split_w.value})")
        return self.supports

    def upload(self, files) -> np.ndarray:
        "Use image files of your own as the support set: FileUpload values or (name, bytes) pairs; returns them as read."
        names, images = read_uploads(files, self.view.codecs.image_size)
        self.supports, self.uploaded = np.zeros(0, int), images
        self._show(images, names, 'of your own')
        return images

    def _show(self, images, names, what: str):
        "Show a new support set, all on, as thumbnails with an on/off button each; the last samples no longer apply."
        self.support_images, self.support_names, self.on, self.last = images, list(names), np.ones(len(images), bool), {}
        self.support_imgs = _image_row(images, 'fsdit-support')
        self.toggles = [W.ToggleButton(value=True, description='on', icon='check', layout=W.Layout(width='72px')) for _ in images]
        for i, t in enumerate(self.toggles):
            t.add_class('fsdit-toggle')
            t.observe(lambda ch, i=i: None if self._busy else self._safe(self.toggle, i, ch['new']), 'value')
        self.support_box.children = [W.VBox([im, t]) for im, t in zip(self.support_imgs, self.toggles)]
        self.sample_box.children, self.download_w.value = (), ''
        self._say(f"{len(images)} supports {what}; press Generate")

    def toggle(self, i: int, on: bool | None = None) -> np.ndarray:
        "Switch support `i` on or off (flip it when `on` is None); the last one on stays on. Returns `on`."
        on = not self.on[i] if on is None else bool(on)
        if not on and self.on[i] and self.on.sum() == 1:
            self._set(self.toggles[i], value=True)
            raise ValueError('at least one support must stay on: switch another one on first')
        self.on[i] = on
        self._set(self.toggles[i], value=on, description='on' if on else 'off', icon='check' if on else '')
        (self.support_imgs[i].remove_class if on else self.support_imgs[i].add_class)('fsdit-off')
        self._say(f"{self.on.sum()} of {len(self.on)} supports on; press Generate")
        return self.on


# %%
#| export
class Explorer(_SupportSet, _Controls):
    "Browse a run's classes, take a support set (drawn, picked or your own images) and generate with CFG; every control calls a plain method."
    def __init__(self, root, feats=None, split: str | None = None, n: int = 6, cfg_scale: float | None = None,
                 steps: int | None = None, seed: int = 0):
        self.feats, self.view, self.supports, self.uploaded, self.last = feats, None, np.zeros(0, int), None, {}
        self._draws, self._busy, self.grid = 0, False, None
        runs = find_runs(root)
        if not runs: raise ValueError(f"no run directory (config.json + checkpoints/) or export at or below {root}")
        self._controls(runs, n, seed)
        self.load(runs[0], split, cfg_scale, steps)

    def load(self, run_dir, split: str | None = None, cfg_scale: float | None = None, steps: int | None = None):
        "Load the run at `run_dir` and show its first class of `split` (default: test, else the first split)."
        self.view = RunView(run_dir, self.feats)
        tc = self.view.run.tc
        self._set(self.run_w, value=str(run_dir))
        self._set(self.cfg_w, value=cfg_scale if cfg_scale is not None else tc.cfg_scale)
        self._set(self.steps_w, value=steps or tc.sample_steps)
        self.metrics_w.value = metrics_png(self.metrics_view())
        splits = self.view.splits
        self._set(self.split_w, options=splits, value=None)
        self.set_split(split or ('test' if 'test' in splits else splits[0]))

    def set_split(self, split: str):
        "Show the classes of `split` and select the first."
        if split not in self.view.splits: raise ValueError(f"split {split!r} not in this run's store: {self.view.splits}")
        classes = self.view.classes(split)
        self._set(self.split_w, value=split)
        self._set(self.class_w, options=classes, value=None)
        self.set_class(classes[0])

    def set_class(self, cls: str):
        "Show the images of class `cls` of the current split and draw a support set."
        rows = self.view.rows(self.split_w.value, cls)
        self._set(self.class_w, value=cls)
        self._set(self.pick_w, options=list(zip(self.view.names(rows), rows.tolist())), value=())
        self.draw_supports()

    def generate(self) -> dict:
        "Samples {0.0: (n, H, W, 3) uint8, cfg: ...} of the supports switched on, shown as two rows, with a link to download them."
        if not len(self.supports) and self.uploaded is None: raise ValueError('no support set: draw, pick or upload one first')
        self._say('generating...'); t0, on = time.time(), self.on.copy()
        scales = sorted({0.0, float(self.cfg_w.value)})
        kw = dict(n=self.n_w.value, steps=self.steps_w.value, seed=self.seed_w.value)
        whole = lambda s: (0.0, 1.0) if s == 0 else None       # scale 0 is unconditional all along the path
        gen = (lambda **k: self.view.generate_images(self.uploaded[on], **k)) if self.uploaded is not None else \
              (lambda **k: self.view.generate(self.supports[on], **k))
        self.last = {s: gen(cfg_scale=s, cfg_interval=whole(s), **kw) for s in scales}
        self.sample_box.children = _sample_rows(self.last)
        self.grid = samples_grid(self.support_images[on], self.last)
        self.download_w.value = download_link(self.grid)
        self._say(f"generated {self.n_w.value} images at CFG {' and '.join(f'{s:g}' for s in scales)} from {on.sum()} "
                  f"supports, {self.steps_w.value} steps, in {time.time() - t0:.1f} s")
        return self.last

    def metrics_view(self) -> dict:
        "The run's t-bin losses and attention entropy (see `metrics_view`)."
        return metrics_view(self.view.metrics())


# %% [markdown]
# The actions. Loading a run sets the controls to its training settings (shots, CFG scale, sampler
# steps) and starts on the held-out split when it has one; changing the split or the class draws a fresh
# support set.
#
# `generate` draws `n` samples from the supports switched on, at CFG 0 (the unconditional model) and at the
# chosen scale, from the same noise, shows the two rows one above the other, and offers their grid (`grid`)
# as a PNG to download. Store supports condition through the store's embeddings and latents
# (`RunView.generate`); uploaded images go through the run's codecs at each generation, as in `fsdit sample`
# (`RunView.generate_images`).

# %% [markdown]
# ## A tiny run to explore
#
# The demo's `tiny` size trains a run in seconds (glyphs at 16 px, 30 steps: expect noise, not
# characters). `fsdit demo --out DEMO` makes a real one to point the explorer at. The folder comes from
# `FSDIT_EXPLORER_DIR` when set (to reuse one run across notebooks and tests), else a temporary one.

# %%
from fsdit.glyph.demo import demo
root = Path(os.environ.get('FSDIT_EXPLORER_DIR') or tempfile.mkdtemp()) / 'demo'
run_dir = demo(root, 'tiny', until='train', progress=False)['run']
test_eq(find_runs(root), [run_dir]); test_eq(find_store(run_dir), root / 'feats')

# %%
ex = Explorer(root)
test_eq((ex.split_w.value, ex.class_w.value, len(ex.supports)), ('test', ex.view.classes('test')[0], 5))
test_eq((len(ex.support_box.children), ex.on.tolist()), (5, [True] * 5))
test_eq((ex.support_imgs[0]._dom_classes, ex.toggles[0]._dom_classes), (('fsdit-support',), ('fsdit-toggle',)))

# %% [markdown]
# Clicking Generate (what a user does) fills the two rows, CFG 0 above CFG 3:

# %%
ex.n_w.value, ex.steps_w.value = 3, 4
ex.gen_w.click()
test_eq(sorted(ex.last), [0.0, 3.0]); test_eq(ex.last[3.0].shape, (3, 16, 16, 3))
test_eq([len(r.children) for r in ex.sample_box.children], [4, 4])          # label + 3 images per row
assert 'generated 3 images at CFG 0 and 3' in ex.status.value
assert not np.array_equal(ex.last[0.0], ex.last[3.0]) or ex.view.run.step == 0

# %% [markdown]
# The same seed gives the same images; changing the class through its dropdown draws a new support set
# of that class and clears the samples; picking images by name uses exactly those.

# %%
again = ex.generate()
test_eq(again[3.0], ex.last[3.0])
first_sup = ex.supports.copy()
ex.class_w.value = ex.view.classes('test')[1]
assert set(ex.supports) <= set(ex.view.rows('test', ex.class_w.value)) and not set(ex.supports) & set(first_sup)
test_eq((ex.last, ex.sample_box.children), ({}, ()))
names = [n for n, _ in ex.pick_w.options[:2]]
ex.pick_w.value = tuple(r for _, r in ex.pick_w.options[:2])
test_eq(ex.view.names(ex.supports), names)
test_fail(lambda: ex.pick(['not-an-image.png']), contains='pick needs images of class')

# %% [markdown]
# An error in a control's action shows in the status line; the split dropdown switches to seen classes:

# %%
ex.supports = np.zeros(0, int); ex.gen_w.click()
assert 'no support set' in ex.status.value
ex.split_w.value = 'train'
test_eq((ex.class_w.value, len(ex.supports)), (ex.view.classes('train')[0], 5))

# %% [markdown]
# ## Switching supports off, downloading the samples, your own images
#
# Each support has an on/off button under it (clicking it sets its value); generation uses only the
# supports that are on, and the last one on stays on:

# %%
ex.split_w.value = 'test'
ex.toggles[1].value = False
test_eq(ex.on.tolist(), [True, False, True, True, True])
assert 'fsdit-off' in ex.support_imgs[1]._dom_classes and '4 of 5 supports on' in ex.status.value
ex.gen_w.click()
test_eq(ex.last[3.0], ex.view.generate(ex.supports[ex.on], n=3, cfg_scale=3.0, steps=4, seed=0))
assert 'generated 3 images at CFG 0 and 3 from 4 supports' in ex.status.value
for i in (0, 2, 3): ex.toggle(i, False)
ex.toggles[4].value = False
test_eq((ex.on.tolist(), ex.toggles[4].value), ([False] * 4 + [True], True))
assert 'at least one support must stay on' in ex.status.value
ex.toggle(1)                                                                # flip it back on
test_eq(ex.on.tolist(), [False, True, False, False, True])

# %% [markdown]
# The link under the samples saves the last generation as one PNG: the supports it used on the top row,
# a row of samples per CFG scale below.

# %%
uri = re.search(r'class="fsdit-download" download="fsdit_samples.png" href="data:image/png;base64,([^"]+)"', ex.download_w.value)[1]
got = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))))
test_eq(got, ex.grid); test_eq(got.shape, (3 * 18, 4 * 18, 3))            # 4 supports; 3 samples at CFG 0 and 3; 16 px + 2
test_eq(got[:16, :16], ex.support_images[0]); test_eq(got[36:52, 18:34], ex.last[3.0][1])

# %% [markdown]
# Images of your own (the upload control; `upload` takes its values, or (name, bytes) pairs) become the
# support set: read at the run's image size and encoded by its codecs as `fsdit sample --support FILES`
# reads and encodes files, so the explorer's samples are `fsdit sample`'s. A file that is not an image is
# named in the status line and the support set stays as it was; drawing (or choosing a class) goes back
# to the store.

# %%
import datetime
def png_file(im, side=40):
    b = io.BytesIO(); Image.fromarray(im).resize((side, side)).save(b, 'png'); return b.getvalue()
def uploaded(name, data):
    return {'name': name, 'type': 'image/png', 'size': len(data), 'content': memoryview(data), 'last_modified': datetime.datetime.now()}
mine = {f'mine{i}.png': png_file(im) for i, im in enumerate(ex.view.images(ex.view.rows('test', ex.view.classes('test')[2])[:3]))}
ex.upload_w.value = tuple(uploaded(k, v) for k, v in mine.items())          # what choosing files does
test_eq((len(ex.supports), ex.uploaded.shape, ex.support_names, ex.upload_w.value), (0, (3, 16, 16, 3), list(mine), ()))
files = Path(tempfile.mkdtemp())
for k, v in mine.items(): (files / k).write_bytes(v)
test_eq(ex.uploaded, read_supports(sorted(files.iterdir()), ex.view.codecs.image_size))
ex.toggle(0, False); ex.gen_w.click()
want = sample_from_supports(ex.view.run, ex.view.codecs, ex.uploaded[1:], 3, cfg_scale=3.0, steps=4, seed=0,
                            cfg_interval=ex.view.run.tc.cfg_interval)
test_eq(ex.last[3.0], to_uint8(want, rgb=True)); assert 'from 2 supports' in ex.status.value
ex.upload_w.value = (uploaded('notes.txt', b'hello'),)
assert 'cannot read support image(s): notes.txt (' in ex.status.value and ex.upload_w.value == ()
test_eq(len(ex.uploaded), 3)
ex.draw_w.click()
test_eq((ex.uploaded, len(ex.supports), ex.on.tolist()), (None, 5, [True] * 5))

# %% [markdown]
# The training curves of the run (the tiny run logs every 10 steps and validates at step 30):

# %%
mv = ex.metrics_view()
test_eq(mv['step'], 30); assert {'train', 'val', 'val_ema'} <= set(mv['t_bins']) and len(mv['t_bins']['val']) == 10
test_eq(sorted(mv['entropy']), ['early', 'late', 'mid'])
assert ex.metrics_w.value[:4] == b'\x89PNG'

# %% [markdown]
# A run exported to share (`fsdit export`, `fsdit.export`) opens the same way — by its folder or its hub id — given
# the store it was trained on: the same supports give the same samples, and its training curves came with it.

# %%
from fsdit.export import export_run
shared = Path(tempfile.mkdtemp()) / 'shared'
export_run(run_dir, shared)
test_eq(find_runs(shared), [shared])
ex_shared = Explorer(shared, feats=root / 'feats', n=2, steps=3)
kw = dict(n=2, cfg_scale=3.0, steps=3, seed=0)
test_eq(ex_shared.view.generate(ex.supports, **kw), ex.view.generate(ex.supports, **kw))
test_eq(ex_shared.metrics_view()['step'], 30)

# %% [markdown]
# The explorer itself (live in Jupyter, or alone as an app: `fsdit explore RUN`, `fsdit.app`; in the docs the controls are inert):

# %%
ex.split_w.value = 'test'
ex.widget
