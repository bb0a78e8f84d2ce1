"""What a visitor sees when the server's bundle is broken: the library's one-line message naming the
file, without the server's folders, and no traceback."""

from __future__ import annotations

import shutil

import pytest

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


@pytest.mark.parametrize("message, public", [
    ("/srv/models/b1/prior.safetensors: bad", "prior.safetensors: bad"),
    ("8 mL/year at 2/3 of a/b", "8 mL/year at 2/3 of a/b"),
    ("'/srv/m/bundle/' is not a bundle", "'bundle' is not a bundle"),
    # folders with spaces: all of them go, and a file name with a space keeps its words
    ("/srv/my models/John Smith/prior.safetensors: bad", "prior.safetensors: bad"),
    ("/srv/data/my scan.nii.gz: not a NIfTI file", "my scan.nii.gz: not a NIfTI file"),
    ("'/srv/my models/John Smith/' is not a bundle", "'John Smith' is not a bundle"),
    ("~/private/scan.nii.gz is missing", "scan.nii.gz is missing"),
    # storage URLs: the path inside, and a database's user, password and host
    ("storage sqlite:////srv/tune/ae.db: database is locked.", "storage sqlite://…/ae.db: database is locked."),
    ("cannot reach postgresql://optuna:s3cret@db.internal:5432/studies?sslmode=require",
     "cannot reach postgresql://…/studies"),
    ("cannot reach postgresql://optuna:s3cret@db.internal", "cannot reach postgresql://…"),
])
def test_public_message_cuts_paths_and_urls_to_their_names(message, public):
    from app_support.common import public_message

    assert public_message(message) == public


@pytest.mark.parametrize("value, said", [("gpu", ["expected auto, cpu, cuda or cuda:N"]),
                                         ("cuda:7", ["CUDA is not available", "this machine has"])])
def test_a_bad_device_is_one_message_not_a_torch_error(monkeypatch, value, said):
    """SYNTHBRAIN_DEVICE goes through the library's device picker, as --device does."""
    import torch

    if value == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.setenv("SYNTHBRAIN_DEVICE", value)
    at = open_page("learn")
    assert not at.exception
    (error,) = at.error
    assert error.value.startswith(f"SYNTHBRAIN_DEVICE={value}:"), error.value
    assert any(s in error.value for s in said) and "--device" not in error.value, error.value
    assert not at.header
