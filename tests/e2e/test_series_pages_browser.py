"""End to end: Trajectories and Learn in a real Chromium against a real server. A series is drawn,
the live age slider steps the same viewer through it (the crosshair stays put), play moves the frames
on; Learn's pictures appear."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .e2e_helpers import (
    VIEWER_FRAME,
    canvas_pixels,
    is_drawn,
    open_app_page,
    until,
    viewer_frame,
    wait_drawn,
    wait_for_script,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def drag_frames(page, slider, frame, n: int) -> list[int]:
    """Drag the viewer's frame slider from its left end to its right end, as a hand does, waiting at
    each position until the viewer has drawn the frame there; returns the frames drawn, in order."""
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 8, y)
    page.mouse.down()
    seen = []
    for k in range(n):
        # Chromium's range thumb is 16 px: its centre for value k is 8 + (width - 16) * k / max
        page.mouse.move(box["x"] + 8 + (box["width"] - 16) * k / (n - 1), y, steps=2)
        frame.wait_for_function("k => document.body.dataset.frame === String(k)", arg=k)
        seen.append(int(frame.evaluate("() => document.body.dataset.frame")))
    page.mouse.up()
    return seen


def test_live_age_slider_steps_the_same_viewer_through_the_series(page, server):
    """The age slider in the viewer shows every frame while it is dragged, in the same viewer element
    (no rerun, no remount: the crosshair stays where it was put), and Play moves on by itself."""
    open_app_page(page, server.url, "/trajectories")
    page.get_by_role("button", name="Generate the series").click()
    page.get_by_text("Measured volumes along the series").wait_for(timeout=120_000)
    wait_for_script(page)
    frame = viewer_frame(page)
    canvas = frame.locator('canvas[data-panel="0"]')
    wait_drawn(canvas, "trajectory viewer")
    assert page.locator('[data-testid="stImage"] img').count() == 1  # the GIF preview
    inner = page.locator(VIEWER_FRAME).first.element_handle().content_frame()

    box = canvas.bounding_box()
    readout = frame.locator('[data-readout="0"]')
    centre = readout.get_attribute("data-mm")
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
    until(lambda: readout.get_attribute("data-mm") != centre, "the crosshair moves to the click")
    before = np.array(json.loads(readout.get_attribute("data-mm")))
    label = frame.locator('#frames [data-value="frame"]')
    assert label.inner_text().startswith("Frame 1 of 5. Requested: age 45 years")
    first = canvas_pixels(canvas)
    # the elements as they are now: a remounted component or rebuilt canvas would not be these
    inner.evaluate("() => { window.keep = document.querySelector('canvas[data-panel=\"0\"]'); }")
    drawn = int(inner.evaluate("() => document.body.dataset.framesDrawn"))

    slider = frame.locator('#frames input[data-control="frame"]')
    assert drag_frames(page, slider, inner, 5) == [0, 1, 2, 3, 4]
    assert label.inner_text().startswith("Frame 5 of 5. Requested: age 85 years")
    until(lambda: (lambda p: is_drawn(p) and np.abs(p.astype(int) - first).mean() > 0.5)(canvas_pixels(canvas)),
          "the last frame (an older brain) is on screen")
    assert int(inner.evaluate("() => document.body.dataset.framesDrawn")) >= drawn + 4
    assert inner.evaluate("() => window.keep === document.querySelector('canvas[data-panel=\"0\"]')")
    np.testing.assert_allclose(np.array(json.loads(readout.get_attribute("data-mm"))), before, atol=1e-3)
    page.screenshot(path="/tmp/synthbrain-e2e-trajectories.png")

    frame.get_by_role("button", name="Play").click()
    inner.wait_for_function("() => document.body.dataset.frame === '0'", timeout=30_000)  # moves on, wraps round
    inner.wait_for_function("() => document.body.dataset.frame === '1'", timeout=30_000)
    frame.get_by_role("button", name="Pause").click()
    assert inner.evaluate("() => window.keep === document.querySelector('canvas[data-panel=\"0\"]')")


def test_learn_shows_the_live_models_pictures(page, server):
    open_app_page(page, server.url, "/learn")
    page.get_by_role("button", name="Encode and decode the template").click()
    page.get_by_text("How close the reconstruction is").wait_for(timeout=120_000)
    page.get_by_role("button", name="Show the denoising steps").click()
    page.get_by_text("Top: one channel of the latent").wait_for(timeout=120_000)
    wait_for_script(page)
    images = page.locator('[data-testid="stImage"] img')
    assert images.count() == 4
    for i in range(4):
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth") > 500
    page.screenshot(path="/tmp/synthbrain-e2e-learn.png", full_page=True)


def test_no_page_sends_a_request_off_this_machine(page, server):
    """Every page, visited in a browser, asks only the app's own server for anything (fonts, icons
    and the favicon included): offline it works, and in a hospital it tells nobody it is in use."""
    from urllib.parse import urlsplit

    from .e2e_helpers import PAGES, open_app_page

    hosts: list[str] = []
    page.on("request", lambda r: hosts.append(urlsplit(r.url).hostname or r.url.split(":")[0]))
    for path in PAGES:
        open_app_page(page, server.url, path)
    page.wait_for_load_state("networkidle")  # late requests (the favicon, lazily loaded fonts) are made
    page.evaluate("document.fonts.ready.then(() => true)")
    assert hosts and "127.0.0.1" in hosts
    assert sorted(set(hosts) - {"127.0.0.1", "data", "blob"}) == []


def test_prepare_it_on_trajectories(page, server, tmp_path):
    """An unprepared upload (nilearn's MNI152 T1 turned 10 degrees and moved 15 mm on a 2 mm scanner grid, a
    real NIfTI as a scanner would write it) gets the message and **Prepare it** (Generate stays off); pressed,
    a progress bar runs through the steps, then the before / after picture and the registration quality
    appear and the page goes on with the prepared scan (Generate on)."""
    import re
    import time

    import nibabel as nib
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.data import native
    from synthbrain.data.template import load_template
    from synthbrain.grids import DEMO
    from synthbrain.io import read_volume

    mni = read_volume(MNI152_FILE_PATH)
    moved = native.native_copy(mni, mni.data, native.motion((10, 0, 0), (0, 15, 0), load_template(DEMO).centroid_mm))
    scan = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(moved.data, moved.affine), scan)

    open_app_page(page, server.url, "/trajectories")
    page.get_by_text("A real scan: edit it, keeping the subject").click()
    page.get_by_text("Upload a NIfTI").click()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(scan))
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
    print(f"prepare step in the browser: click -> before/after shown in {time.monotonic() - start:.1f} s")
    wait_for_script(page)
    text = page.locator('[data-testid="stTable"]').filter(has_text="Correlation with the MNI152 template").inner_text()
    assert float(re.search(r"Correlation with the MNI152 template\s+([\d.]+)", text).group(1)) >= 0.95, text
    assert 9 <= float(re.search(r"Rotation of the upload off MNI152\s+([\d.]+)\s+degrees", text).group(1)) <= 11
    assert 13 <= float(re.search(r"Shift of the upload off MNI152\s+([\d.]+)\s+mm", text).group(1)) <= 17
    picture = page.locator('[data-testid="stImage"] img').first
    picture.wait_for()
    assert picture.evaluate("img => img.complete && img.naturalWidth > 600 && img.naturalHeight > 300")
    download = re.compile(r"Download the prepared scan \(real scan \(preprocessed\)")
    assert page.get_by_role("button", name=download).is_visible()
    body = page.inner_text("body")
    assert "Traceback" not in body and "has been prepared here" in body
    assert not page.locator('[data-testid="stAlert"]').filter(has_text="not prepared:").count()
    assert not prepare.count()  # the button gives way to the result
    assert generate.is_enabled()  # the page goes on with the prepared scan
    page.screenshot(path="/tmp/synthbrain-e2e-prepare.png")
