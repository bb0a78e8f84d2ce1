"""The app's "Prepare it" step, timed in a real browser against a real server.

    OMP_NUM_THREADS=1 python benchmarks/prepare_app.py [--repeats 3] [--spacing 2]

Each repeat is a fresh browser session: open Compare, upload nilearn's MNI152 T1 turned 10 degrees and
moved 15 mm on a scanner grid of ``--spacing`` mm (synthbrain.data.native), press **Prepare it**, and
time the click until the before / after picture and the registration quality are on the page. The
first repeat includes loading deepbet's networks in the server; the QC table's own "Time" (the
pipeline in the job queue) is reported beside it. The machine's load average is recorded, because
the two cores are often shared. Uses the server and browser helpers of tests/e2e; writes its
section of benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT))

from e2e_helpers import CHROMIUM, CHROMIUM_ARGS, Server, open_app_page, wait_for_script  # noqa: E402

try:  # the helpers' script-run counter (its pages are the only ones wait_for_script accepts)
    from e2e_helpers import app_context  # noqa: E402
except ImportError:
    def app_context(browser, **options):
        return browser.new_context(**{"viewport": {"width": 1500, "height": 1100}, **options})


def native_scan(folder: Path, spacing: float) -> Path:
    import nibabel as nib
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.data import native
    from synthbrain.data.template import load_template
    from synthbrain.io import read_volume

    mni = read_volume(MNI152_FILE_PATH)
    motion = native.motion((10, 0, 0), (0, 15, 0), load_template("demo").centroid_mm)
    moved = native.native_copy(mni, mni.data, motion, spacing=spacing)
    path = folder / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(moved.data, moved.affine), path)
    return path


def one(browser, server: Server, scan: Path) -> tuple[float, float, float]:
    """(click -> shown in s, the pipeline's own time in s, correlation with the template)."""
    context = app_context(browser)
    page = context.new_page()
    page.set_default_timeout(300_000)
    try:
        open_app_page(page, server.url, "/compare")
        page.get_by_text("Upload a NIfTI").click()
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(scan))
        button = page.get_by_role("button", name="Prepare it")
        button.wait_for()
        wait_for_script(page)
        start = time.perf_counter()
        button.click()
        page.get_by_text("Registration quality").wait_for()
        page.locator('[data-testid="stImage"] img').first.wait_for()
        shown = time.perf_counter() - start
        text = page.locator('[data-testid="stTable"]').filter(has_text="Correlation with").inner_text()
        pipeline = float(re.search(r"Time\s+([\d.]+)\s+s", text).group(1))
        r = float(re.search(r"Correlation with the MNI152 template\s+([\d.]+)", text).group(1))
        return shown, pipeline, r
    finally:
        context.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=2.0)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        scan = native_scan(Path(tmp), args.spacing)
        server = Server()
        rows, loads = [], []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                for i in range(args.repeats):
                    loads.append(os.getloadavg()[0])
                    rows.append(one(browser, server, scan))
                    print(f"repeat {i + 1}: shown after {rows[-1][0]:.1f} s (pipeline {rows[-1][1]:.1f} s), "
                          f"r = {rows[-1][2]:.3f}, load {loads[-1]:.1f}", flush=True)
                browser.close()
        finally:
            server.stop()
    warm = rows[1:] or rows
    body = (f"nilearn's MNI152 T1 turned 10 degrees and moved 15 mm on a {args.spacing:g} mm scanner grid, uploaded "
            "on Compare in a fresh browser session each time; **Prepare it** pressed; timed until the before / "
            "after picture and the registration quality are shown (server: OMP_NUM_THREADS=1, one job worker).\n\n"
            "| repeat | click -> shown (s) | pipeline in the job queue (s) | correlation with the template | "
            "load average (1 min) |\n|---|---|---|---|---|\n"
            + "".join(f"| {i + 1}{' (deepbet loads)' if i == 0 else ''} | {s:.1f} | {t:.1f} | {r:.3f} | {la:.1f} |\n"
                      for i, ((s, t, r), la) in enumerate(zip(rows, loads, strict=True)))
            + f"\nMedian after the first: {statistics.median(s for s, _, _ in warm):.1f} s shown, "
              f"{statistics.median(t for _, t, _ in warm):.1f} s pipeline. The machine's 2 cores were shared "
              "with other work when the load average is above 2.")
    from benchmarks._results import write_section

    write_section(f"Prepare it in the app ({args.spacing:g} mm upload)",
                  f"OMP_NUM_THREADS=1 python benchmarks/prepare_app.py --repeats {args.repeats} "
                  f"--spacing {args.spacing:g}", body)
    print(body)


if __name__ == "__main__":
    main()
