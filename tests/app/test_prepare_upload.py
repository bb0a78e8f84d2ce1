"""An upload that is not prepared (not in MNI space, or with a skull) gets the message that says to run
``synthbrain prepare``, on both pages that take uploads, and never a silent result."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage as ndi

from synthbrain.data.template import load_template
from synthbrain.io import Volume, to_nifti_bytes

from .app_helpers import open_page, viewer_calls

# page -> (the source radio's key, the go button's key, whether the button sits in the sidebar, what to pick first)
PAGES = {"compare": ("cmp_source", "cmp_go", False, None), "trajectories": ("traj_source", "traj_go", True, "scan")}


@pytest.fixture(scope="module")
def native_upload(bundle) -> bytes:
    """The template turned 12 degrees (pitch) and moved 16 mm forward, as a scanner might place a head."""
    t1 = load_template(bundle.grid).t1
    moved = ndi.shift(ndi.rotate(t1, 12.0, axes=(1, 2), reshape=False, order=1), (0, 8, 0), order=1)
    return to_nifti_bytes(Volume(np.clip(moved, 0, None) * 800.0, bundle.grid.affine), description="test scan")


@pytest.mark.parametrize("page", list(PAGES))
def test_unprepared_upload_gets_the_prepare_message(page, native_upload):
    radio, go, in_sidebar, start = PAGES[page]
    at = open_page(page)
    if start:
        at.radio(key="traj_start").set_value(start).run()
    at.radio(key=radio).set_value("upload").run()
    at.get("file_uploader")[0].upload("native.nii.gz", native_upload, "application/gzip")
    at.run()
    assert not at.exception
    (error,) = at.error
    assert re.match(r"native\.nii\.gz: not prepared: it is 1[1-3] degrees and 1[4-8] mm away", error.value)
    assert "synthbrain prepare" in error.value and "\n" not in error.value
    button = at.sidebar.button(key=go) if in_sidebar else at.button(key=go)
    assert button.disabled
    assert not viewer_calls(at)
