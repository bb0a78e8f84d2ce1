"""App latency and server memory, measured in a real browser (not a test).

    OMP_NUM_THREADS=1 python benchmarks/app_latency.py [--repeats 5] [--sessions 5] [--threads N]

1. Generate latency: from the click on Generate to the viewer having drawn the new sample (its
   frame reports the new files loaded and two animation frames have passed), with the bundle's
   default steps and guidance. The first click (model warm-up: generator built, NiiVue loaded) is
   reported on its own; the goal (issue 5) is <= 3 s on 2 CPU cores.
2. Server memory: resident set size of the streamlit process (and any children) when idle, with
   the bundle loaded, and with ``--sessions`` browser sessions open that have each generated a
   sample and reconstructed the MNI152 template. Goal: <= 2.5 GB.

Uses the same server and browser helpers as tests/e2e. Prints a table and writes its section of benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from e2e_helpers import CHROMIUM, CHROMIUM_ARGS, VIEWER_FRAME, Server, open_app_page, wait_for_script  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory (MB) of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def viewer_frame(page):
    return page.locator(VIEWER_FRAME).first.element_handle().content_frame()


def open_generate(page, url: str) -> None:
    open_app_page(page, url)


def click_generate(page, number: int, marks: dict | None = None) -> float:
    """Seconds from the click to the viewer showing sample ``number``, drawn; ``marks`` gets the
    seconds until the page showed the result's text (the server's share)."""
    old = None
    if number > 1:
        old = viewer_frame(page).evaluate("() => document.body.dataset.revision")
    t0 = time.perf_counter()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text(f"Sample {number}", exact=True).wait_for(timeout=180_000)
    if marks is not None:
        marks["text"] = time.perf_counter() - t0
    frame = viewer_frame(page)
    frame.wait_for_function("old => document.body.dataset.ready === '1' && document.body.dataset.revision !== old",
                            arg=old, timeout=180_000)
    frame.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return time.perf_counter() - t0


def reconstruct_template(page, url: str) -> None:
    open_app_page(page, url, "/compare")
    page.get_by_role("button", name="Reconstruct").click()
    page.get_by_text("Reconstruction quality").wait_for(timeout=180_000)
    wait_for_script(page)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed Generate clicks after the warm-up")
    ap.add_argument("--sessions", type=int, default=5, help="browser sessions open for the memory figure")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch threads of the server (OMP_NUM_THREADS)")
    args = ap.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing")
    from playwright.sync_api import sync_playwright

    server = Server(env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    rows = []
    try:
        time.sleep(2)
        rows.append(("server RSS, idle (MB)", f"{rss_mb(server.pid):.0f}"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
            page = ctx.new_page()
            page.set_default_timeout(180_000)
            open_generate(page, server.url)
            cold = click_generate(page, 1)
            wait_for_script(page)
            rows.append(("server RSS, bundle loaded, 1 sample (MB)", f"{rss_mb(server.pid):.0f}"))
            times, server_share = [], []
            for k in range(args.repeats):
                marks: dict = {}
                times.append(click_generate(page, k + 2, marks))
                server_share.append(marks["text"])
                wait_for_script(page)
            rows.append(("Generate click -> viewer drawn, first click (s)", f"{cold:.2f}"))
            rows.append((f"Generate click -> viewer drawn, median of {args.repeats} (s)",
                         f"{statistics.median(times):.2f}"))
            rows.append(("  each (s)", " ".join(f"{t:.2f}" for t in times)))
            rows.append(("  of which click -> result text on the page (s)", " ".join(f"{t:.2f}" for t in server_share)))
            sampling = page.get_by_text("steps · guidance").first.inner_text()
            rows.append(("  last sample's line (sampling time at the end)", sampling.strip()))
            pages = [page]
            for _ in range(args.sessions - 1):
                c = browser.new_context(viewport={"width": 1500, "height": 1100})
                pg = c.new_page()
                pg.set_default_timeout(180_000)
                open_generate(pg, server.url)
                click_generate(pg, 1)
                wait_for_script(pg)
                pages.append(pg)
            for pg in pages:
                reconstruct_template(pg, server.url)
            peak = rss_mb(server.pid)
            rows.append((f"server RSS, {args.sessions} sessions open, each with a sample and a reconstruction (MB)",
                         f"{peak:.0f}"))
            browser.close()
    finally:
        server.stop()
    width = max(len(r[0]) for r in rows)
    print(f"SynthBrain app benchmark: {os.cpu_count()} CPUs, server torch threads {args.threads}, "
          f"demo bundle, default steps")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_section

    body = (f"Real `streamlit run` server ({args.threads} torch threads) and Debian's Chromium, demo bundle, "
            "default steps and guidance. Goals (issue 5): Generate click -> viewer drawn <= 3 s; server memory "
            "<= 2.5 GB with the bundle loaded and 5 sessions.\n\n| figure | value |\n|---|---|\n"
            + "\n".join(f"| {name} | {value} |" for name, value in rows) + "\n")
    write_section("App latency and memory (browser)",
                  f"OMP_NUM_THREADS={args.threads} python benchmarks/app_latency.py --repeats {args.repeats} "
                  f"--sessions {args.sessions} --threads {args.threads}", body)


if __name__ == "__main__":
    main()
