# %% [markdown]
# # Files
#
# > Writing files and folders whole or not at all: a temporary sibling, renamed into place when it is complete. One place for what `prepare`, the glyph dataset, the feature store, the judge and the run directory all need.

# %%
#| default_exp files

# %%
#| export
from __future__ import annotations
import contextlib, os, shutil, tempfile
from pathlib import Path
from typing import Iterator

# %%
import tempfile as _tf
import numpy as np
from fastcore.test import test_eq, test_fail

from fsdit.testing import raises


# %% [markdown]
# ## Why
#
# A process can be killed at any instruction (a pre-empted TPU, a full disk, Ctrl-C). A file written in
# place can then be left half-written, and a later run would read it as if it were whole. The cure is the
# same everywhere: write a hidden sibling, then `os.replace`/`os.rename` it onto the real name. A rename
# within one folder is atomic on POSIX file systems, so a reader sees the old version or the new one,
# never a mixture; a killed writer leaves only a hidden temporary behind.
#
# ## Folders
#
# `partial_dir(dst)` makes the hidden sibling `.NAME.partial-XXXX` to build a folder in. `tempfile.mkdtemp`
# creates it with mode 0700; the folder gets the permissions a plain `mkdir` would give instead (0755 under
# the usual umask), since it becomes the result.

# %%
#| export
def _umask() -> int:
    mask = os.umask(0); os.umask(mask)
    return mask


def partial_dir(dst) -> Path:
    "A new hidden sibling `.NAME.partial-XXXX` of `dst` to build it in, with the permissions `mkdir` gives (not mkdtemp's 0700)."
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.partial-', dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


# %%
_root = Path(_tf.mkdtemp())
_p = partial_dir(_root / 'split')
assert _p.parent == _root and _p.name.startswith('.split.partial-') and _p.is_dir()
test_eq(_p.stat().st_mode & 0o777, 0o777 & ~_umask())
assert partial_dir(_root / 'split') != _p                                 # each call a new folder


# %% [markdown]
# `building(dst)` wraps the whole pattern: the block fills the folder it is given, and when the block
# ends without an exception the folder is renamed onto `dst`. An empty `dst` (made beforehand, e.g. by a
# user) is replaced; a non-empty one only with `replace=True` — for results that are rebuilt on purpose,
# like a judge trained again with other settings — and then the old folder is moved aside first and
# deleted after, so `dst` is never missing for longer than between two renames. When the block fails the
# partial folder is deleted and the exception goes on. `dst`'s parent folders are made as needed.

# %%
#| export
def _full(d: Path) -> bool: return d.is_dir() and any(d.iterdir())


def _move_into_place(tmp: Path, dst: Path, replace: bool):
    "Rename `tmp` onto `dst`; a non-empty `dst` is moved aside and deleted (only with `replace`)."
    if not _full(dst): os.replace(tmp, dst); return        # replaces an empty folder (POSIX rename)
    if not replace: raise FileExistsError(f"{dst} exists and is not empty: delete it or choose another folder")
    old = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.old-', dir=dst.parent))
    os.replace(dst, old)                                    # `old` is empty: the rename replaces it
    try: os.replace(tmp, dst)
    except BaseException: os.replace(old, dst); raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building(dst, replace: bool = False) -> Iterator[Path]:
    "A `partial_dir(dst)` to fill; renamed onto `dst` when the block succeeds, deleted when it fails."
    dst = Path(dst)
    if _full(dst) and not replace: raise FileExistsError(f"{dst} exists and is not empty: delete it or choose another folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(dst)
    try:
        yield tmp
        _move_into_place(tmp, dst, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise


# %% [markdown]
# A folder built whole, replaced only when asked, and nothing left behind by a block that fails:

# %%
with building(_root / 'a' / 'b') as d: (d / 'x.txt').write_text('one')
test_eq((_root / 'a' / 'b' / 'x.txt').read_text(), 'one')
test_eq((_root / 'a' / 'b').stat().st_mode & 0o777, 0o777 & ~_umask())
raises(lambda: building(_root / 'a' / 'b').__enter__(), 'is not empty')
with building(_root / 'a' / 'b', replace=True) as d: (d / 'y.txt').write_text('two')
test_eq(sorted(p.name for p in (_root / 'a' / 'b').iterdir()), ['y.txt'])
(_root / 'empty').mkdir()
with building(_root / 'empty') as d: (d / 'z').write_text('')
assert (_root / 'empty' / 'z').exists()
def _fails():
    with building(_root / 'c') as d: (d / 'half').write_text('...'); raise KeyboardInterrupt
raises(_fails, '', KeyboardInterrupt)
assert not (_root / 'c').exists()
test_eq([p.name for p in (_root / 'a').iterdir()], ['b'])                  # no partial or old copy left


# %% [markdown]
# ## Files
#
# `atomic_file(path)` yields a hidden sibling path for the block to write (nothing is created until the
# block writes it, so the file gets the usual permissions). Its name ends in `path`'s suffix: `np.savez`
# appends `.npz` to a name that does not end in it, and would write beside the temporary instead.
# `write_atomic(path, data)` is the common case, a string (UTF-8) or bytes.

# %%
#| export
@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    "A hidden temporary sibling of `path` (same suffix) to write; `os.replace`d onto `path` when the block succeeds, removed when it fails."
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}{path.suffix}')
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True); raise


def write_atomic(path, data: str | bytes) -> Path:
    "Replace `path` by `data` (str as UTF-8, or bytes) in one rename: a kill leaves the old file or the new one."
    with atomic_file(path) as tmp:
        if isinstance(data, str): tmp.write_text(data, encoding='utf-8')
        else: tmp.write_bytes(data)
    return Path(path)


# %%
_f = write_atomic(_root / 'config.json', '{"a": 1}')
test_eq(_f.read_text(), '{"a": 1}'); write_atomic(_f, b'{"a": 2}'); test_eq(_f.read_text(), '{"a": 2}')
test_eq(_f.stat().st_mode & 0o777, 0o666 & ~_umask())
with atomic_file(_root / 'arrays.npz') as t: np.savez(t, x=np.arange(3))       # no second .npz appended
test_eq(np.load(_root / 'arrays.npz')['x'], np.arange(3))
def _half():
    with atomic_file(_f) as t: t.write_text('{"a": '); raise OSError('disk full')
raises(_half, 'disk full', OSError)
test_eq(_f.read_text(), '{"a": 2}')                                          # the old file, whole
test_eq(sorted(p.name for p in _root.iterdir() if p.is_file()), ['arrays.npz', 'config.json'])


# %% [markdown]
# Weights go to files as flat dicts (safetensors, npz): one tensor per leaf, named by its path in the parameter
# tree. `flat_params` names them, `unflat_params` nests them back; every writer and reader of weights (runs,
# exports, the judge, the glyph encoder) uses this one naming.

# %%
#| export
def flat_params(params) -> dict:
    "Parameters as one flat dict, each leaf named by its path (`block_0/attn/q/kernel`): the tensors of a safetensors file."
    import jax
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflat_params(flat: dict) -> dict:
    "The nested parameters whose `flat_params` is `flat`."
    out: dict = {}
    for key, v in flat.items():
        *path, leaf = key.split('/'); d = out
        for k in path: d = d.setdefault(k, {})
        d[leaf] = v
    return out


# %%
_tree = {'block_0': {'attn': {'q': {'kernel': np.ones((2, 3))}}, 'ln': {'scale': np.zeros(3)}}, 'probe': np.arange(2)}
_flatd = flat_params(_tree)
test_eq(sorted(_flatd), ['block_0/attn/q/kernel', 'block_0/ln/scale', 'probe'])
test_eq(unflat_params(_flatd)['block_0']['attn']['q']['kernel'], _tree['block_0']['attn']['q']['kernel'])
test_eq(flat_params(unflat_params(_flatd)).keys(), _flatd.keys())
