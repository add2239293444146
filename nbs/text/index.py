# %% [markdown]
# # fsdit
#
# > Few-shot image generation: a flow-matching Diffusion Transformer in JAX/Flax that, given 5 images of a class it has never seen, generates new images of that class.
#
# fsdit conditions a DiT on frozen SigLIP2 B/16 embeddings of a support set and works in Stable
# Diffusion VAE latent space. It is a literate project: each component — config, data, encoder, VAE,
# feature store, DiT, flow-matching loss, sampler, the pmap trainer, sampling and evaluation, the
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
# ## Install
#
# ```bash
# pip install -e .            # runtime: jax, flax, optax, orbax-checkpoint, transformers (configs only), safetensors, ...
# pip install -e ".[fid]"     # + torch and pytorch-fid for Inception FID
# ```
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
