"""Every AppTest starts from the shipped demo bundle on the CPU, whatever the shell has set.

tests/app is a package (``__init__.py``), so this conftest is ``app.conftest`` and does not shadow
tests/conftest.py for the modules that ``from conftest import ...``.
"""

import sys

import pytest


@pytest.fixture(autouse=True)
def app_env(monkeypatch):
    """Each test starts from the shipped demo bundle, whatever the developer's shell has set; and
    ``__main__`` is given back afterwards: AppTest runs a page as ``__main__`` and leaves it there, and
    a later test's worker processes (spawn) would then re-run that page (or AppTest's temporary script,
    which fails outside AppTest) as their main module."""
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    for name in ("SYNTHBRAIN_BUNDLE", "SYNTHBRAIN_MODELS", "SYNTHBRAIN_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNTHBRAIN_DEVICE", "cpu")


@pytest.fixture(scope="module")
def bundle():
    """The shipped demo bundle, loaded once per test module."""
    from synthbrain.bundle import load_bundle

    return load_bundle()


@pytest.fixture
def media(monkeypatch):
    """Bytes of the images and downloads a page sends (see media_helpers)."""
    from .media_helpers import record_media

    return record_media(monkeypatch)
