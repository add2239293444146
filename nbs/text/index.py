# %% [markdown]
# # fsdit
#
# > Few-shot image generation: a flow-matching Diffusion Transformer in JAX/Flax that, given 5 images of a class it has never seen, generates new images of that class.
#
# fsdit conditions a DiT on frozen SigLIP2 B/16 embeddings of a support set and works in Stable
# Diffusion VAE latent space. It is a literate project: each component is defined and tested in a
# notebook under `nbs/` and exported to the `fsdit` package.
#
# ```
# 5 support images -> [SigLIP2 B/16, frozen] -> mean of L2-normalised embeddings -> MLP -> adaLN
# target image     -> [SD-VAE, frozen]       -> latent 28x28x4 -> DiT (adaLN-Zero)  -> velocity
# ```
#
# ## Two commands
#
# On a fresh machine with Python 3.10+ and `make`:
#
# ```bash
# make demo   # set up a virtualenv and run the main job
# make test   # set up a virtualenv with the test extras and run every test (pytest + nbdev_test)
# ```

# %%
#| hide
from fsdit.config import model_config
assert model_config('B/2').tokens == 196
