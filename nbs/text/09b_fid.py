# %% [markdown]
# # FID features
#
# > Inception pool3 features exactly as pytorch-fid computes them (the `fid` extra: torch and pytorch-fid), for the FID of generated against real images.

# %%
#| default_exp fid

# %%
#| export
from __future__ import annotations
import numpy as np

from fsdit.images import to_uint8

# %%
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## Inception features, as pytorch-fid defines them
#
# FID is the Fréchet distance between the 2048-d final-pool activations of pytorch-fid's `InceptionV3`
# (TensorFlow's 2015 FID Inception, ported), on images in [0, 1] that the network resizes bilinearly to
# 299x299. It needs torch, torchvision and pytorch-fid — the optional extra `pip install 'fsdit[fid]'` —
# and its weights download from GitHub on first use (torch.hub caches them). Nothing here is imported
# until FID is asked for. `weights=None` builds the same architecture with random weights, so the
# feature path is tested without the download; a local `.pth` file works offline.

# %%
#| export
def _import_fid():
    "torch and pytorch_fid.inception, or an ImportError that says how to get them."
    try:
        import torch
        from pytorch_fid import inception
    except ImportError as e:
        raise ImportError(f"FID needs torch, torchvision and pytorch-fid: pip install 'fsdit[fid]'. Import failed: {e!r}") from e
    except Exception as e:  # typically RuntimeError "operator torchvision::nms does not exist"
        raise ImportError("torchvision does not load beside this torch: its compiled operators were built for another "
                          "torch (for example PyPI's CUDA torchvision beside a CPU torch). Install the torchvision that "
                          "matches your torch from the same index (for a CPU torch: pip install torchvision "
                          f"--index-url https://download.pytorch.org/whl/cpu). Import failed: {e!r}") from e
    return torch, inception


def fid_available() -> bool:
    "Whether the FID extra imports here."
    try: _import_fid(); return True
    except ImportError: return False


# %% [markdown]
# Whether the extra is there decides whether FID is computed at all; when it is not, the error says what to install:

# %%
if fid_available(): assert hasattr(_import_fid()[1], "InceptionV3")
else: test_fail(_import_fid, contains='pip install')


# %% [markdown]
# The network, and its features of fsdit's images:

# %%
#| export
def _fid_inception_net(inc, state_dict=None):
    "pytorch-fid's `fid_inception_v3` with the state dict given (or random) instead of downloaded."
    net = inc._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c = inc.FIDInceptionA(192, pool_features=32), inc.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inc.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inc.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c, net.Mixed_6d = inc.FIDInceptionC(768, channels_7x7=160), inc.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inc.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = inc.FIDInceptionE_1(1280), inc.FIDInceptionE_2(2048)
    if state_dict is not None: net.load_state_dict(state_dict)
    return net


def fid_inception(weights: str | None = 'download', device: str | None = None):
    "pytorch-fid's InceptionV3 (pool3, 2048-d); weights 'download' (pytorch-fid's file), a local .pth, or None (random)."
    torch, inc = _import_fid()
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if weights == 'download':
        try: model = inc.InceptionV3([inc.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except OSError as e:  # URLError is an OSError
            raise RuntimeError(f"could not download the FID Inception weights from {inc.FID_WEIGHTS_URL} ({e}); "
                               "offline, download that file elsewhere and pass its path as the weights") from e
    else:
        sd = None if weights is None else torch.load(weights, map_location='cpu')
        build, inc.fid_inception_v3 = inc.fid_inception_v3, lambda: _fid_inception_net(inc, sd)
        try: model = inc.InceptionV3([inc.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        finally: inc.fid_inception_v3 = build
    return model.eval().to(device)


def inception_features(images, model, batch_size: int = 50) -> np.ndarray:
    "pytorch-fid pool3 features (N, 2048) of NHWC images (uint8, or float in [-1, 1]; grayscale is repeated)."
    torch, _ = _import_fid()
    device = next(model.parameters()).device
    x = to_uint8(images)
    if x.shape[-1] == 1: x = np.repeat(x, 3, -1)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            b = torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255).to(device)
            f = model(b)[0]                                        # (b, 2048, 1, 1)
            if f.shape[2:] != (1, 1): f = torch.nn.functional.adaptive_avg_pool2d(f, (1, 1))
            out.append(f.squeeze(3).squeeze(2).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 2048))


# %% [markdown]
# Images enter as fsdit holds them, NHWC in [-1, 1] (or uint8). Generated images are first quantised
# to uint8, as they would be when saved to PNG files and read back by pytorch-fid's own script.

# %% [markdown]
# With the extra installed, random weights give 2048-d features for any image size; without it (or with a
# torchvision built for another torch), the error says what to install. `tests/test_eval.py` checks this path
# against pytorch-fid's own file-reading `get_activations` in CI's second environment, which has the extra.

# %%
imgs = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
if fid_available():
    feats = inception_features(imgs, fid_inception(weights=None), batch_size=1)
    test_eq(feats.shape, (2, 2048)); assert np.isfinite(feats).all()
else:
    test_fail(lambda: fid_inception(weights=None), contains="torchvision")
test_eq(to_uint8(np.array([-1., 0., 1.])), np.array([0, 128, 255], np.uint8))
