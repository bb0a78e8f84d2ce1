"""Every AppTest starts from the shipped demo bundle on the CPU, whatever the shell has set.

tests/app is a package (``__init__.py``), so this conftest is ``app.conftest`` and does not shadow
tests/conftest.py for the modules that ``from conftest import ...``.
"""

import pytest


@pytest.fixture(autouse=True)
def app_env(monkeypatch):
    """Each test starts from the shipped demo bundle, whatever the developer's shell has set."""
    for name in ("SYNTHBRAIN_BUNDLE", "SYNTHBRAIN_MODELS", "SYNTHBRAIN_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNTHBRAIN_DEVICE", "cpu")
