# %% [markdown]
# # Files
#
# > Writing without half-written files.

# %%
#| default_exp files

# %%
#| export
from __future__ import annotations
import os
from pathlib import Path

# %%
#| export
def write_atomic(path, data):
    "Replace `path` by `data` (str or bytes) in one rename."
    path = Path(path); tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)
