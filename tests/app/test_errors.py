"""What a visitor sees when the server's bundle is broken: the library's one-line message naming the
file, without the server's folders, and no traceback."""

from __future__ import annotations

import shutil

from synthbrain.bundle import demo_bundle_path

from .app_helpers import open_page


def test_a_broken_bundle_is_named_by_its_file_not_its_server_path(monkeypatch, tmp_path):
    folder = shutil.copytree(demo_bundle_path(), tmp_path / "srv-private-models" / "bundle")
    (folder / "config.json").write_text("{not json")
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page("learn")
    assert not at.exception
    (error,) = at.error
    assert "config.json" in error.value
    assert "srv-private-models" not in error.value and str(tmp_path) not in error.value
    assert not at.header  # the page stopped at the error


def test_public_message_keeps_names_and_ratios():
    from app_support.common import public_message

    assert public_message("/srv/models/b1/prior.safetensors: bad") == "prior.safetensors: bad"
    assert public_message("8 mL/year at 2/3 of a/b") == "8 mL/year at 2/3 of a/b"
    assert public_message("'/srv/m/bundle/' is not a bundle") == "'bundle' is not a bundle"
