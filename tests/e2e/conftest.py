"""Fixtures of the browser tests: one server and one Chromium per module, a fresh page per test.

tests/e2e is a package (``__init__.py``), so this conftest does not shadow tests/conftest.py for the
modules that ``from conftest import ...``.
"""

from __future__ import annotations

import pytest

from .e2e_helpers import CHROMIUM, CHROMIUM_ARGS, Server, app_context


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package); the browser tests need it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = app_context(browser)
    pg = context.new_page()
    pg.set_default_timeout(90_000)
    yield pg
    context.close()
