"""A real `streamlit run app.py` server and Debian's Chromium driven by Playwright (also used by
benchmarks/app_latency.py).

The server listens on 127.0.0.1 only, on a free port, with one torch thread (CI machines have few
cores). Chromium renders WebGL in software (SwiftShader), so NiiVue draws without a GPU.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader"]
VIEWER_FRAME = 'iframe[title*="synthbrain_viewer"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``streamlit run app.py`` in a subprocess; ``url``; ``pid`` for memory measurements."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 90.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHBRAIN_")}
        full_env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SYNTHBRAIN_DEVICE": "cpu", **(env or {})})
        self.log = open(f"/tmp/synthbrain-e2e-{self.port}.log", "w+b")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
             "--server.port", str(self.port), "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"streamlit did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------------------- helpers


# Counts the script runs a page has seen end: Streamlit's app root says its run state in
# data-test-script-state ("running", "rerunRequested", ... "notRunning"); each change into "notRunning"
# is a run that finished. In every new document of a context from app_context(), before the app's code.
RUN_COUNTER = """(() => {
  if (window.top !== window || window.__sbRuns !== undefined) return;
  window.__sbRuns = 0;
  window.__sbSeen = 0;
  new MutationObserver(changes => {
    for (const c of changes)
      if (c.target.getAttribute('data-test-script-state') === 'notRunning' && c.oldValue !== 'notRunning')
        window.__sbRuns += 1;
  }).observe(document, {subtree: true, attributes: true, attributeOldValue: true,
                        attributeFilter: ['data-test-script-state']});
})();"""

SCRIPT_DONE = """() => window.__sbRuns > window.__sbSeen
  && document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState === 'notRunning'
  && !document.querySelector('[data-testid="stStatusWidget"]')"""


def app_context(browser, **options):
    """A browser context (a session of its own: cookies, storage) whose pages count the app's script runs."""
    context = browser.new_context(**{"viewport": {"width": 1500, "height": 1100}, **options})
    context.add_init_script(RUN_COUNTER)
    return context


def wait_for_script(page, timeout_ms: int = 120_000) -> None:
    """Until a script run this page has not waited for yet has finished and no other runs: call it
    after whatever triggers a run (a click, a key, opening the page); a run that ended before the
    call counts, so nothing waits for a run to begin."""
    if page.evaluate("() => window.__sbRuns === undefined"):
        raise AssertionError("wait_for_script needs a page of a context from app_context(browser)")
    page.wait_for_function(SCRIPT_DONE, timeout=timeout_ms)
    page.evaluate("() => { window.__sbSeen = window.__sbRuns; }")


PAGES = {"": "Generate a synthetic brain", "/compare": "Compare a scan with its reconstruction",
         "/trajectories": "Trajectories: one brain through age", "/audit": "Audit samples for memorisation",
         "/model": "Bundle folder:", "/learn": "Learn: how a synthetic brain is made"}


def open_app_page(page, url: str, path: str = "") -> None:
    """Go to a page of the app (``path`` one of PAGES) and wait until its script has finished."""
    page.goto(url + path)
    page.get_by_text(PAGES[path]).wait_for()
    wait_for_script(page)


def viewer_frame(page, index: int = 0):
    """The index-th synthbrain viewer, once it has drawn its files (its body says data-ready=1)."""
    frame = page.frame_locator(VIEWER_FRAME).nth(index)
    frame.locator('body[data-ready="1"]').wait_for(timeout=90_000)
    return frame


def canvas_pixels(locator) -> np.ndarray:
    """The canvas as the user sees it (a screenshot of its box), (H, W, 3) uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"))


def is_drawn(pixels: np.ndarray) -> bool:
    """Not blank: a drawn brain has many non-black pixels and real contrast."""
    return bool((pixels.max(axis=2) > 40).mean() > 0.05 and pixels.std() > 15)


def assert_drawn(pixels: np.ndarray, what: str) -> None:
    lit = (pixels.max(axis=2) > 40).mean()
    assert is_drawn(pixels), f"{what} looks blank: {lit:.1%} lit pixels, std {pixels.std():.1f}"


def until(condition, what: str, timeout_s: float = 60.0):
    """Poll ``condition()`` until it is truthy and return its value (a canvas redraws a frame or two
    after its data arrive); ``timeout_s`` only bounds a hang, the test waits for the condition."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def wait_drawn(canvas, what: str) -> np.ndarray:
    """The canvas's pixels once it shows a drawn brain."""
    seen: list[np.ndarray] = []
    until(lambda: is_drawn(seen.append(canvas_pixels(canvas)) or seen[-1]), f"{what} is drawn")
    return seen[-1]
