"""End to end: an unprepared upload in a real Chromium against a real server. Trajectories gets the
message and a **Prepare it** button (its Generate button stays off); pressed, a progress bar runs through
the steps, then the before / after picture and the registration quality appear and the page goes on
with the prepared scan (Generate on)."""

from __future__ import annotations

import re
import time

import nibabel as nib
import pytest
from nilearn.datasets import MNI152_FILE_PATH

from synthbrain.data import native
from synthbrain.data.template import load_template
from synthbrain.grids import DEMO
from synthbrain.io import read_volume

from .e2e_helpers import open_app_page, wait_for_script

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def native_scan(tmp_path_factory):
    """nilearn's MNI152 T1 turned 10 degrees (pitch) and moved 15 mm forward on a 2 mm scanner grid: a real
    NIfTI file, as a scanner (not ``synthbrain prepare``) would write it."""
    mni = read_volume(MNI152_FILE_PATH)
    moved = native.native_copy(mni, mni.data, native.motion((10, 0, 0), (0, 15, 0), load_template(DEMO).centroid_mm))
    path = tmp_path_factory.mktemp("scan") / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(moved.data, moved.affine), path)
    return path


def test_prepare_it_on_trajectories(page, server, native_scan):
    open_app_page(page, server.url, "/trajectories")
    page.get_by_text("A real scan: edit it, keeping the subject").click()
    page.get_by_text("Upload a NIfTI").wait_for()
    page.get_by_text("Upload a NIfTI").click()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').wait_for(state="attached")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(native_scan))
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="sub-01_T1w.nii.gz: not prepared")
    alert.wait_for()
    assert re.search(r"it is (9|10|11) degrees and 1[3-7] mm away", alert.inner_text())
    generate = page.get_by_role("button", name="Generate the series")
    prepare = page.get_by_role("button", name="Prepare it")
    prepare.wait_for()
    assert generate.is_disabled()

    start = time.monotonic()
    prepare.click()
    # progress by step while it runs in the job queue, then what was done
    page.locator('[data-testid="stProgress"]').filter(has_text="Preparing the upload").wait_for()
    page.get_by_text("Registration quality").wait_for(timeout=180_000)
    seconds = time.monotonic() - start
    wait_for_script(page)
    print(f"prepare step in the browser: click -> before/after shown in {seconds:.1f} s")
    table = page.locator('[data-testid="stTable"]').filter(has_text="Correlation with the MNI152 template")
    text = table.inner_text()
    r = float(re.search(r"Correlation with the MNI152 template\s+([\d.]+)", text).group(1))
    assert r >= 0.95, text
    assert 9 <= float(re.search(r"Rotation of the upload off MNI152\s+([\d.]+)\s+degrees", text).group(1)) <= 11
    assert 13 <= float(re.search(r"Shift of the upload off MNI152\s+([\d.]+)\s+mm", text).group(1)) <= 17
    picture = page.locator('[data-testid="stImage"] img').first
    picture.wait_for()
    assert picture.evaluate("img => img.complete && img.naturalWidth > 600 && img.naturalHeight > 300")
    assert page.get_by_role("button", name=re.compile(r"Download the prepared scan \(derived")).is_visible()
    body = page.inner_text("body")
    assert "Traceback" not in body and "has been prepared here" in body
    assert not page.locator('[data-testid="stAlert"]').filter(has_text="not prepared:").count()
    assert not prepare.count()  # the button gives way to the result
    assert generate.is_enabled()  # the page goes on with the prepared scan
    page.screenshot(path="/tmp/synthbrain-e2e-prepare.png", full_page=True)
