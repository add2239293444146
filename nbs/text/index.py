# %% [markdown]
# # fsdit
#
# > Few-shot image generation: a flow-matching Diffusion Transformer in JAX/Flax that, given 5 images of a class it has never seen, generates new images of that class.
#
# fsdit conditions a DiT on frozen SigLIP2 B/16 embeddings of a support set and works in Stable
# Diffusion VAE latent space. It is a literate project: each component — config, data, encoder, VAE,
# feature store, DiT, flow-matching loss, sampler, the sharded trainer (jit over a device mesh, data parallel or FSDP), sampling and evaluation, the
# explorer — is defined and tested in a notebook under `nbs/` and exported to the `fsdit` package.
#
# ```
# 5 support images -> [SigLIP2 B/16, frozen] -> mean of L2-normalised embeddings -> MLP -> + t_emb -> adaLN
# target image     -> [SD-VAE, frozen]       -> latent 28x28x4 -> DiT-B/2 (adaLN-Zero, 196 tokens) -> velocity
# ```
#
# ## Two commands
#
# On a fresh machine with Python 3.10+, `make` and network access to PyPI:
#
# ```bash
# make demo   # sets up .venv and runs the main job: the whole chain offline on a small real dataset
# make test   # sets up .venv with the test extras and runs every test (pytest, then nbdev_test)
# ```
#
# `make test` installs the CPU build of torch first (`torch==2.13.0`, a test-time reference only), so no
# dependency can pull a CUDA build. Neither command needs a model hub: the tests build tiny random
# SigLIP and SD-VAE checkpoints with transformers/diffusers and load them through the same code that
# loads `google/siglip2-base-patch16-224` and `stabilityai/sd-vae-ft-mse`.

# %% [markdown]
# ## The demo: few-shot generation you can see, on a CPU
#
# `make demo` runs `fsdit demo --out demo`. It renders a real dataset from the fonts matplotlib ships —
# **characters as classes, fonts as images**: 1,000 characters that look different from each other (Latin,
# Greek, Cyrillic, IPA, Armenian, Hebrew, Arabic, arrows, maths, dingbats, Braille, ...), 20 images each at
# 16x16 gray — and splits it by class: 700 train, 100 val and 200 held-out test classes never seen in
# training. It builds a pixel-space feature store, trains a glyph classifier on every class to be the judge,
# trains a small DiT (width 128, depth 4, patch 2 -> 64 tokens; 2,200 steps of 32 episodes, lr 2e-3) with the
# supports aligned beside the target (`cond='aligned'`) and without the seed's horizontal flip (a mirrored character is
# another character), draws sample grids for seen and held-out classes, and
# scores them with the judge beside real images and two trivial baselines. It prints each stage, its
# progress and how long it took; running it again skips every stage whose output is complete, and an
# interrupted run resumes.
#
# ```
# demo/glyphs/ demo/split/ demo/feats/ demo/judge/ demo/run/ (config.json, checkpoints/, metrics.jsonl)
# demo/samples_seen.png  demo/samples_heldout.png   one class a row: 5 supports | 8 samples (CFG 8 for t in [0.6, 0.9])
# demo/eval/eval.json + fig_*.png   demo/summary.json   demo/timings.json
# ```
#
# Offline there is no model hub, so the demo uses two stand-ins: the images themselves are the
# "latents" (pixel space instead of the SD-VAE), and the support encoder is a fixed random projection of
# downsampled pixels (`fsdit.codecs.PixelEncoder`) — **not SigLIP2**. Everything else (store, episodes,
# trainer, sampler, eval) is the code a miniImageNet run uses.
#
# **The judge** (`fsdit.judge`) is a small CNN trained on fresh renderings of all 1,000 classes (train, val
# and held-out alike: it reads characters, it is not the generator), so every image of the dataset is one it
# never saw; it reads them at 85.5% (85.2% on the Xeon guest; chance 0.1%). Class consistency is its verdict, out
# of all 1,000 classes, against the supports' class. **Glyph-FD** is the Fréchet distance in its 256-wide
# penultimate features between generated images and one half of every class's real images; the other half
# against the same half is the floor (equal sample sizes). Diversity (mean pairwise distance within a class)
# and the distance to the nearest support are measured in the same features. Blur cannot fool it: the
# supports' mean image is 6x the floor on glyph-FD.
#
# Measured with `make demo` from a fresh clone on a 2-core CPU with nothing else running: 13.7 minutes
# from the clone to the last figure (install 0.9; stages: data 0.4, store 0.2, judge 1.2, train 9.7, samples 0.2, eval 1.0;
# a 2-core Intel Xeon KVM guest, at lr 1e-3: the learning rate does not change the cost); on a 2-core AMD EPYC KVM guest, whose step is faster, 9.7 minutes (install 0.5;
# data 0.3, store 0.1, judge 0.8, train 7.2, samples 0.1, eval 0.7) with the default's numbers below to the digit.
# With the guidance below, on a Xeon guest again (faster that day), 7.4 minutes (install 0.4; data 0.2, store 0.1,
# judge 0.6, train 5.4, samples 0.1, eval 0.6), with the default's rows below to the digit and the grid byte-identical.
# With today's default of 2,200 steps of 32 episodes (below), on the quiet EPYC guest, **9.0 minutes** (install 0.5;
# data 0.3, store 0.1, judge 0.7, train 6.6, samples 0.1, eval 0.7).
# The learning rate (2e-3), the guidance (scale 8 over the last 40% of the path, below) and the 15 Euler steps were
# chosen on validation classes (`bench/demo_cfg.py`); the held-out numbers below were not tuned on. The rows marked
# "3 all along" sample the same checkpoints with guidance over the whole path, as the demo did before; the figures of
# the default's rows are from the EPYC guest and those of the next five fsdit rows from the Xeon guest. The remaining rows come from their own earlier runs of
# `fsdit demo` (the flip's rows sampled with 25 steps).
#
# | held-out classes (40 of 200) | guidance | judge class consistency | glyph-FD | diversity | distance to nearest support |
# |---|---|---|---|---|---|
# | real images (floor / ceiling) | | 85.3% | 25.2 | 1.25 | 0.94 |
# | copy a support | | 84.0% | 17.4 | 1.17 | 0.00 |
# | support mean (a blur) | | 65.5% | 158.7 | 0.69 | 0.95 |
# | **fsdit, aligned supports (default: 2,200 steps of 32)** | **8, t >= 0.6** | **69.3%** | **42.9** | 1.27 | 0.98 |
# | the previous default: 1,100 steps of 64 | 8, t >= 0.6 | 70.3% | 44.5 | 1.27 | 0.99 |
# | the same | 3 all along | 72.3% | 55.8 | 1.22 | 0.98 |
# | **`--size long`: width 192, depth 6, 6,000 steps of 64, lr 1e-3, EMA 0.999** | **4, t >= 0.5** | **82.5%** | **31.1** | 1.20 | 0.91 |
# | the same at depth 4 (the previous long size) | 4, t >= 0.5 | 81.0% | 33.2 | 1.21 | 0.92 |
# | the same recipe at width 128 | 4, t >= 0.6 | 75.0% | 31.6 | 1.24 | 0.94 |
# | the same | 3 all along | 81.2% | 50.0 | 1.11 | 0.90 |
# | the default at lr 1e-3 (the previous default) | 3 all along | 68.5% | 56.1 | 1.25 | 1.00 |
# | the same at lr 1e-3 with the seed's horizontal flip of the targets | 3 all along | 52.2% | 57.0 | 1.40 | 1.13 |
# | fsdit, the seed's conditioning (`--cond support`), `--size long` | 3 all along | 11.7% | 110.0 | 1.54 | 1.48 |
#
# | seen classes (40 of 700) | guidance | judge class consistency | glyph-FD | diversity | distance to nearest support |
# |---|---|---|---|---|---|
# | real images | | 84.5% | 24.1 | 1.23 | 0.94 |
# | **fsdit, aligned supports (default: 2,200 steps of 32)** | **8, t >= 0.6** | **71.3%** | **39.7** | 1.27 | 0.98 |
# | the previous default: 1,100 steps of 64 | 8, t >= 0.6 | 66.5% | 39.2 | 1.29 | 0.99 |
# | the same | 3 all along | 63.2% | 51.9 | 1.23 | 0.99 |
# | **`--size long` (width 192, depth 6)** | **4, t >= 0.5** | **84.5%** | **28.6** | 1.18 | 0.91 |
# | the same at depth 4 | 4, t >= 0.5 | 83.5% | 29.7 | 1.18 | 0.91 |
# | the same recipe at width 128 | 4, t >= 0.6 | 76.7% | 29.0 | 1.21 | 0.93 |
# | the same | 3 all along | 81.8% | 46.5 | 1.11 | 0.90 |
# | the same at lr 1e-3 with the seed's flip | 3 all along | 46.8% | 57.9 | 1.39 | 1.13 |
# | fsdit, the seed's conditioning, `--size long` | 3 all along | 12.8% | 111.1 | 1.55 | 1.51 |
#
# On held-out classes the model draws the supports' character in its own strokes and weights (diversity
# 1.01x real images', nowhere near a copy): in the grid below the 'c', the 'x', the r-like glyph and the 'i' are
# plain in every sample and the '{' in most; some rows stay rough (the Braille-like dots come out as scattered dot
# clusters, the circled dot as a round blob with a darker centre and at most a hint of its ring, the Φ-like glyph
# as a vertical stroke through a knot).
# It reads the supports: held-out classes score as well as seen ones (on 200 classes of each, 65.4% and 66.6%; real
# images 82.9% and 85.8%). The seed's conditioning (one mean embedding through adaLN) cannot see the supports'
# strokes: after 6,000 steps (at width 128) it reaches 11.7% (chance 0.1%) and 4.4x the floor, drawing glyph-like shapes
# that follow the supports' rough outline in a few rows (a 'c' stays a 'c') and are other characters in most
# (`nbs/images/demo_heldout_seed_cond.png`); on validation classes it stays at 0-3% all the way (curve below).
#
# **Guidance over part of the path.** Guidance all along the path (the seed's CFG 3) drew every sample in one bold,
# even stroke: it bought class consistency with glyph-FD, which stayed at 2x its floor however long the model
# trained. Guiding only the last 40% of the path (0.6 <= t <= 1, t = 0 being noise: `cfg_interval` in
# `fsdit.sampler`, after Kynkäänniemi et al., 2024) at a higher scale keeps the consistency and removes most of
# that distance. On 50 validation classes (real images 81.4%, floor 20.2) the default goes from 64.8% and glyph-FD
# 47.3 at CFG 3 all along to 68.4% and 35.6 at scale 8 from t = 0.6; the 6,000-step run (width 128) from 79.8% and
# 44.4 to 73.4% and 26.7 at scale 4. Leaving out the *end* of the path instead (guidance for t <= 0.8) costs
# consistency and gains nothing. Each size's setting is the one whose worse margin to its two targets is largest on
# validation classes; the sweeps are in BENCHMARKS.md §6.
#
# **A wider model for the long size.** At width 128 no guidance setting gave the 6,000-step run both of its targets
# on validation classes (the best glyph-FD at 95% of real images' consistency was 1.47x the floor). At width 192
# (46 minutes of training on the Xeon guest, 0.46 s a step) and guidance at scale 4 from t = 0.5 it reaches 78.0%
# (95.8% of real) at 1.26x the floor on validation classes, so `--size long` trains at width 192. Its loss is lower
# too (validation 0.136 against 0.141). At the earlier default's 1,100 steps of 64 the wider model had bought a lower loss but no
# better judge figures. On held-out classes that model sat on the edge of both targets (94.96% of real images'
# consistency, 1.32x the floor), so the long size went one step further: **depth 6** (92 minutes of training on the
# quiet EPYC guest, 0.92 s a step; validation loss 0.131 against 0.136). On the same validation classes the same
# guidance, again the best by the rule, gives 79.2% (97.3% of real) at 1.24x, and `--size long` is now that model.
#
# **More training.** The seed flips half of its targets horizontally (never the supports), which suits photographs;
# for characters it taught the model to draw the supports' character or its mirror about equally often ('c' came
# out as 'ɔ', '{' as '}'), and with the flip 6,000 steps did no better than 1,100. With the flip off
# (`TrainConfig.mirror=False`, the demo's setting), 6,000 steps (`fsdit demo --size long`, 38 minutes of training on
# a 2-core AMD EPYC KVM guest, 40 minutes in all, at width 128) follow the supports more closely at any guidance.
#
# Against the targets set for this demo — at the default, class consistency at least 80% of real images' and
# glyph-FD at most 2x the floor; at `--size long`, 95% and 1.3x — the demo's 40 held-out classes put the default at
# **81.2% and 1.70x** (seen: 84.3% and 1.65x) and the long size at **96.8% and 1.23x** (seen 100.0%, 1.19x);
# diversity and the distance to the nearest support are 0.95-1.06x real images' in all four. The default meets
# both of its targets on held-out and on seen classes (at 1,100 steps of 64 its seen classes had fallen 1.3 points
# short of 80%; the standard error of consistency at 400 images is about 2 points). The long size meets both on held-out, seen and
# validation classes (at depth 4 it had sat on the edge of both on held-out ones: 94.96% of real images'
# consistency, glyph-FD 33.2 against a limit of 32.8). **Forty classes flatter it.** The same runs judged on 200
# held-out and 200 seen classes x 10 images (`python bench/demo_wide_eval.py DEMO`):
#
# | 200 classes per split | held-out consistency (of real) | held-out glyph-FD (x floor) | seen consistency (of real) | seen glyph-FD (x floor) |
# |---|---|---|---|---|
# | real images | 82.9% | 5.37 (floor) | 85.8% | 5.70 (floor) |
# | support mean | 63.4% (76%) | 146.0 (27x) | 61.6% (72%) | 150.1 (26x) |
# | **default, 2,200 steps of 32, scale 8 for t in [0.6, 0.9]** (today's run) | **65.0% (78.4%)** | **17.8 (3.3x)** | **66.3% (77.3%)** | **17.7 (3.1x)** |
# | the same run, scale 8 for t in [0.6, 1] | 64.2% (77.4%) | 18.6 (3.5x) | 65.4% (76.2%) | 18.7 (3.3x) |
# | the default's earlier run, scale 8 from t = 0.6 | 65.4% (78.9%) | 18.2 (3.4x) | 66.6% (77.7%) | 17.7 (3.1x) |
# | the previous default, 1,100 steps of 64 | 64.9% (78.3%) | 18.7 (3.5x) | 64.2% (74.9%) | 18.5 (3.2x) |
# | the same recipe on the EPYC guest, CFG 3 all along | 65.7% (79.4%) | 28.5 (5.3x) | 65.1% (75.9%) | 29.0 (5.1x) |
# | **`--size long`, width 192, depth 6, scale 4 from t = 0.5** | **77.5% (93.5%)** | **11.6 (2.2x)** | **78.6% (91.7%)** | **11.8 (2.1x)** |
# | the same at depth 4 | 76.8% (92.6%) | 10.7 (2.0x) | 77.5% (90.3%) | 10.1 (1.8x) |
# | width 128, 6,000 steps, scale 4 from t = 0.6 | 72.9% (88.0%) | 9.6 (1.8x) | 74.5% (86.8%) | 9.9 (1.7x) |
# | the same recipe on the EPYC guest, CFG 3 all along | 78.1% (94.3%) | 25.4 (4.7x) | 78.7% (91.8%) | 24.9 (4.4x) |
#
# The floor is the Fréchet distance between two finite samples of real images, which is biased upward the fewer
# images there are: with five times the images it falls from 25.2 to 5.4, while the long run's distance falls
# from 31.1 to 11.6. So the glyph-FD ratio is only comparable between evaluations of the same size, and the
# 200-class one is the stricter: on it no run here comes within 1.3x of the floor, and depth 6 buys consistency
# (about a point on each split) at a slightly higher glyph-FD than depth 4.
#
# The curves below are the trainer's few-shot metrics on 16 validation classes x 6 samples at CFG 3 all along (the
# trainer's setting when they were made; noisy at that size: the default's 55% at its last point is 64.4% on 50
# validation classes x 10) against training minutes, counted as steps x 0.375 s, the median step of the long run
# on the quiet EPYC guest (`bench/learning_curve.py --step-s`; the runs beside it shared the machine). Consistency
# rises until about 20 minutes (3,000 steps) and then holds, while glyph-FD stops falling at 1.4-1.5x its
# (small-sample) floor; the validation loss (0.141) still equals the training loss (0.144), so the model is not
# overfitting. Much of that plateau is the guidance's: the long run's last checkpoint guided from t = 0.6 is at
# 1.25-1.32x of the floor on held-out and validation classes (width 128, scale 4).
#
# The number of Euler steps hardly matters (at the lr 1e-3 default, CFG 3: 10, 15, 20, 25 and 50 steps give 63.0,
# 62.6, 62.2, 61.8 and 61.4% on validation classes with glyph-FD 53.2, 52.1, 52.1, 51.8 and 51.9; Heun, 8 and 12
# steps: 61.4% / 53.6, 61.8% / 52.7), so the demo samples with 15. The learning rate was chosen the same way: at
# 2e-3, validation consistency 64.4% and glyph-FD 47.2 against 62.6% and 52.1 at 1e-3 (CFG 3, 15 steps).
#
# **Guidance now stops at t = 0.9.** Guiding the last 10% of the path too left grey speckle on the paper: 9.8% of
# the paper's pixels a few levels off, against 5.5% for real glyphs (`bench/speckle.py`, 50 validation classes).
# Guided over t in [0.6, 0.9] it is 6.0%, at the same validation consistency (68.0% against 68.8%) and a lower
# glyph-FD (34.4 against 35.4); held-out, on the demo's own 40 classes, 65.5% (77% of real) at 1.70x the glyph-FD
# floor (seen: 69.5% at 1.68x). The strokes stay heavier than a font's: that comes with the scale (BENCHMARKS §8).
# The grid, enlarged 4x (left: 5 supports; right: 8 samples):
#
# ![held-out classes, enlarged: 5 supports | 8 samples at CFG 8 for t in [0.6, 0.9]](nbs/images/demo_heldout.png)
#
# The same classes after `--size long` (width 192, depth 6, 6,000 steps, CFG 4 from t = 0.5): every row is the
# supports' character in varied weights and slants — the 'i' with its dot, the Φ-like glyph as a stroke through its
# loops, the Braille-like cells as their dots, the circled dot as a round mark with a darker centre, its ring
# visible in some (at 16x16 the supports themselves are little more than that):
#
# ![held-out classes after 6,000 steps: 5 supports | 8 samples at CFG 4 from t = 0.5](nbs/images/demo_heldout_long.png)
#
# ![learning curves on validation classes](nbs/images/learning_curve.png)

# %% [markdown]
# ## Install
#
# ```bash
# pip install -e .            # runtime: jax, flax, optax, orbax-checkpoint, transformers (configs only), safetensors, ...
# pip install -e ".[fid]"     # + torch, torchvision and pytorch-fid for Inception FID
# ```
#
# For FID install torch first and then the torchvision made for it from the same index (for a CPU machine:
# `pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu`); a CUDA torchvision beside a
# CPU torch does not import, and `fsdit eval --fid` says so.
#
# Supported JAX/Flax: `jax>=0.7.2`, `flax>=0.12.0` — Kaggle's TPU image (JAX 0.7 tied to its libtpu,
# Flax 0.12.0) up to the newest release (CI runs the model, sampler and trainer tests under both).

# %% [markdown]
# ## Hyperparameters (the seed's recipe, the defaults)
#
# | Parameter | Value | Note |
# |-----------|-------|------|
# | LR | 1e-4 -> 1e-6 | 5k linear warmup + cosine decay |
# | Optimizer | AdamW | wd 0.01 on weight matrices only, betas (0.9, 0.99) |
# | Grad clip | 1.0 | global norm |
# | Batch size | 128 | global, split over every device (8 TPU cores x 16) |
# | EMA | 0.9999 | used for eval and sampling |
# | CFG dropout | 10% | support embedding replaced by zeros |
# | CFG scale | 3.0 | at sampling time |
# | Sampler | 50 Euler steps | compiled as one loop; Heun available |
# | t | sigmoid(N(0, 1)) | `--t-sampling uniform` also available |
#
# Presets: models `mu` (tests), `debug`, `S/2`, `B/2` (the seed's), `L/2`, `XL/2`; training `seed`,
# `short`, `test`. Overrides always win over presets.

# %% [markdown]
# ## On miniImageNet (Kaggle TPU v5e-8, or any machine with JAX)
#
# ```bash
# fsdit prepare    --src /kaggle/input/miniimagenet --dst split --train 60 --val 16 --test 20 --seed 42
# fsdit precompute --data split --out feats      # SigLIP2 B/16 + SD-VAE, once per image, resumable
# fsdit train      --feats feats --out run --model B/2 --model.dtype bfloat16 --wandb.name fsdit_run1
# fsdit train      --out run                     # the same run again resumes from its latest checkpoint
# fsdit train      --feats feats --out run_xl --model XL/2 --model.dtype bfloat16 --fsdp true   # state sharded (FSDP)
# fsdit sample     --run run --support a.jpg b.jpg c.jpg d.jpg e.jpg --n 16 --cfg 3 --steps 50 --out grid.png
# fsdit eval       --run run --split test --shots 1 3 5 --cfg 0 1 3 --n 128
# ```
#
# `nbs/kaggle_tpu.ipynb` is the notebook a Kaggle user runs (TPU v5e-8, internet on, miniImageNet
# attached). Its install cell keeps the JAX, jaxlib and libtpu that Kaggle ships — a plain install would
# pull a newer JAX and break the TPU runtime — then it runs the steps above with the seed's settings.
# `fsdit prepare --split ravi` gives the field's standard 64/16/20 class lists instead of the seed's split.
#
# `fsdit train` writes every metric to `run/metrics.jsonl` and to wandb (`--wandb-mode online|offline|disabled`;
# offline when no API key is set): loss, loss EMA, grad norm before/after clipping, param norm, lr,
# samples/s, loss per t-bin (sum/count over the interval, empty bins NaN); validation loss for the live and
# EMA models, the train-val gap and their t-bins; attention entropy per layer (early/mid/late) and per
# head of the last layer; sample grids at CFG 0 and 3; and every `--fewshot-every` steps (default 10,000)
# few-shot metrics of the EMA model on 16 validation classes under `val_fs/` (class consistency beside real
# images and chance, embedding Fréchet distance, diversity, distance to the nearest support), with the store's
# encoder. Checkpoints (orbax) keep the last 3, are written atomically, on SIGTERM/Ctrl-C too, and hold the RNG
# and data position so a resumed run continues exactly. On several hosts the processes agree on a stop at
# the next log step, so a preemption signal that reaches one host stops them all. Each log step also reports
# `train/tflops_per_device` (XLA's FLOP count of the compiled step over its time) and `train/mfu` (over the
# device's bf16 datasheet peak; on a CPU, over a matmul measured at start).
#
# The step is one `jax.jit` program over a mesh of every device of every process: the batch is split along
# it, each process feeding its own rows. By default every device holds the whole state (data parallel); with
# `--fsdp true` parameters, EMA and both Adam moments are split over the devices (ZeRO-3; tensors under
# `--fsdp-min-size` elements stay whole) and XLA gathers each layer's weights where it needs them. Planned by
# XLA's TPU compiler for a v5e-8 in bfloat16 at 16 examples per core (`bench/memory_plan.py --topology v5e:2x4`,
# which needs libtpu but no TPU), that takes XL/2 from 14.4 to 8.1 GiB per core and L/2 from 10.3 to 5.5 GiB;
# rematerialising the blocks (`--model.remat true`) takes XL/2 with FSDP to 2.7 GiB (`BENCHMARKS.md` §7). Checkpoints are written shard by shard by the processes that hold them, and
# a run resumes in either layout. `fsdit bench accel` measures the step and the sampler in bfloat16 on whatever
# accelerator is at hand and writes its section of `BENCHMARKS.md`.
#
# ## Explorer
#
# `nbs/12_explorer.ipynb` is an ipywidgets app over a trained run: pick a run, a split and a class; draw a
# support set or pick the images; set the CFG scale, steps, seed and number of samples. Generate shows the
# samples at CFG 0 beside the chosen scale, and below them the run's loss per t-bin and attention entropy.
# In Jupyter: `Explorer('demo').widget`; as an app: `voila nbs/12_explorer.ipynb`.

# %% [markdown]
# ## Does it generalise to unseen classes?
#
# On the glyph demo, yes, with the supports' pixels in reach of the model: with `cond='aligned'` (the
# supports' per-position mean and spread beside the noisy target, `fsdit.dit.support_stats`) held-out classes
# score as well as seen ones (on 200 classes of each: 64.9% and 64.2% judge consistency after 9-10 minutes of CPU
# training, 77.5% and 78.6% after 92 at width 192 and depth 6),
# and the samples follow supports of characters the model never saw. The seed's conditioning (one mean
# embedding through adaLN) stays near chance on both in the same budget. Earlier, smaller experiments
# (`bench/generalisation.py`, 91 training classes, prototype consistency in the stand-in embedding, which
# blur fools) had found neither working; the demo now has 700 training classes and a judge. The stand-in
# encoder is a projection of pixels, so none of this says anything yet about SigLIP2 on miniImageNet, where
# `'aligned'` and `'context'` take the supports' SD-VAE latents.

# %% [markdown]
# ## The package, layer by layer
#
# One notebook per idea, exported to one module, numbered so that a module imports only modules above it:
#
# | layer | notebooks -> modules |
# |---|---|
# | foundations | `00_config` configs and presets · `00a_files` writes without half-written files · `00b_hub` checkpoints from the hub or a folder · `00c_images` uint8, grids, PNGs · `00d_cli` the `fsdit` command and its one-line errors · `00e_perf` FLOPs, memory and peaks (MFU) |
# | data | `01_data` splits, episodes, batches, the trainer's episode source · `01a_glyphs` the offline glyph dataset, aligned or unaligned |
# | frozen codecs | `02_encoder` SigLIP2 in Flax · `02a_glyph_encoder` the offline stand-in that knows the glyph classes · `03_vae` SD-VAE in Flax · `04_features` the feature store · `04a_codecs` how a run sees images (encoders, stand-ins, `fsdit precompute`) |
# | the model | `05_dit` the DiT · `06_flow` interpolant, inputs and the training loss · `06a_testing` random stores and fixtures · `07_sampler` Euler/Heun with CFG, `generate` |
# | training | `08_state` optimizer and state · `08a_run` the run directory (configs, latent scale, checkpoints, metrics, `load_run`) · `08b_steps` the steps and their layout on the device mesh (data parallel or FSDP) · `08c_train` the `Trainer` with evaluation hooks · `08d_export` `fsdit export`: a run you can hand on |
# | using a run | `09_supports` `fsdit sample` · `09a_metrics` metric maths · `09b_fid` Inception features · `10_eval` `fsdit eval` and the few-shot hook · `10a_judge` the glyph judge · `10b_launch` `fsdit train` |
# | on top | `11_demo` `fsdit demo` · `12_explorer` the widget · `13a_bench_step` step, FLOPs and memory measurements · `13_bench` benchmarks |

# %% [markdown]
# ## Benchmarks
#
# `BENCHMARKS.md` has every figure with its method, the machine and the load at the time, and the
# commands to re-run them (`fsdit bench ...`, `bench/compare_original.py`). Measured on a 2-core AMD EPYC
# (Zen 3) CPU, float32, with nothing else running unless the row says otherwise; no accelerator was
# available, so no bfloat16/MFU figures yet:
#
# | what | figure |
# |---|---|
# | train step, batch 16, ours vs the original FSDiT (same run, 5 interleaved rounds) | S/2: 5.31 vs 5.38 s, B/2: 21.87 vs 23.34 s (paired ratios, median 1.03 and 1.00): as fast; ours at 66% / 50% of the matmul peak measured in the same run |
# | train step, batch 16: one `jit` over the device mesh (now) vs the `pmap` step it replaced (3 interleaved rounds) | S/2: 5.79 vs 5.86 s, B/2: 19.44 vs 19.77 s: no slower (within the round-to-round noise) |
# | sampling, 16 images, 50 Euler steps with CFG, one compiled loop | 0.075 images/s at S/2, 0.024 at B/2; loop vs its steps timed alone -2.1% / +1.2% (within the ±5% noise) |
# | feature store vs encoders per step (SigLIP2 x5 + VAE encoder at 224 px), batch 4 | predicted 14.8x (S/2) and 4.61x (B/2) from FLOPs; measured 14.1x and 5.7x (the VAE's convolutions run at 3/4 of the step's FLOP/s) |
# | B/2 train-step memory per device (compiled plan) | 7.06 GB at batch 16 (fits a 16 GB v5e core), 12.4 GB at batch 32 |
# | train-step memory per v5e core, v5e-8, bfloat16, 16 per core (XLA's TPU compiler's plan) | XL/2: 14.4 GiB replicated, 8.07 GiB with FSDP, 2.73 with FSDP and remat; L/2: 10.3 -> 5.5 GiB |
# | host batch assembly, B=128, miniImageNet-sized store | 1.6-1.8 ms median (target < 10 ms) |

# %% [markdown]
# ## How the few-shot metrics are defined (`fsdit eval`)
#
# For each class of the evaluated split, G images (default 128) are generated, each from a random k-shot
# support set of that class (k = 5, `--shots 1 3 5` sweeps). Real images go through the same VAE
# round trip, so the metrics measure the generator net of the VAE.
#
# - **FID**: Fréchet distance between Inception features (as pytorch-fid defines them) of all generated
#   and all real images, pooled over classes — optional extra `fsdit[fid]` (its weights come from the internet).
# - **FD (embedding)**: the same distance in the support encoder's embedding space (SigLIP2; no extra weights).
# - **Class consistency**: accuracy of assigning each generated image to its support's class by nearest
#   class prototype (mean normalised embedding of the class's real images, the episode's supports left
#   out), beside the same accuracy for real images (leave-one-out).
# - **Diversity**: mean pairwise distance among a class's generated images, beside the same for real images.
# - **Copy check**: distance of each generated image to its nearest support image.
# - Baselines scored the same way: copy a support image, the support mean. Every number is reported for
#   unseen (test) and seen (train) classes so the gap is visible.
# - With a judge (`fsdit.judge`, the glyph demo): its class consistency, glyph-FD (Fréchet distance in its
#   features, real-vs-real halves as the floor), and diversity and nearest-support distance in its features.

# %%
#| hide
from fsdit.config import model_config, train_config
assert model_config('B/2').tokens == 196 and train_config().batch_size == 128

# %% [markdown]
# ## References
#
# - Flow Matching for Generative Modeling — Lipman et al., 2022, [arXiv 2210.02747](https://arxiv.org/abs/2210.02747)
# - Scalable Diffusion Models with Transformers (DiT) — Peebles & Xie, 2023, [arXiv 2212.09748](https://arxiv.org/abs/2212.09748)
# - SigLIP 2 — Tschannen et al., February 2025, [arXiv 2502.14786](https://arxiv.org/abs/2502.14786)
# - The JAX flow-matching DiT this builds on: [kvfrans/jax-flow](https://github.com/kvfrans/jax-flow)
# - The original FSDiT: [thanhlamauto/FSDiT](https://github.com/thanhlamauto/FSDiT)

# %% [markdown]
# ## Troubleshooting
#
# Every command either finishes or stops with exit status 1 (2 for a malformed flag) and **one line** on
# stderr, `fsdit <command>: ...`, saying what was wrong and what to do; a refused command writes nothing that
# the corrected one would trip over. The lines a user can meet, and what they mean:
#
# | message (abridged) | command | what it means, what to do |
# |---|---|---|
# | `argument --steps: must be 1 or more, got 0` (also `--n`, `--shots`, `--chunk-size`, `--val-batches`, ...) | all | a count must be at least 1; `--max-real 0` means all images |
# | `--out X is a file, not a folder` / `--out X lies under the file F` / `--out X: cannot write in D (Permission denied)` | all | the output path cannot be written; give another one. Checked before anything is computed |
# | `--out X is a folder: give a file name` | sample | `--out` and `--npz` name files; missing folders above them are made |
# | `X is not a complete feature store (an interrupted precompute left X.partial ...)` | train, eval | run the same `fsdit precompute` again: it finishes from the chunks it has |
# | `feature store X is damaged: moments.npy is truncated or empty ...` (or `index.json cannot be read`, ...) | train, eval, sample | a store file was cut short or emptied after it was made (a full disk, an interrupted copy); delete the store and precompute again |
# | `feature store X does not match this run: encoder is ..., the run asks for ...` | train, eval, precompute | the store was made with other encoders or image size; precompute into another folder |
# | `X.partial holds an interrupted precompute with other settings or images` | precompute | delete `X.partial` to start over, or rerun with the first settings |
# | `no images under SPLIT/{train,val,test}/<class>/: run fsdit prepare first` | precompute | `--data` must be the output of `fsdit prepare` |
# | `--feats is required for a new run` | train | only a run that exists (has `config.json`) remembers its store |
# | `shots 10 needs 11 images per class ..., the smallest, 'c', has 6: use --shots 5 or less` | train | each episode takes a target and `--shots` supports from one class |
# | `an epoch has N episodes, fewer than the batch size B` | train | too few training images for one batch: lower `--batch-size` |
# | `batch size 12 is not divisible by the 8 devices` | train | the global batch is split evenly over every device: use a multiple |
# | `patch 3 does not divide the input size 28: pick a patch in [...]`, `heads 7 does not divide hidden 768`, `lr must be positive ...`, `TrainConfig.x must be positive` | train | an impossible model or training setting; the message names the field (the flag is `--<field>` or `--model.<field>`) |
# | `unknown model preset 'C/2'; choose one of [...]`, `unknown train preset ...`, `unknown model field(s) ['--model.widht']` | train | a typo in `--model`, `--preset` or a `--model.<field>` flag |
# | `RUN holds a run of another model (saved, given): {...}; use a new --out` | train | a run resumes only with its own model; change `--out` to start another |
# | `RUN is in use by another fsdit train (process P)` | train | two trainers cannot share a run directory; wait for the first or stop it. A killed trainer's lock does not block |
# | `checkpoint 8000 is damaged (...); moved to RUN/checkpoints_damaged/8000-..., resuming from step 6000` | train | not an error: the newest checkpoint could not be read, the run continues from the one before and redoes the steps after it |
# | `no checkpoint in RUN/checkpoints can be read: steps [...] are damaged` | train, sample, eval | every kept checkpoint is damaged; the run is not silently restarted from step 0: move them away to start over, or put back a copy |
# | `checkpoint N could not be written (No space left on device); the earlier ones are intact` | train | make room and run the same command again: it resumes from the last checkpoint |
# | `RUN/metrics.jsonl: its last line was cut off ...; dropped` | train | not an error: a crash cut the log's last record; the resumed run writes it again |
# | `RUN/metrics.jsonl, line N, is not a metrics record` / `RUN/config.json cannot be read` | train | a run file was edited or damaged elsewhere than its end; fix or delete that line, or put back the file |
# | `loss or gradient norm is NaN/Inf at step N` | train | the run diverged; every checkpoint on disk is from before. Lower `--lr` or raise `--warmup` and resume |
# | `few-shot metrics are off for this run: ...` | train | not an error: the support encoder could not load (offline); training goes on without `val_fs/` metrics |
# | `X is not a run directory (no config.json)` / `X has no checkpoint yet` | sample, eval | `--run` is the `--out` of `fsdit train`, after at least `save_every` steps |
# | `checkpoint N of RUN is damaged (...); using step M` | sample, eval | not an error: the newest checkpoint could not be read, the one before is used |
# | `cannot read support image(s): a.jpg (no such file); b.jpg (OSError: image file is truncated ...)` | sample | every support file that cannot be decoded is listed |
# | `--class-dir D is not a folder` / `D holds 3 images; 5 supports were asked for: use --shots 3 or less` | sample | `--class-dir` draws `--shots` images (default: the run's shots) from one folder |
# | `note: the run was trained on 5-shot episodes; sampled from 3 supports` | sample | not an error: any K >= 1 works; quality at another K is what `fsdit eval --shots` measures |
# | `this run is class-conditioned (cond='class') ...` | sample | a class-label model cannot take support images |
# | `no feature store: pass --feats FEATS` | eval | the run does not name its store (trained through the API): give it |
