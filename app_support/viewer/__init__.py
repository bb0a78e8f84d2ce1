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

State, and new data without a remount (how a page updates the brain it shows)
---------------------------------------------------------------------------
* ``key`` is the viewer's identity. Streamlit keeps a keyed component's iframe across reruns (its
  identity is the key, not its arguments), so calling ``viewer(...)`` again with the same ``key`` and
  NEW ``Layer.data`` (a new sample, another frame, a live-aged brain) sends a render message to the
  same, already drawn canvases: the frontend swaps only the panels whose files changed (content hash)
  and keeps everything the user set. Equal files are not even re-sent to the browser's NiiVue.
* What the user set is the viewer's state: view mode, radiological / neurological, crosshair (mm),
  window/level (once the user moved it), 2D zoom/pan, 3D angle and zoom, clip plane, overlay
  visibility and opacity. The frontend keeps it per ``key`` in memory and in the tab's
  ``sessionStorage`` (so a viewer remounted after another page, or a reload, comes back as it was),
  mirrors it in the iframe's ``body[data-state]`` (JSON, for tests), and sends it back with a click
  report (``report=True``: ``{..., "state": {...}}``); it never reruns the script on its own.
* The canvases are rebuilt (state still kept) only when the layout changes: the number of panels, a
  panel's title, flex, view or kind (slices / 3D only), ``height`` or ``sync``. So keep titles
  constant while the data change (say what changes in a caption, not the title).
* Streamlit remounts an element whose position in its block changes: keep the elements before a
  viewer the same on every run (a progress bar drawn only while a job runs shifts it; draw it in a
  placeholder that is always there, e.g. ``st.empty()`` made on every run).
* Session preferences: ``radiological=None`` (the default) takes the session's choice, the sidebar
  toggle made by :func:`preferences` (``st.session_state[RADIOLOGICAL]``); a change of it applies to
  every viewer, the viewer's own checkbox overrides it for that viewer.
* The toolbar also has: a PNG screenshot of what is shown (``screenshot`` names the file; say the
  kind in it), a 3D clip plane (axial / coronal / sagittal, depth), and for overlays (layers after
  the first): a show/hide box per overlay label and an opacity slider, and NiiVue colour bars with the
  overlay's ``colorbar`` text (what, in which units) beneath.
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
RADIOLOGICAL = "viewer_radiological"  # session state: radiological convention by default in every viewer


def niivue_js_folder() -> Path:
    """The folder of the NiiVue build that nilearn ships (found without importing nilearn, ~1 s)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed; the viewer needs its NiiVue build (nilearn >= 0.11)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "_assets" / "js"
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
    visible: bool = True             # an overlay shown at first (the toolbar's box toggles it)


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
                report: bool = False, frames: Sequence[str] = (), frame_name: str = "Frame",
                frame_seconds: float = 0.5, key: str = "", screenshot: str = "synthbrain_view.png",
                ) -> tuple[dict, dict[str, bytes]]:
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
            blob, digest = ref(layer.data)
            layers.append({"data": blob, "id": digest, "name": layer.name, "label": layer.label,
                           "colormap": layer.colormap, "opacity": float(layer.opacity),
                           "cal_min": layer.cal_min, "cal_max": layer.cal_max,
                           "colormap_negative": layer.colormap_negative, "colorbar": layer.colorbar,
                           "visible": bool(layer.visible)})
        surfaces = []
        for s in p.surfaces:
            blob, digest = ref(s.data)
            surfaces.append({"data": blob, "id": digest, "name": s.name, "rgba": list(s.rgba),
                             "opacity": float(s.opacity)})
        out.append({"title": p.title, "view": p.view, "flex": float(p.flex), "show_render": bool(p.show_render),
                    "layers": layers, "surfaces": surfaces})
    spec = {"lib": _niivue_lib.name, "key": key, "height": int(height), "sync": bool(sync),
            "radiological": bool(radiological), "report": bool(report), "screenshot": screenshot, "panels": out}
    if frames:
        spec["frames"] = {"name": frame_name, "labels": [str(x) for x in frames], "seconds": float(frame_seconds)}
    return spec, blobs


def viewer(panels: Sequence[Panel], *, key: str, sync: bool = True, height: int = 420,
           radiological: bool | None = None, report: bool = False, frames: Sequence[str] = (),
           frame_name: str = "Frame", frame_seconds: float = 0.5,
           screenshot: str = "synthbrain_view.png") -> dict[str, Any] | None:
    """Draw ``panels`` side by side; with ``sync`` their crosshairs, slices and 3D angles move together.

    The same ``key`` on every run keeps the canvases and the user's view state while the data change
    (see the module docstring). ``radiological=None`` follows the session's choice (:func:`preferences`).
    ``screenshot`` is the file name of the toolbar's PNG (put the kind in it: synthetic / derived / real).

    With ``report`` a click sends ``{panel, mm, voxel, value, state}`` back (and reruns the script);
    without it (the default) the viewer never triggers a rerun.

    ``frames``: one label per frame of the 4D layers (``synthbrain.viz.display.display_series_bytes``);
    the viewer gets a ``frame_name`` slider and a play button (``frame_seconds`` a frame) that step
    every 4D layer in the browser, live while dragged, without a rerun or a reload.
    """
    if radiological is None:
        import streamlit as st

        radiological = bool(st.session_state.get(RADIOLOGICAL, False))
    spec, blobs = viewer_spec(panels, sync=sync, height=height, radiological=radiological, report=report,
                              frames=frames, frame_name=frame_name, frame_seconds=frame_seconds, key=key,
                              screenshot=screenshot)
    json.dumps(spec)  # fail here, not in the browser, on a value JSON cannot carry
    return _viewer(spec=spec, key=key, default=None, **blobs)


def preferences() -> None:
    """The viewers' session preferences, in the sidebar of every page (``app.py`` calls this before the
    page runs): radiological convention as the default of every viewer in this session."""
    import streamlit as st

    st.sidebar.toggle("Radiological convention", key=RADIOLOGICAL,
                      help="Every viewer in this session shows the subject's left on the right of the screen "
                           "(as in a radiology reading room). Each viewer's own 'Radiological' box still flips it.")
