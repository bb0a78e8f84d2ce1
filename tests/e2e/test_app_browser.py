"""End to end: the app in a real Chromium against a real server. Generate a brain and see it drawn;
reconstruct an uploaded scan with the crosshair locked across the panels; a bad file's message.

The tests run in file order against one fresh server (the first one checks a fresh server's very
first visit)."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest

from .e2e_helpers import VIEWER_FRAME, canvas_pixels, open_app_page, until, viewer_frame, wait_drawn, wait_for_script

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_deep_link_on_a_fresh_server_gets_the_app(page, server):
    # Streamlit treats an app with a folder named pages/ as an old-style multipage app until the
    # entry script has run once: a first visitor of /compare would get pages without app.py.
    open_app_page(page, server.url, "/compare")
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert [line for line in nav.splitlines() if line.strip() in ("Generate", "Compare", "Model")] == [
        "Generate", "Compare", "Model"]
    assert "app" not in nav.split()


def test_generate_draws_the_brain(page, server):
    """Generate draws the sample; the viewer's readout, window/level and radiological switch; its state
    survives a sidebar change and a new sample; its PNG screenshot, measured-mask overlays with colour
    bars and opacity, and the 3D clip plane; the gallery reopens, downloads and deletes samples."""
    from PIL import Image

    open_app_page(page, server.url)
    assert "not a scan of any person" in page.inner_text("body")

    age = page.locator('[data-testid="stSlider"]').filter(has_text="Age (years)").locator("input[type=range]")
    start = start_age = float(age.input_value())
    age.focus()
    for _ in range(5):
        age.press("ArrowRight")
    wait_for_script(page)
    assert float(age.input_value()) == start + 5

    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("Sample 1", exact=True).wait_for(timeout=120_000)
    wait_for_script(page)
    assert f"age {start + 5:g} years" in page.inner_text("body")  # the moved slider reached the sampler

    frame = viewer_frame(page)
    wait_drawn(frame.locator('canvas[data-panel="0"]'), "slice viewer")
    wait_drawn(viewer_frame(page, 1).locator('canvas[data-panel="0"]'), "3D view")
    page.screenshot(path="/tmp/synthbrain-e2e-generate.png")

    # the NIfTI download (made on click) holds the volume and its sidecar
    with page.expect_download() as dl:
        page.get_by_role("button", name="NIfTI + JSON sidecar (.zip)").click()
    with zipfile.ZipFile(dl.value.path()) as z:
        names = z.namelist()
        assert sorted(n.rsplit(".", 2)[-2:] == ["nii", "gz"] or n.endswith(".json") for n in names) == [True, True]
        sidecar = json.loads(z.read(next(n for n in names if n.endswith(".json"))))
    assert sidecar["Synthetic"] is True and sidecar["Conditions"]["age"] == start + 5

    # click-to-navigate: the crosshair moves and the readout gives mm, voxel and intensity
    readout = frame.locator('[data-readout="0"]')
    before = readout.inner_text()
    mm = r"\(-?\d+\.\d, -?\d+\.\d, -?\d+\.\d\) mm"
    assert re.search(mm + r" · voxel \[\d+, \d+, \d+\] · intensity \(0\.\.1, normalised\) \d\.\d+", before), before
    box = frame.locator('canvas[data-panel="0"]').bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.12, box["y"] + box["height"] * 0.3)
    until(lambda: readout.inner_text() != before, "the readout follows the click")

    # radiological convention mirrors left and right: checked at the default window, where the two
    # hemispheres' folds differ (a saturating window would make the mirror image nearly the same),
    # and counted as pixels that change clearly, not as a mean that a near-symmetric brain keeps small
    canvas = frame.locator('canvas[data-panel="0"]')
    plain = canvas_pixels(canvas).astype(int)
    frame.locator("[data-control=radiological]").check()
    until(lambda: (np.abs(canvas_pixels(canvas).astype(int) - plain).max(axis=2) > 40).mean() > 0.01,
          "radiological view mirrors")
    # window/level: a lower level makes the same slices brighter
    brightness = canvas_pixels(canvas).mean()
    frame.locator("[data-control=level]").evaluate("e => { e.value = e.min; e.dispatchEvent(new Event('input')); }")
    until(lambda: canvas_pixels(canvas).mean() > brightness + 5, "a lower level brightens the slices")

    # the viewer keeps radiological, the crosshair and window/level across a sidebar change and a new
    # sample (the same element gets the new brain)
    iframe = page.locator(VIEWER_FRAME).first.element_handle()
    cross = lambda: np.array(json.loads(readout.get_attribute("data-mm")))  # noqa: E731
    start = cross()
    page.mouse.click(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.4)
    until(lambda: not np.allclose(cross(), start), "the crosshair moves to the click")
    clicked = cross()
    level = float(frame.locator("[data-control=level]").input_value())
    state = lambda: json.loads(frame.locator("body").get_attribute("data-state"))  # noqa: E731
    until(lambda: state().get("radiological") is True and state().get("window"), "the state is recorded")

    steps = page.locator('[data-testid="stSlider"]').filter(has_text="Denoising steps").locator("input[type=range]")
    first_steps = int(steps.input_value())
    steps.focus()
    steps.press("ArrowRight")
    wait_for_script(page)
    revision = frame.locator("body").get_attribute("data-revision")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("Sample 2", exact=True).wait_for(timeout=120_000)
    wait_for_script(page)
    until(lambda: frame.locator('body[data-ready="1"]').get_attribute("data-revision") != revision,
          "the new sample is in the viewer")
    assert page.evaluate("([a, b]) => a === b", [iframe, page.locator(VIEWER_FRAME).first.element_handle()])
    assert frame.locator("[data-control=radiological]").is_checked()
    np.testing.assert_allclose(cross(), clicked, atol=1e-3)
    assert float(frame.locator("[data-control=level]").input_value()) == pytest.approx(level, rel=1e-3)
    assert state()["radiological"] is True and np.allclose(state()["crosshair"], clicked, atol=1e-3)

    # the screenshot is what the viewer shows, named with the kind of volume
    with page.expect_download() as dl:
        frame.locator("[data-control=screenshot]").click()
    assert "synthetic" in dl.value.suggested_filename and dl.value.suggested_filename.endswith(".png")
    shot = np.asarray(Image.open(dl.value.path()).convert("RGB"))
    assert shot.shape[1] >= box["width"] and (shot.max(axis=2) > 40).mean() > 0.05

    # what was measured, as overlays with colour bars; the toolbar's opacity changes the slices
    page.get_by_text("Overlay what was measured (brain, ventricles)").click()
    wait_for_script(page)
    legend = frame.locator('[data-legend="0"]')
    until(lambda: "ventricular volume (mL)" in legend.inner_text(), "the masks' colour bars")
    assert frame.locator("[data-control=radiological]").is_checked()  # the same viewer, a layer more
    with_masks = wait_drawn(canvas, "slices with masks")
    frame.locator("[data-control=overlay-opacity]").evaluate(
        "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    until(lambda: np.abs(canvas_pixels(canvas).astype(int) - with_masks).mean() > 1, "opacity 0 hides the masks")

    # the clip plane cuts the 3D rendering
    frame.locator("[data-control=view]").select_option("render")
    whole = wait_drawn(canvas, "3D render")
    frame.locator("[data-control=clip]").select_option("coronal")
    until(lambda: np.abs(canvas_pixels(canvas).astype(int) - whole).mean() > 1, "the clip plane cuts the 3D render")
    assert state()["clip"]["axis"] == "coronal" and state()["view"] == "render"
    page.screenshot(path="/tmp/synthbrain-e2e-viewer-state.png")

    # the gallery: the older sample is reopened in the same viewer, downloaded, and the newer deleted
    seeds = {n: int(re.search(rf"Sample {n}: .*? · seed (\d+)", page.inner_text("body")).group(1)) for n in (1, 2)}
    revision = frame.locator("body").get_attribute("data-revision")
    page.locator(".st-key-gen_open_1 button:visible").click()
    page.get_by_text("Sample 1", exact=True).wait_for()
    wait_for_script(page)
    assert re.search(rf"· seed {seeds[1]} · {first_steps} steps", page.inner_text("body"))  # the line under the title
    until(lambda: frame.locator('body[data-ready="1"]').get_attribute("data-revision") != revision,
          "the reopened sample is in the viewer")
    assert page.evaluate("([a, b]) => a === b", [iframe, page.locator(VIEWER_FRAME).first.element_handle()])
    assert page.locator(".st-key-gen_open_1 button:visible").is_disabled()  # it is the one shown
    with page.expect_download() as dl:
        page.locator(".st-key-gen_dl_1 button:visible").click()
    with zipfile.ZipFile(dl.value.path()) as z:
        sidecar = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".json"))))
    assert (sidecar["Seed"], sidecar["Steps"], sidecar["Conditions"]["age"]) == (seeds[1], first_steps, start_age + 5)
    page.locator(".st-key-gen_del_2 button:visible").click()
    page.get_by_text("This session's samples (1)").wait_for()
    wait_for_script(page)
    assert page.locator(".st-key-gen_open_2").count() == 0 and page.get_by_text("Sample 1", exact=True).is_visible()


def upload_on_compare(page, server, path) -> None:
    """Open Compare, choose the upload source and drop ``path`` into the uploader."""
    open_app_page(page, server.url, "/compare")
    page.get_by_text("Upload a NIfTI").click()
    wait_for_script(page)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))


def test_compare_upload_shows_metrics_with_locked_crosshair(page, server, tmp_path):
    from synthbrain.data.template import load_template
    from synthbrain.grids import DEMO
    from synthbrain.io import Volume, write_volume

    scan = write_volume(tmp_path / "my_scan.nii.gz", Volume(load_template(DEMO).t1 * 900.0, DEMO.affine),
                        description="test scan")
    upload_on_compare(page, server, scan)
    page.get_by_text("my_scan.nii.gz: 80 x 112 x 80 voxels").wait_for()
    wait_for_script(page)
    page.get_by_role("button", name="Reconstruct").click()
    page.get_by_text("Reconstruction quality").wait_for(timeout=120_000)
    wait_for_script(page)

    table = page.locator('[data-testid="stTable"]').first.inner_text()
    for name in ("PSNR", "SSIM", "MS-SSIM", "MAE"):
        assert name in table
    psnr = float(re.search(r"PSNR\s+([\d.]+)\s+dB", table).group(1))
    assert 5 < psnr < 80
    assert "Latent values per voxel" in page.locator('[data-testid="stTable"]').nth(1).inner_text()

    frame = viewer_frame(page)
    for i in (0, 1):
        wait_drawn(frame.locator(f'canvas[data-panel="{i}"]'), f"panel {i}")
    page.screenshot(path="/tmp/synthbrain-e2e-compare.png")
    # a click in the reconstruction moves the original's crosshair to the same point
    box = frame.locator('canvas[data-panel="1"]').bounding_box()
    left, right = (frame.locator(f'[data-readout="{i}"]') for i in (0, 1))
    start = left.get_attribute("data-mm")
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    until(lambda: left.get_attribute("data-mm") != start, "the original's crosshair moves with the click")
    mm = lambda r: np.array(json.loads(r.get_attribute("data-mm")))  # noqa: E731
    until(lambda: np.allclose(mm(left), mm(right), atol=1e-3), "both crosshairs at the clicked point")
    assert "difference" in right.inner_text()
    # the right readout (two values) is shown whole, and the overlay has a colour bar in intensity units
    assert right.evaluate("e => e.scrollWidth <= e.clientWidth && e.getBoundingClientRect().bottom <= innerHeight")
    assert "intensity (0..1 scale)" in frame.locator('[data-legend="1"]').inner_text()
    assert frame.locator('[data-legend="0"]').is_hidden()


def test_compare_bad_upload_shows_the_error(page, server, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"definitely not a brain" * 10)
    upload_on_compare(page, server, bad)
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="broken.nii.gz:")
    alert.wait_for()
    text = alert.inner_text()
    assert "gzip" in text or "trailer" in text or "truncated" in text, text
    body = page.inner_text("body")
    assert "Traceback" not in body
    assert page.get_by_role("button", name="Reconstruct").is_disabled()

