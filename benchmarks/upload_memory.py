"""Upload memory and server latency: what made-up and over-limit uploads cost the server, and how fast
/_stcore/health answers while a Generate runs.

Uploads: a real browser session (Chromium) uploads a scan, then its cookie and XSRF token PUT files to
made-up upload ids, and files over the limit (announced by Content-Length, and streamed with none).
Measured on the SynthBrain app (app_support/uploads.py) and, for comparison, on a one-uploader
Streamlit app with Streamlit's own upload manager and the same config.toml.

Latency: one session presses Generate several times while another thread asks /_stcore/health every
0.1 s; with model jobs and page scripts niced (SYNTHBRAIN_NICE=10, the default) and not (0).

    python benchmarks/upload_memory.py [--puts 5] [--mb 20] [--generates 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write_section  # noqa: E402

from tests.e2e.e2e_helpers import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    Server,
    app_context,
    free_port,
    open_app_page,
    wait_for_script,
)
from tests.e2e.test_app_edges_browser import LIMIT_MB, Session, rss_mb  # noqa: E402

LATENCY_NOTE = (
    "Seen on this machine at a load average of about 15 (other jobs on its 2 cores): a few answers over 1 s, one "
    "per Generate, when its result goes out; with PYTHONASYNCIODEBUG=1 the server logged Streamlit's WebSocket "
    "sender step (`starlette-ws-send`) taking up to 2.4 s in the event loop (not the sampler, and not the "
    "surfaces: run in the same process they delay an asyncio loop by < 0.1 s). Nicing model jobs and page "
    "scripts (SYNTHBRAIN_NICE) halved the median and p95 there.")
PLAIN_APP = 'import streamlit as st\n\nst.title("One uploader")\nst.file_uploader("A file")\n'


class PlainServer:
    """``streamlit run`` of a one-uploader app in a temp folder with the project's config.toml."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="synthbrain-plain-"))
        (self.dir / ".streamlit").mkdir()
        shutil.copy(ROOT / ".streamlit" / "config.toml", self.dir / ".streamlit" / "config.toml")
        (self.dir / "plain.py").write_text(PLAIN_APP)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "plain.py", "--server.port",
                                      str(self.port), "--server.fileWatcherType", "none"], cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the plain Streamlit app did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def capture(page, url: str, path: Path, synthbrain: bool) -> Session:
    """Upload ``path`` as a user does; the session's upload credentials."""
    if synthbrain:
        open_app_page(page, url, "/compare")
        page.get_by_text("Upload a NIfTI").click()
    else:
        page.goto(url)
        page.get_by_text("One uploader").wait_for()
    wait_for_script(page)
    with page.expect_request(lambda r: r.method == "PUT" and "/_stcore/upload_file/" in r.url) as put:
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    wait_for_script(page)
    request = put.value
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    return Session(int(url.rsplit(":", 1)[1]), request.url.split("/_stcore/upload_file/", 1)[1].split("/")[0],
                   cookie, request.headers["x-xsrftoken"])


def upload_rows(browser, server, label: str, synthbrain: bool, scan: Path, puts: int, mb: int) -> list[tuple]:
    context = app_context(browser)
    try:
        page = context.new_page()
        page.set_default_timeout(180_000)
        session = capture(page, server.url, scan, synthbrain)
        data = os.urandom(mb * 1024 * 1024)
        base = rss_mb(server.pid)
        statuses = [session.put(str(uuid.uuid4()), data) for _ in range(puts)]
        after = rss_mb(server.pid)
        rows = [(label, f"{puts} PUTs of {mb} MB to made-up ids", " ".join(map(str, sorted(set(statuses)))),
                 f"{base:.0f} -> {after:.0f}", f"{after - base:+.0f}", "")]
        for what, kw in (("over the limit, announced (Content-Length)", {"announce": (LIMIT_MB + 10) << 20}),
                         ("over the limit, streamed (chunked)", {"over_by": 1024})):
            base = rss_mb(server.pid)
            t0 = time.perf_counter()
            status = session.put(str(uuid.uuid4()), **kw)
            seconds = time.perf_counter() - t0
            after = rss_mb(server.pid)
            rows.append((label, what, str(status), f"{base:.0f} -> {after:.0f}", f"{after - base:+.0f}",
                         f"{seconds:.2f}"))
    finally:
        context.close()
    return rows


def health_latency(browser, nice: int, generates: int) -> tuple[list[float], list[float]]:
    """Seconds each /_stcore/health took while ``generates`` Generates ran one after another; and
    the Generate click-to-result times."""
    server = Server(env={"SYNTHBRAIN_NICE": str(nice), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(server.url + "/_stcore/health", timeout=10):
                    pass
                latencies.append(time.perf_counter() - t0)
            except OSError:
                latencies.append(float("inf"))
            time.sleep(0.1)

    context = app_context(browser)
    try:
        page = context.new_page()
        page.set_default_timeout(300_000)
        open_app_page(page, server.url)
        page.get_by_role("button", name="Generate", exact=True).click()  # warm-up: loads the model
        page.get_by_text("Sample 1", exact=True).wait_for()
        wait_for_script(page)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        times = []
        for k in range(generates):
            t0 = time.perf_counter()
            page.get_by_role("button", name="Generate", exact=True).click()
            page.get_by_text(f"Sample {k + 2}", exact=True).wait_for()
            wait_for_script(page)
            times.append(time.perf_counter() - t0)
        done.set()
        poller.join()
    finally:
        context.close()
        server.stop()
    return latencies, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--puts", type=int, default=5)
    ap.add_argument("--mb", type=int, default=20, help="size of each made-up upload (MB)")
    ap.add_argument("--generates", type=int, default=3)
    args = ap.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing")
    from playwright.sync_api import sync_playwright

    from synthbrain.data.template import load_template
    from synthbrain.grids import DEMO
    from synthbrain.io import Volume, write_volume

    tmp = Path(tempfile.mkdtemp(prefix="synthbrain-upload-bench-"))
    scan = write_volume(tmp / "scan.nii.gz", Volume(load_template(DEMO).t1 * 900.0, DEMO.affine), description="scan")
    rows, latency_rows = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        server = Server()
        try:
            rows += upload_rows(browser, server, "SynthBrain app", True, scan, args.puts, args.mb)
        finally:
            server.stop()
        plain = PlainServer()
        try:
            rows += upload_rows(browser, plain, "Streamlit's own manager", False, scan, args.puts, args.mb)
        finally:
            plain.stop()
        load = [os.getloadavg()[0]]
        for nice in (10, 0):
            lat, times = health_latency(browser, nice, args.generates)
            load.append(os.getloadavg()[0])
            ok = sorted(x for x in lat if x != float("inf"))
            latency_rows.append((f"SYNTHBRAIN_NICE={nice}", str(len(lat)), f"{statistics.median(ok) * 1e3:.0f}",
                                 f"{ok[int(0.95 * (len(ok) - 1))] * 1e3:.0f}", f"{max(lat) * 1e3:.0f}",
                                 str(sum(x > 1.0 for x in lat)), " ".join(f"{t:.1f}" for t in times)))
        browser.close()
    shutil.rmtree(tmp, ignore_errors=True)

    body = [f"`server.maxUploadSize` = {LIMIT_MB} MB. Server RSS (MB) before -> after each step; a refused PUT "
            "still has its body read by Streamlit (transiently) before the manager refuses it.", "",
            "| server | uploads | status | RSS (MB) | growth (MB) | time (s) |", "|---|---|---|---|---|---|"]
    body += [f"| {' | '.join(r)} |" for r in rows]
    body += ["", f"`/_stcore/health` every 0.1 s while one session pressed Generate {args.generates} times (after a "
             "warm-up sample), server with 2 torch threads; the machine's 1-minute load average was "
             f"{min(load):.1f}-{max(load):.1f} during these runs (2 cores; this benchmark's own server and Chromium "
             "included).", "",
             "| model work | health checks | median (ms) | p95 (ms) | max (ms) | over 1 s | Generate times (s) |",
             "|---|---|---|---|---|---|---|"]
    body += [f"| {' | '.join(r)} |" for r in latency_rows]
    body += ["", LATENCY_NOTE]
    print("\n".join(body))
    write_section("Upload memory and server latency", "python benchmarks/upload_memory.py", "\n".join(body))


if __name__ == "__main__":
    main()
