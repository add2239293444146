"""Shared pytest fixtures. Each helper's fixtures carry its topic as a prefix (demo_, explorer_, siglip_, ...)."""
import importlib.util
import sys
import types

import pytest


def _torchvision_without_compiled_ops():
    """Make an installed torchvision importable when its compiled operators cannot load.

    The registry CI installs from holds only the CUDA build of torchvision; beside the CPU torch its compiled
    detection operators (nms, roi_align, ...) do not load and `import torchvision` fails while registering their
    fake and autograd kernels -- and with it everything that imports torchvision (pytorch-fid; transformers'
    vision models, once torchvision is installed). No test uses those operators, so their registrations are
    left out and torchvision's pure-Python code (the Inception model pytorch-fid builds on, transforms) imports
    as it is. Where torchvision is absent or imports cleanly, nothing changes."""
    if importlib.util.find_spec('torchvision') is None: return
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError: operator torchvision::nms does not exist
        for m in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]: del sys.modules[m]
        for m in ('torchvision._meta_registrations', 'torchvision._autograd_registrations'):
            sys.modules[m] = types.ModuleType(m)
        import torchvision  # noqa: F401


_torchvision_without_compiled_ops()


@pytest.fixture(scope='session')
def demo_tiny(tmp_path_factory, worker_id):
    """A finished `tiny` demo (data, store, a 30-step run) in DIR/demo; yields DIR. Shared: treat as read-only.

    Made once for the whole session, across pytest-xdist workers: the first worker builds it under a file lock,
    the others find every stage complete and reuse it (the demo skips finished stages)."""
    from filelock import FileLock
    from fsdit.glyph.demo import demo
    root = tmp_path_factory.getbasetemp() if worker_id == 'master' else tmp_path_factory.getbasetemp().parent
    d = root / 'demo_tiny'
    with FileLock(str(root / 'demo_tiny.lock')):
        demo(d / 'demo', 'tiny', until='train', progress=False)
    return d
