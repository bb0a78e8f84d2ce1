"""What the viewer gets for a 1 mm (160 x 224 x 160) volume, and how long the browser takes to draw it.

    OMP_NUM_THREADS=1 python benchmarks/viewer_1mm.py [--repeats 3]

An imported model-zoo bundle of the UK Biobank LDM's architecture on the full grid (few channels,
random weights: sampling is fast, the volumes are 1 mm ones; random weights give noise-like volumes,
the worst case for gzip) is opened in a real ``streamlit run`` server driven by Chromium, as the
e2e tests do. Measured:

1. payload per volume layer as the viewer sends it (``synthbrain.viz.display``: gzip NIfTI, int16 +
   scl_slope) and the time to encode it, for the MNI152 template on the 1 mm grid (a brain-like
   image) and for a sample of this bundle (noise-like);
2. Generate at 1 mm: click -> result text on the page (the server's share: sampling, measuring,
   encoding), then -> the viewer reports the new files loaded and two animation frames passed (the
   browser's share: transfer, gunzip, NiiVue's textures, a draw), and the bytes the page's websocket
   received from the click to the drawn viewer;
3. Compare at 1 mm: the template reconstructed, the same split (three 1 mm layers: original,
   reconstruction, difference).

Prints the figures (no results.md section: a one-off measurement for issue 13).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))

from e2e_helpers import CHROMIUM, CHROMIUM_ARGS, VIEWER_FRAME, Server, app_context, open_app_page  # noqa: E402


def make_bundle(root: Path) -> Path:
    from test_monai_zoo import small_inference, write_zoo

    from synthbrain.importers.monai_zoo import import_monai_zoo
    from synthbrain.testing import UKB_LDM_INFERENCE

    inf = small_inference()
    inf["noise"] = UKB_LDM_INFERENCE["noise"]  # the published latent: a 160 x 224 x 160 volume
    inf["autoencoder_def"].update(channels=[4, 4, 4, 4], norm_num_groups=2)
    write_zoo(root / "zoo", inf, layout="monai")
    return import_monai_zoo(root / "zoo", root / "models" / "ukb-1mm")


def payloads(bundle: Path) -> list[tuple[str, str]]:
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.bundle import load_bundle
    from synthbrain.data.preprocess import preprocess
    from synthbrain.grids import FULL
    from synthbrain.io import read_volume
    from synthbrain.sampling import Generator
    from synthbrain.viz.display import display_bytes

    template = preprocess(read_volume(MNI152_FILE_PATH), FULL, {"whole_head": True})[0]
    sample = Generator(load_bundle(bundle), device="cpu").sample({}, steps=2)[0].volume
    rows = []
    for name, vol in (("MNI152 template, 1 mm", template), ("a sample of this bundle (noise-like), 1 mm", sample)):
        t0 = time.perf_counter()
        b = display_bytes(vol, "synthetic")
        seconds = time.perf_counter() - t0
        rows.append((f"viewer layer: {name} (MB, encode s)", f"{len(b) / 1e6:.2f} MB, {seconds:.2f} s"))
    rows.append(("  raw float32 volume (MB)", f"{template.data.nbytes / 1e6:.1f}"))
    return rows


class Received:
    """Bytes the page's websockets received (Streamlit's forward messages: component args included)."""

    def __init__(self, page) -> None:
        self.bytes = 0
        page.on("websocket", lambda ws: ws.on("framereceived", self.add))

    def add(self, payload) -> None:
        self.bytes += len(payload)


def drawn_after(page, old: str | None) -> None:
    frame = page.locator(VIEWER_FRAME).first.element_handle().content_frame()
    frame.wait_for_function("old => document.body.dataset.ready === '1' && document.body.dataset.revision !== old",
                            arg=old, timeout=600_000)
    frame.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def revision(page) -> str | None:
    if not page.locator(VIEWER_FRAME).count():
        return None
    return page.locator(VIEWER_FRAME).first.element_handle().content_frame().evaluate(
        "() => document.body.dataset.revision")


def timed(page, received: Received, click, text: str) -> tuple[float, float, float]:
    """(click -> text on the page, text -> viewer drawn, MB received) of one action."""
    old = revision(page)
    before = received.bytes
    t0 = time.perf_counter()
    click()
    page.get_by_text(text, exact=True).wait_for(timeout=600_000)
    t1 = time.perf_counter()
    drawn_after(page, old)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (received.bytes - before) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="Generate clicks timed")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp))
        rows = payloads(bundle)
        server = Server(env={"SYNTHBRAIN_BUNDLE": str(bundle)})
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = app_context(browser).new_page()
                page.set_default_timeout(600_000)
                received = Received(page)
                open_app_page(page, server.url)
                gen = []
                for k in range(args.repeats + 1):  # the first: model warm-up, NiiVue loaded
                    gen.append(timed(page, received, lambda: page.get_by_role("button", name="Generate",
                                                                                exact=True).click(),
                                     f"Sample {k + 1}"))
                    page.wait_for_timeout(500)
                later = gen[1:]
                rows.append(("Generate 1 mm, first click: server share / browser share (s), MB received",
                             f"{gen[0][0]:.1f} / {gen[0][1]:.2f}, {gen[0][2]:.1f}"))
                rows.append((f"Generate 1 mm, median of {len(later)}: click -> viewer drawn (s)",
                             f"{statistics.median(t[0] + t[1] for t in later):.1f}"))
                rows.append((f"Generate 1 mm, median of {len(later)}: click -> result text (s, server)",
                             f"{statistics.median(t[0] for t in later):.1f}"))
                rows.append((f"Generate 1 mm, median of {len(later)}: result text -> viewer drawn (s, browser)",
                             f"{statistics.median(t[1] for t in later):.2f}"))
                rows.append(("Generate 1 mm: MB received per sample", " ".join(f"{t[2]:.1f}" for t in later)))
                open_app_page(page, server.url, "/compare")
                cmp = timed(page, received, lambda: page.get_by_role("button", name="Reconstruct").click(),
                            "Reconstruction quality")
                rows.append(("Compare 1 mm (template; 3 layers): server share / browser share (s), MB received",
                             f"{cmp[0]:.1f} / {cmp[1]:.2f}, {cmp[2]:.1f}"))
                browser.close()
        finally:
            server.stop()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
