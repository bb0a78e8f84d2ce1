"""End to end: Trajectories and Learn in a real Chromium against a real server. A series is drawn,
the crosshair stays put when the frame changes, play moves the frames on; Learn's pictures appear."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .e2e_helpers import canvas_pixels, is_drawn, open_app_page, until, viewer_frame, wait_drawn, wait_for_script

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_trajectory_series_keeps_the_crosshair_across_frames(page, server):
    open_app_page(page, server.url, "/trajectories")
    page.get_by_role("button", name="Generate the series").click()
    page.get_by_text("Measured volumes along the series").wait_for(timeout=120_000)
    wait_for_script(page)
    frame = viewer_frame(page)
    canvas = frame.locator('canvas[data-panel="0"]')
    wait_drawn(canvas, "trajectory viewer")
    page.screenshot(path="/tmp/synthbrain-e2e-trajectories.png")
    assert page.locator('[data-testid="stImage"] img').count() == 1  # the GIF preview

    box = canvas.bounding_box()
    readout = frame.locator('[data-readout="0"]')
    centre = readout.get_attribute("data-mm")
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
    until(lambda: readout.get_attribute("data-mm") != centre, "the crosshair moves to the click")
    before = np.array(json.loads(readout.get_attribute("data-mm")))
    frame_1 = canvas_pixels(canvas)
    assert "Frame 1 of 5" in page.inner_text("body")
    thumb = page.locator('[data-testid="stSlider"]').filter(has_text="age 45 years").locator("input[type=range]")
    thumb.focus()
    thumb.press("ArrowRight")
    page.get_by_text("Frame 2 of 5").wait_for()
    wait_for_script(page)
    frame.locator('body[data-ready="1"]').wait_for()
    # the condition: the older brain is on screen (its slices differ from frame 1's)
    until(lambda: (lambda p: is_drawn(p) and np.abs(p.astype(int) - frame_1).mean() > 0.5)(canvas_pixels(canvas)),
          "frame 2 is drawn")
    np.testing.assert_allclose(np.array(json.loads(readout.get_attribute("data-mm"))), before, atol=1e-3)

    page.get_by_text("Play", exact=True).click()
    page.get_by_text("Frame 4 of 5").wait_for(timeout=30_000)  # moves on by itself
    page.get_by_text("Play", exact=True).click()
    wait_for_script(page)


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
