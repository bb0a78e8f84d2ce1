"""AppTest helpers: open a page through app.py (as a browser would) and read what the viewer got.

The viewer is a custom component, which AppTest shows as an ``UnknownElement``: its proto holds
the JSON spec and the binary files (gzip NIfTI, MZ3) exactly as the browser would receive them.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # s per script run: a first run loads the bundle and builds the template


def open_page(name: str):
    """AppTest of app.py switched to ``app_pages/<name>.py``, run once."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.switch_page(f"app_pages/{name}.py")
    return at.run()


@dataclass
class ViewerCall:
    spec: dict
    blobs: dict[str, bytes]

    @property
    def panels(self) -> list[dict]:
        return self.spec["panels"]

    def volume(self, panel: int, layer: int = 0) -> nib.Nifti1Image:
        """The NIfTI image a layer sends to the browser, read back with nibabel."""
        raw = gzip.decompress(self.blobs[self.panels[panel]["layers"][layer]["data"]])
        return nib.Nifti1Image.from_bytes(raw)

    def surface(self, panel: int, index: int) -> bytes:
        return self.blobs[self.panels[panel]["surfaces"][index]["data"]]


def viewer_calls(at) -> list[ViewerCall]:
    """Every synthbrain viewer on the page, in page order."""
    out = []
    for el in at.get("component_instance"):
        p = el.proto
        if p.component_name.endswith("synthbrain_viewer"):
            out.append(ViewerCall(json.loads(p.json_args)["spec"], {a.key: a.bytes for a in p.special_args}))
    return out


def texts(at) -> str:
    """All markdown, captions, headers and alerts of a run, joined (for 'is this said on the page')."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in at.get(kind)]
    return "\n".join(parts)


def nifti_array(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.get_fdata(), dtype=np.float32)


def frame(df) -> dict[str, list]:
    return {c: list(df[c]) for c in df.columns}


