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
import weakref
from pathlib import Path

import numpy as np
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

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


class ScriptRuns:
    """The app's script runs one page has seen finish, counted from the server's own messages: each run
    ends with one ``script_finished`` ForwardMsg on the page's websocket (read with Streamlit's protobuf
    classes). The run state that the page shows (``data-test-script-state``) cannot count them: React
    may draw a short run's "running" and "notRunning" in one commit, and no change is seen (measured:
    1 of 40 clicks on a radio button; a test waiting for that run hung)."""

    def __init__(self) -> None:
        self.finished = self.seen = 0

    def socket(self, ws) -> None:
        if ws.url.endswith("/_stcore/stream"):
            self.finished = self.seen = 0  # a new document: a session of its own
            ws.on("framereceived", self.frame)

    def frame(self, payload) -> None:
        if isinstance(payload, bytes):
            msg = ForwardMsg.FromString(payload)
            # a run stopped for a rerun is followed by that rerun: only the last of them counts
            early = ForwardMsg.FINISHED_EARLY_FOR_RERUN
            if msg.WhichOneof("type") == "script_finished" and msg.script_finished != early:
                self.finished += 1


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # page -> ScriptRuns

# the page is idle: its app says no run is going on and shows no "Running..." widget
IDLE = """() => document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState === 'notRunning'
  && !document.querySelector('[data-testid="stStatusWidget"]')"""


def _count_runs(page) -> None:
    runs = _RUNS[page] = ScriptRuns()
    page.on("websocket", runs.socket)


def app_context(browser, **options):
    """A browser context (a session of its own: cookies, storage) whose pages count the app's script runs."""
    context = browser.new_context(**{"viewport": {"width": 1500, "height": 1100}, **options})
    context.on("page", _count_runs)
    return context


def wait_for_script(page, timeout_ms: int = 120_000) -> None:
    """Until a script run this page has not waited for yet has finished and no other runs: call it
    after whatever triggers a run (a click, a key, opening the page); a run that ended before the
    call counts, so nothing waits for a run to begin."""
    runs = _RUNS.get(page)
    if runs is None:
        raise AssertionError("wait_for_script needs a page of a context from app_context(browser)")
    deadline = time.monotonic() + timeout_ms / 1000
    while runs.finished <= runs.seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no script run of this page finished within {timeout_ms / 1000:g} s")
        page.wait_for_timeout(20)  # Playwright hands over the socket's frames while it waits
    page.wait_for_function(IDLE, timeout=max(1000.0, (deadline - time.monotonic()) * 1000))
    runs.seen = runs.finished


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
