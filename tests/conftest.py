"""Shared pytest fixtures. Each helper's fixtures carry its topic as a prefix (demo_, explorer_, siglip_, ...)."""
import pytest


@pytest.fixture(scope='session')
def demo_tiny(tmp_path_factory):
    "A finished `tiny` demo (data, store, a 30-step run) in DIR/demo; yields DIR. Shared: treat as read-only."
    from fsdit.demo import demo
    d = tmp_path_factory.mktemp('demo_tiny')
    demo(d / 'demo', 'tiny', until='train', progress=False)
    return d
