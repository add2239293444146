# %% [markdown]
# # Hub
#
# > A checkpoint named by a local folder or a Hugging Face hub id, resolved to a local folder: from the cache when it is there, downloaded when the hub can be reached, refused at once with the fix when it cannot.

# %%
#| default_exp hub

# %%
#| export
from __future__ import annotations
import os, socket, urllib.parse
from pathlib import Path
from typing import Sequence

# %%
import tempfile, time
from fastcore.test import test_eq

from fsdit.testing import raises


# %% [markdown]
# ## One rule for the encoder and the VAE
#
# Both frozen networks are read from a folder: `config.json` beside safetensors weights. A name that is a
# folder is read as it is (a `subfolder` inside it when given). Anything else must look like a hub id
# (`owner/name`); a path that does not exist (absolute, `./...`, `~/...`, or with more than one slash) is
# refused as a missing folder rather than sent to the hub.
#
# A hub id is first looked up in `huggingface_hub`'s cache, with no network at all; it counts only when
# `config.json` and a weights file are both there. Otherwise the files are downloaded — unless the hub is
# switched off (`HF_HUB_OFFLINE=1`) or cannot be reached (a 3-second connection attempt), in which case
# the error says so at once instead of after `huggingface_hub`'s retries. Only the files matching
# `patterns` are fetched (the hub repos also hold `.bin` and `.ckpt` copies). The error names the repo, the
# command that downloads it on another machine and how to pass the folder instead; there is never a
# fallback to random weights.

# %%
#| export
class HubUnavailableError(OSError):
    "A hub id could not be fetched (no network, offline mode, or no such repo) and is not in the local cache."


def hub_reachable(timeout: float = 3.0) -> bool:
    "Whether the hub's endpoint accepts a connection (False in offline mode; True behind a proxy, which the client uses)."
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE: return False
    if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')): return True
    u = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == 'https' else 80)), timeout=timeout).close()
        return True
    except OSError: return False


def _complete(d: Path, patterns: Sequence[str]) -> bool:
    "`config.json` and at least one of the other (weights) patterns are in `d`."
    return (d / 'config.json').is_file() and any(any(d.glob(p)) for p in patterns if p != 'config.json')


def _unavailable(repo: str, why: str, what: str, patterns: Sequence[str], loader: str) -> HubUnavailableError:
    include = ' '.join(f"'{p}'" for p in patterns)
    return HubUnavailableError(
        f"cannot get {what} {repo!r} from the Hugging Face hub ({why}), and it is not a local directory. On a machine "
        f"with internet run `hf download {repo} --include {include} --local-dir DIR`, copy DIR here and pass that "
        f"directory instead of the id: {loader}('DIR').")


# %% [markdown]
# The error carries everything needed to recover without network:

# %%
_d0 = Path(tempfile.mkdtemp())
assert not _complete(_d0, ['config.json', '*.safetensors'])
(_d0 / 'config.json').write_text('{}'); (_d0 / 'w.safetensors').write_bytes(b'')
assert _complete(_d0, ['config.json', '*.safetensors'])
_e = _unavailable('owner/vae', 'no connection', 'the VAE', ['config.json', '*.safetensors'], 'SDVAE.from_pretrained')
assert isinstance(_e, OSError) and "--include 'config.json' '*.safetensors'" in str(_e) and "SDVAE.from_pretrained('DIR')" in str(_e)


# %% [markdown]
# Resolving a name: a local folder as it is, else the hub cache, else a download when the hub can be reached.

# %%
#| export
def _local(p: Path, subfolder: str | None, what: str) -> Path:
    d = p / subfolder if subfolder else p
    if not (d / 'config.json').is_file():
        raise FileNotFoundError(f"{d} has no config.json: expected {what} folder (config.json and its safetensors weights)")
    return d


def resolve_checkpoint(repo_id_or_dir: str | os.PathLike, patterns: Sequence[str], what: str = 'a checkpoint',
                       loader: str = 'from_pretrained', subfolder: str | None = None) -> Path:
    "The local folder holding a checkpoint: `repo_id_or_dir` itself, or the cached or downloaded hub snapshot of that id."
    p = Path(repo_id_or_dir).expanduser()
    if p.is_dir(): return _local(p, subfolder, what)
    repo = str(repo_id_or_dir)
    if p.exists() or p.is_absolute() or repo.startswith(('.', '~')) or repo.count('/') != 1:
        raise FileNotFoundError(f"{repo!r} is neither a checkpoint directory (no directory of that name) nor a hub id "
                                f"like 'owner/name'")
    from huggingface_hub import snapshot_download
    allow = [f'{subfolder}/{q}' for q in patterns] if subfolder else list(patterns)
    sub = lambda d: Path(d) / subfolder if subfolder else Path(d)
    try:                                                   # complete in the cache: no network at all
        d = sub(snapshot_download(repo, allow_patterns=allow, local_files_only=True))
        if _complete(d, patterns): return d
    except Exception: pass
    if not hub_reachable():
        from huggingface_hub import constants
        why = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'no connection'
        raise _unavailable(repo, f'{why} and no cached copy', what, patterns, loader)
    try: d = sub(snapshot_download(repo, allow_patterns=allow, etag_timeout=10))
    except Exception as e:
        raise _unavailable(repo, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", what, patterns, loader) from None
    if not _complete(d, patterns): raise _unavailable(repo, f'it holds none of {list(patterns)}', what, patterns, loader)
    return d


# %% [markdown]
# A folder is used as it is; a folder without `config.json`, or a path that is neither a folder nor a hub
# id, is refused naming what was expected:

# %%
_d = Path(tempfile.mkdtemp())
(_d / 'ckpt' / 'vae').mkdir(parents=True); (_d / 'ckpt' / 'vae' / 'config.json').write_text('{}')
test_eq(resolve_checkpoint(_d / 'ckpt', ['config.json'], subfolder='vae'), _d / 'ckpt' / 'vae')
raises(lambda: resolve_checkpoint(_d / 'ckpt', ['config.json'], 'a diffusers AutoencoderKL'), 'no config.json: expected a diffusers', FileNotFoundError)
raises(lambda: resolve_checkpoint(_d / 'missing', ['config.json']), 'neither a checkpoint directory', FileNotFoundError)
raises(lambda: resolve_checkpoint('./no/such/vae', ['config.json']), 'no directory', FileNotFoundError)

# %% [markdown]
# Offline, a hub id that is not cached fails at once, and the message says how to get and pass the folder:

# %%
from huggingface_hub import constants as _hc
_saved = _hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE
_hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE = True, str(_d / 'hub')
try:
    _t = time.time()
    _m = raises(lambda: resolve_checkpoint('someone/some-vae', ['config.json', 'diffusion_pytorch_model.safetensors'],
                                           'the VAE', 'SDVAE.from_pretrained'), 'HF_HUB_OFFLINE is set', HubUnavailableError)
    assert time.time() - _t < 10 and "'someone/some-vae'" in _m and '--local-dir DIR' in _m and "SDVAE.from_pretrained('DIR')" in _m
finally: _hc.HF_HUB_OFFLINE, _hc.HF_HUB_CACHE = _saved
