# %% [markdown]
# # fsdit
#
# > Few-shot image generation: a flow-matching Diffusion Transformer in JAX/Flax that, given 5 images of a class it has never seen, generates new images of that class.
#
# fsdit trains a DiT in Stable Diffusion VAE latent space, conditioned on frozen SigLIP2 B/16 embeddings of a
# support set of 5 images; at test time you hand it 5 images of a class it never saw and it draws more. It
# trains on a Kaggle TPU v5e-8, on your GPUs or TPU pods (one `jit` program over a device mesh, data parallel
# or FSDP), and on a CPU for the offline demo. Every component is defined and tested in a notebook under
# `nbs/` and exported to the `fsdit` package. Below: 8 characters the model never saw in training, each with
# its 5 supports and 8 samples, from the offline demo (`make demo`, 7.5 minutes on a 2-core CPU):
#
# ![held-out classes, enlarged 4x: 5 supports | 8 samples at CFG 8 for t in [0.6, 0.8]](nbs/images/demo_heldout.png)
#
# ```
# 5 support images -> [SigLIP2 B/16, frozen] -> mean of L2-normalised embeddings -> MLP -> + t_emb -> adaLN
# target image     -> [SD-VAE, frozen]       -> latent 28x28x4 -> DiT-B/2 (adaLN-Zero, 196 tokens) -> velocity
# ```
#
# ## Two commands
#
# On a fresh machine with Python 3.10+, `make` and access to PyPI:
#
# ```bash
# make demo   # sets up .venv and runs the main job: the whole chain offline on a small real dataset
# make test   # sets up .venv with the test extras and runs every test (pytest, then nbdev_test)
# ```
#
# Neither needs a model hub: the tests build tiny random SigLIP and SD-VAE checkpoints with
# transformers/diffusers and load them through the code that loads `google/siglip2-base-patch16-224` and
# `stabilityai/sd-vae-ft-mse`. `make test` installs the CPU build of torch first (a test-time reference only), so
# no dependency can pull a CUDA build.

# %% [markdown]
# ## What the demo shows
#
# `make demo` runs `fsdit demo --out demo`. It renders a real dataset from the fonts matplotlib ships —
# **characters as classes, fonts as images**: 1,000 characters (Latin, Greek, Cyrillic, IPA, Armenian, Hebrew,
# Arabic, arrows, maths, dingbats, Braille, ...), 20 images each at 16x16 gray — split by class into 700 train,
# 100 validation and 200 held-out classes. It trains a glyph classifier on fresh renderings of all 1,000 classes
# to be the **judge**, trains a small DiT (width 128, depth 4, 64 tokens between 3x3 convolutions; 2,200 steps of
# 32 episodes) that sees the supports aligned beside the target (`cond='aligned'`), draws grids of seen and
# held-out classes and scores them. Each stage prints its progress and minutes; a second run skips what is complete and an interrupted one
# resumes. Offline, two stand-ins replace the hub's models: the images are their own "latents" (pixel space, no
# SD-VAE) and the support encoder is a random projection of pixels, **not SigLIP2**; everything else is the code
# a miniImageNet run uses.
#
# ```
# demo/samples_heldout.png demo/samples_seen.png   one class a row: 5 supports | 8 samples, enlarged 4x
# demo/eval/eval.json + fig_*.png demo/summary.json demo/timings.json   demo/run/ (config, checkpoints, metrics.jsonl)
# ```
#
# On 200 classes of each split (`python bench/demo_wide_eval.py demo`; for the long size, `fsdit demo --size long
# --out demo_long` then `python bench/demo_wide_eval.py demo_long --cfg 4 --interval 0.5 1`):
#
# | 200 classes, 10 images each | held-out: consistency (of real) | held-out: glyph-FD (x floor) | seen: consistency (of real) | seen: glyph-FD (x floor) |
# |---|---|---|---|---|
# | real images | 82.9% | 5.37 (floor) | 85.8% | 5.70 (floor) |
# | copy a support | 80.9% (98%) | 3.97 (0.7x) | 84.8% (99%) | 4.05 (0.7x) |
# | support mean (a blur) | 63.4% (76%) | 146.0 (27x) | 61.6% (72%) | 150.1 (26x) |
# | **default** (`make demo`, CFG 8 for t in [0.6, 0.8]) | **71.7% (87%)** | **14.6 (2.7x)** | **72.8% (85%)** | **14.4 (2.5x)** |
# | **`--size long`** (width 192, depth 6, 6,000 steps of 64, 92 min; CFG 4 for t in [0.5, 1]) | **77.5% (93%)** | **11.6 (2.2x)** | **78.6% (92%)** | **11.8 (2.1x)** |
#
# *Class consistency*: how often the judge (chance 0.1%) reads a sample as its supports' class. *Glyph-FD*: the
# Fréchet distance in the judge's features to real images of the same classes; the floor is real against real.
# Held-out classes score as well as seen ones: the model reads the supports rather than remembering classes, and
# draws the supports' character in its own strokes (diversity 1.00x real images', not a copy). A reader trained
# only on the dataset's own images reads 50.8% of held-out samples as their class against 82.5% of unseen real
# images (62%; 56% before the convolutions, BENCHMARKS.md §8). The samples are still rougher than the fonts: the
# circled dot and the Braille cells come out as blobs and dot clusters. The long size draws every row of the grid above as its character
# (`nbs/images/demo_heldout_long.png`). The seed's own conditioning — one mean embedding through adaLN — stays near
# chance on this data with the random-projection encoder (`fsdit demo --cond support`;
# `nbs/images/demo_heldout_seed_cond.png`, BENCHMARKS.md §9).

# %% [markdown]
# **When the supports do not line up.** `fsdit demo --data unaligned --out demo_u` draws each character at a random
# place, size, angle and colour (RGB, 24 px), so the supports' per-pixel mean is a blur, as it is for photographs. It
# adds a stand-in encoder trained on its own renderings (5-shot nearest-prototype accuracy on 200 held-out classes:
# 70.7%) and, as SD-VAE does for photographs, a small VAE trained on its own renderings (`fsdit.glyph.vae`, a diffusers
# `AutoencoderKL` folder that `fsdit precompute --vae` loads), so the DiT models 12x12x4 latents rather than pixels.
# From pixels, nothing tried drew a character: every conditioning stayed under 1% judge consistency against 70.6% for
# real images, and the model could not draw even 12 classes it trained on (`python bench/unaligned_factors.py demo_u
# OUT`: it is the three colour channels, random ink and paper, that stop it). In the VAE's latents the same model, given
# the class by label, draws those 12 classes — whole characters in one ink colour on flat paper, anywhere in the frame —
# at 43% against 56% for the VAE's reconstructions (`nbs/images/unaligned_vae_class_8k.png`, `bench/class_curve.py`).
# Few-shot, at the demo's budget (4,400 steps, 10 minutes of training, each class seen ~200 times; 37 minutes in all,
# unguided), the DiT alone draws its class's texture, not its shape (0.7% on 200 held-out classes; 0.5% given one
# image's own embedding: it does not yet read that vector; on 50 classes it does once each is seen ~5,000 times).
# The encoder knows the shapes, so the demo samples with **encoder guidance** (`fsdit sample --guide 1`): at each step
# for t <= 0.7 the model's clean-image estimate is decoded and embedded by the frozen encoder (trained on adversarial
# examples), and the gradient of its similarity to the supports' embedding steers it. And each sample **starts from one
# of its supports** (`--from-support 0.3`, SDEdit): noised to t = 0.3, the support keeps its place, size and colours,
# and the model redraws the character (20 Euler steps, CFG 4). Held out, 200 classes: **32.5% consistency (57% of real),
# glyph-FD 17.4 (3.1x the floor)**; its characters sit as far from their nearest support as unseen real images do (1.12
# against 1.09 in the judge's features), but in pixels each sample is twice as near its support (0.29 against 0.52).
# From noise 18.1% (4.0x), unguided 0.7%; seen classes 34.1%. Enlarged (`nbs/images/unaligned_fromsupport_heldout.png`):
# C's and brackets in every cell, rings in most of the circled-dot row, Braille dots, forks for 'x', '$' a tangle, on
# flat paper. Short of the targets (70% of real, 3x): tables, curves and grids in BENCHMARKS.md §8.
#
# **A real colour data set, through the CLI alone.** `bench/emoji_set.py` builds 323 classes of vendors' emoji (from
# the npm registry; six skin tones a drawing, 32 px), and `bench/emoji_cli.sh` runs `fsdit prepare`, `precompute`,
# `train` and `sample` on it (70 held-out classes). Drawn centred, the supports line up and most held-out rows are their
# class. Placed at random (`--placed`: the photographs' case), with a stand-in encoder and VAE trained on the two vendors
# the set leaves out (`bench/emoji_encoder.py`), the recommended recipe draws no class from noise; from a support
# (`--from-support 0.4`) it draws rough but recognisable members of about four of the grid's eight held-out classes —
# the facepalm's head over its hand, the curly-haired man, the couple under a heart, the fist — in 13 minutes on a
# 2-core CPU (`nbs/images/emoji_placed_fromsupport_heldout.png`: Noto Emoji, Apache 2.0, and Twemoji, CC-BY 4.0).
#
# How the defaults were chosen (guidance interval, steps, learning rate, the flip, the long size's width and depth),
# with every run's figures: BENCHMARKS.md §6 and §9. How the default and the long size learn, on validation classes
# (`python bench/learning_curve.py` over both runs; minutes at each size's step on a quiet 2-core CPU):
#
# ![learning curves of the default and the long size](nbs/images/learning_curve.png)

# %% [markdown]
# ## Your own images
#
# A folder with one folder of images per class — a handful of images each, at least the shots plus one:
#
# ```bash
# fsdit prepare    --src my_images --dst split --train 60 --val 16 --test 20   # split by class (symlinks)
# fsdit precompute --data split --out feats    # SigLIP2 B/16 + SD-VAE, once per image; resumable
# fsdit train      --feats feats --out run --model B/2 --model.dtype bfloat16 --wandb-mode online
# fsdit sample     --run run --class-dir split/test/some_class --n 16 --out grid.png     # 5 supports drawn from it
# fsdit sample     --run run --support a.jpg b.jpg c.jpg d.jpg e.jpg --n 16 --out grid.png
# fsdit eval       --run run --split test --shots 1 3 5 --n 128      # few-shot metrics on unseen classes
# ```
#
# `precompute` takes `--encoder` and `--vae` as hub ids or local folders (any SigLIP(2) and any diffusers
# `AutoencoderKL`). `train` resumes when run again on the same `--out`, keeps the last 3 checkpoints (written
# atomically, also on Ctrl-C or SIGTERM) and logs to `run/metrics.jsonl` and wandb (`offline` without an API
# key): losses per t-bin, gradient and parameter norms, validation loss, attention entropy, sample grids, MFU,
# and every `--fewshot-every` steps few-shot metrics on 16 validation classes. `fsdit <command> --help` lists
# every option; `--model B/2`, `L/2`, `XL/2` and `--fsdp true` pick the size and the layout.

# %% [markdown]
# ## On Kaggle TPU
#
# `nbs/kaggle_tpu.ipynb` is the notebook to open on Kaggle (accelerator **TPU v5e-8**, internet on,
# `arjunashok33/miniimagenet` attached). Its install cell keeps the JAX, jaxlib and libtpu Kaggle ships (a plain
# install would pull a newer JAX and stop the TPU); then it runs the commands above with the seed's recipe:
#
# ```bash
# fsdit prepare    --src /kaggle/input/miniimagenet --dst split --train 60 --val 16 --test 20 --seed 42
# fsdit precompute --data split --out feats
# fsdit train      --feats feats --out run --model B/2 --preset seed --model.dtype bfloat16
# ```
#
# A session that ends mid-run resumes with the same `fsdit train --out run`. The notebook keeps cross-attention
# to the supports' patches (`--model.cond xattn --model.context_patch 4`) one flag away, with its cost (149 against
# 106 GFLOP per sample; 4.52 against 3.22 GiB per v5e core at 16 per core: `python bench/memory_plan.py --topology
# v5e:2x4 --sizes B/2 --layouts replicated --cond xattn`, which needs libtpu but no TPU); it is not the
# recommendation: on unaligned glyphs, with encoder guidance, the seed's pooled vector does as well (12.5% against
# 12.2% held out). Sample with `--guide 1 --from-support 0.3` (the notebook compares it with `--guide 0` and with
# sampling from noise on validation classes; BENCHMARKS §8). `fsdit prepare --split ravi`: the standard 64/16/20 classes.

# %% [markdown]
# ## The explorer
#
# ```bash
# fsdit explore demo/run     # or an export / a hub id with --feats STORE; --port N, --no-browser, --split
# ```
#
# opens an app on the run: pick a split and a class (held-out classes are the point), draw a support set or
# upload your own images, switch single supports off, set the guidance, steps and seed, and Generate. The samples
# appear at CFG 0 beside the chosen scale, with a link to download them, and under them the run's loss per
# t-bin and attention entropy. In Jupyter the same widget is `Explorer('demo').widget`
# (`nbs/12_explorer.ipynb`). The app needs the `app` extra (`pip install 'fsdit[app]'`, Voilà).
#
# ![the explorer on a held-out class](nbs/images/explorer_app.png)

# %% [markdown]
# ## Share a run
#
# ```bash
# fsdit export demo/run demo_export       # EMA weights (safetensors), configs (JSON), a model card; no pickle
# fsdit sample --run demo_export --class-dir demo/split/test/u0034_digit_four --out four.png
# ```
#
# The folder holds the EMA weights, the model and sampling configs, the encoders' names, the latent scale and a
# README.md model card with the run's few-shot figures and its held-out grid. Upload it as a Hugging Face model
# (`huggingface-cli upload user/name demo_export`) and `fsdit sample`, `fsdit eval`, `fsdit explore` and
# `fsdit.run.load_run` take `user/name` as they take the folder, with the same samples as the run it came from.

# %% [markdown]
# ## Install
#
# ```bash
# pip install -e .            # runtime: jax, flax, optax, orbax-checkpoint, transformers (configs only), safetensors, ...
# pip install -e ".[app]"     # + Voilà for `fsdit explore`
# pip install -e ".[fid]"     # + torch, torchvision and pytorch-fid for Inception FID (install torch first)
# ```
#
# Supported: `jax>=0.7.2`, `flax>=0.12.0` — Kaggle's TPU image (JAX 0.7 tied to its libtpu, Flax 0.12.0) up to the
# newest release; CI runs the model, sampler and trainer tests under both.

# %% [markdown]
# ## Defaults (the seed's recipe)
#
# | Parameter | Value | Note |
# |-----------|-------|------|
# | LR | 1e-4 -> 1e-6 | 5k linear warmup + cosine decay; AdamW, wd 0.01 on weight matrices, betas (0.9, 0.99) |
# | Batch, grad clip, EMA | 128, 1.0, 0.9999 | global batch split over every device; EMA weights for eval and sampling |
# | CFG | 10% dropout, scale 3.0 | support embedding replaced by zeros; `--cfg-interval LO HI` guides part of the path |
# | Sampler, t | 50 Euler steps, sigmoid(N(0, 1)) | one compiled loop; Heun and uniform t available |
#
# Presets: models `mu` (tests), `debug`, `S/2`, `B/2` (the seed's), `L/2`, `XL/2`; training `seed`, `short`,
# `test`. Flags always win over presets.

# %% [markdown]
# ## Benchmarks, in short
#
# Every figure with its method, the machine and the load is in `BENCHMARKS.md` (the original FSDiT is fetched
# separately for the first row: its Re-running section says how). On a 2-core AMD
# EPYC CPU in float32 (no accelerator was at hand, so no bfloat16 figures yet; `fsdit bench accel` writes them):
#
# | what | figure | command |
# |---|---|---|
# | train step, batch 16, ours vs the original FSDiT | S/2 5.31 vs 5.38 s, B/2 21.87 vs 23.34 s: as fast | `python bench/compare_original.py --sizes S/2 B/2 --batch 16 --reps 5` |
# | feature store vs encoders run per step (batch 4) | 14.1x (S/2) and 5.7x (B/2) faster; predicted 14.8x and 4.6x | `fsdit bench online --sizes S/2 B/2 --online-batch 4` |
# | train-step memory per v5e core, bfloat16, 16 per core (XLA's TPU plan) | B/2 3.22 GiB; XL/2 14.4 replicated, 8.07 FSDP, 2.73 FSDP + remat | `python bench/memory_plan.py --topology v5e:2x4` |
# | the whole test suite on a fresh clone | under 15 minutes on a quiet 2-core machine (BENCHMARKS.md §10) | `.ci/run` |

# %% [markdown]
# ## How the few-shot metrics are defined (`fsdit eval`)
#
# For each class of the evaluated split, G images (default 128) are generated, each from a random k-shot support
# set of that class (`--shots 1 3 5`), and scored beside real images of the class (through the same VAE round
# trip) and two baselines, a copied support and the support mean, on unseen (test) and seen (train) classes:
# **class consistency** (nearest class prototype in the encoder's embedding, the episode's supports left out),
# **FD** in that embedding, **FID** with Inception features (extra `fid`), **diversity** within a class and the
# **distance to the nearest support** (a copy check). The glyph demo adds its judge's consistency, glyph-FD and KID.

# %%
#| hide
from fsdit.config import model_config, train_config
assert model_config('B/2').tokens == 196 and train_config().batch_size == 128

# %% [markdown]
# ## The package
#
# One notebook per idea, exported to one module, numbered so that a module imports only modules above it:
# foundations (`00_config` ... `00f_utils`), data (`01_data`, `01a_glyphs`), frozen codecs (`02_encoder` SigLIP2,
# `02a_glyph_encoder`, `03_vae`, `04_features` the store, `04a_codecs`), the model (`05_dit`, `06_flow`, `07_sampler`),
# training (`08_state`, `08a_run`, `08b_steps`, `08c_train`, `08d_export`), using a run (`09_supports`, `09a_metrics`,
# `09b_fid`, `10_eval`, `10a_judge`, `10b_launch`) and on top (`11_demo`, `12_explorer`, `13_bench`). The commands
# are a layer over the library: `fsdit.cli` routes `fsdit <command>` to a module of `fsdit.commands`, each written
# in a notebook beside the component it drives (`01b_cmd_prepare`, `04b_cmd_precompute`, `08e_cmd_export`,
# `09c_cmd_sample`, `10c_cmd_eval`, `10d_cmd_train`, `11a_cmd_demo`, `13b_cmd_bench`; the explorer's app, `12a_app`,
# is a command too); a command imports the library, the library never imports a command. The glyph demo is a
# subpackage of its own, `fsdit.glyph`: its data (`01a_glyphs` -> `fsdit.glyph.data`), stand-in encoder
# (`02a_glyph_encoder` -> `fsdit.glyph.encoder`), judge (`10a_judge` -> `fsdit.glyph.judge`) and the demo itself
# (`11_demo` -> `fsdit.glyph.demo`); the core library imports it only inside the functions that load a glyph encoder's
# folder. `make sync` exports the package and writes this README from `nbs/index.ipynb`.
#
# **Troubleshooting**: every command stops with one line saying what was wrong and what to do;
# `TROUBLESHOOTING.md` lists them.
#
# ## References
#
# - Flow Matching for Generative Modeling — Lipman et al., 2022, [arXiv 2210.02747](https://arxiv.org/abs/2210.02747)
# - Scalable Diffusion Models with Transformers (DiT) — Peebles & Xie, 2023, [arXiv 2212.09748](https://arxiv.org/abs/2212.09748)
# - SigLIP 2 — Tschannen et al., February 2025, [arXiv 2502.14786](https://arxiv.org/abs/2502.14786)
# - The JAX flow-matching DiT this builds on: [kvfrans/jax-flow](https://github.com/kvfrans/jax-flow)
# - The original FSDiT: [thanhlamauto/FSDiT](https://github.com/thanhlamauto/FSDiT)
