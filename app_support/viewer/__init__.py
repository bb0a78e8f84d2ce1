"""The app's volume viewer: NiiVue canvases side by side in one Streamlit component, crosshair locked.

Why not only ``niivue-streamlit``: its component shows one image per viewer (overlays on top), so two
scans cannot share a crosshair; it also sends images as base64 text. This component draws any number
of NiiVue panels in one frame and links them with NiiVue's own ``broadcastTo`` (crosshair, slice,
zoom and 3D angle), sends NIfTI / MZ3 files as binary component arguments, and gives every panel a
mm / voxel / intensity readout, window/level (toolbar sliders and right-drag, linked across panels),
orientation labels and a neurological / radiological switch.

NiiVue is not copied into this repository: the frontend loads the ``niivue.umd.js`` that the
installed nilearn package ships (``nilearn/_assets/js``), which Streamlit serves as a second,
never-rendered component folder. Everything works offline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit.components.v1 as components

FRONTEND = Path(__file__).parent / "frontend"
VIEWS = ("multiplanar", "axial", "coronal", "sagittal", "render")


def niivue_js_folder() -> Path:
    """The folder of the NiiVue build that nilearn ships."""
    import nilearn

    folder = Path(nilearn.__file__).parent / "_assets" / "js"
    if not (folder / "niivue.umd.js").is_file():
        raise RuntimeError(f"niivue.umd.js not found in {folder}; the viewer needs nilearn >= 0.11 with its JS assets")
    return folder


_viewer = components.declare_component("synthbrain_viewer", path=str(FRONTEND))
_niivue_lib = components.declare_component("niivue_js", path=str(niivue_js_folder()))


@dataclass(frozen=True)
class Layer:
    """A volume drawn in a panel: ``data`` is a gzip NIfTI file (``synthbrain.viz.display``).
    The first layer of a panel is its base image; later layers are overlays. ``colormap_negative``
    colours values below ``-cal_min`` (a diverging pair, e.g. warm / winter), so a signed
    difference map shows both signs and hides |values| < ``cal_min``. An overlay with a ``colorbar``
    text gets NiiVue's colour bar (its values) under the slices and that text (what, in which units)
    beneath the panel."""

    data: bytes
    name: str = "volume.nii.gz"
    label: str = ""                  # name in the readout
    colormap: str = "gray"
    opacity: float = 1.0
    cal_min: float | None = None
    cal_max: float | None = None
    colormap_negative: str = ""
    colorbar: str = ""               # an overlay's colour bar, drawn when set; says what it shows, with units


@dataclass(frozen=True)
class Surface:
    """A mesh drawn in a panel: ``data`` is an MZ3 file (``synthbrain.viz.surfaces.to_mz3``)."""

    data: bytes
    name: str = "surface.mz3"
    rgba: tuple[int, int, int, int] = (226, 198, 180, 255)
    opacity: float = 1.0


@dataclass(frozen=True)
class Panel:
    """One NiiVue canvas. ``view`` is one of VIEWS; a panel with surfaces only is a 3D view."""

    title: str = ""
    layers: Sequence[Layer] = field(default_factory=tuple)
    surfaces: Sequence[Surface] = field(default_factory=tuple)
    view: str = "multiplanar"
    flex: float = 1.0
    show_render: bool = False        # multiplanar view: a fourth tile with a 3D rendering

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if not self.layers and not self.surfaces:
            raise ValueError("a panel needs at least one layer or surface")


def viewer_spec(panels: Sequence[Panel], *, sync: bool = True, height: int = 420, radiological: bool = False,
                report: bool = False) -> tuple[dict, dict[str, bytes]]:
    """The component's JSON spec and its binary arguments (each distinct file sent once)."""
    blobs: dict[str, bytes] = {}
    ids: dict[str, str] = {}

    def ref(data: bytes) -> tuple[str, str]:
        digest = hashlib.sha1(data).hexdigest()[:16]
        if digest not in ids:
            ids[digest] = f"b{len(ids)}"
            blobs[ids[digest]] = data
        return ids[digest], digest

    out = []
    for p in panels:
        layers = []
        for layer in p.layers:
            key, digest = ref(layer.data)
            layers.append({"data": key, "id": digest, "name": layer.name, "label": layer.label,
                           "colormap": layer.colormap, "opacity": float(layer.opacity),
                           "cal_min": layer.cal_min, "cal_max": layer.cal_max,
                           "colormap_negative": layer.colormap_negative, "colorbar": layer.colorbar})
        surfaces = []
        for s in p.surfaces:
            key, digest = ref(s.data)
            surfaces.append({"data": key, "id": digest, "name": s.name, "rgba": list(s.rgba),
                             "opacity": float(s.opacity)})
        out.append({"title": p.title, "view": p.view, "flex": float(p.flex), "show_render": bool(p.show_render),
                    "layers": layers, "surfaces": surfaces})
    spec = {"lib": _niivue_lib.name, "height": int(height), "sync": bool(sync), "radiological": bool(radiological),
            "report": bool(report), "panels": out}
    return spec, blobs


def viewer(panels: Sequence[Panel], *, key: str, sync: bool = True, height: int = 420, radiological: bool = False,
           report: bool = False) -> dict[str, Any] | None:
    """Draw ``panels`` side by side; with ``sync`` their crosshairs, slices and 3D angles move together.

    With ``report`` a click sends ``{panel, mm, voxel, value}`` back (and reruns the script);
    without it (the default) the viewer never triggers a rerun.
    """
    spec, blobs = viewer_spec(panels, sync=sync, height=height, radiological=radiological, report=report)
    json.dumps(spec)  # fail here, not in the browser, on a value JSON cannot carry
    return _viewer(spec=spec, key=key, default=None, **blobs)
