"""The viewer component's Python side: what goes to the browser, and the frontend files it needs."""

from __future__ import annotations

import pytest

from app_support.viewer import FRONTEND, Layer, Panel, Surface, niivue_js_folder, viewer_spec


def test_equal_files_are_sent_once_and_named_by_content():
    a, b = b"\x1f\x8b first volume", b"\x1f\x8b second volume"
    spec, blobs = viewer_spec([Panel("one", layers=(Layer(a), Layer(b, colormap="warm", opacity=0.3))),
                               Panel("two", layers=(Layer(a),), surfaces=(Surface(b"mz3"),))], height=300)
    assert sorted(blobs.values()) == sorted([a, b, b"mz3"])
    one, two = spec["panels"]
    assert one["layers"][0]["data"] == two["layers"][0]["data"]          # the same bytes, one argument
    assert one["layers"][0]["id"] == two["layers"][0]["id"] != one["layers"][1]["id"]
    assert blobs[one["layers"][1]["data"]] == b
    assert one["layers"][1] | {"data": None, "id": None} == {
        "data": None, "id": None, "name": "volume.nii.gz", "label": "", "colormap": "warm", "opacity": 0.3,
        "cal_min": None, "cal_max": None, "colormap_negative": "", "colorbar": "", "visible": True}
    assert spec["height"] == 300 and spec["sync"] is True
    assert spec["lib"].endswith("niivue_js")


@pytest.mark.parametrize("kwargs, message", [({"view": "oblique", "layers": (Layer(b"x"),)}, "view must be"),
                                             ({}, "at least one layer")])
def test_bad_panels_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Panel("p", **kwargs)


def test_frontend_and_niivue_are_installed():
    assert (FRONTEND / "index.html").is_file() and (FRONTEND / "viewer.js").is_file()
    js = (niivue_js_folder() / "niivue.umd.js").read_text(errors="replace")
    # the names viewer.js uses from NiiVue's public API
    for name in ("Niivue", "NVImage", "NVMesh", "broadcastTo", "setRadiologicalConvention", "SHOW_RENDER"):
        assert name in js, name


def test_the_sessions_radiological_default_reaches_every_viewer_by_key():
    """The sidebar toggle (app.py calls preferences()) is the default of every viewer that does not set
    its own; each viewer's spec names its key (the frontend keeps the user's state under it)."""
    from streamlit.testing.v1 import AppTest

    from .app_helpers import viewer_calls

    def page():
        from app_support.viewer import Layer, Panel, preferences, viewer

        preferences()
        viewer([Panel("a", layers=(Layer(b"x"),))], key="one")
        viewer([Panel("b", layers=(Layer(b"y"),))], key="two", radiological=False)

    at = AppTest.from_function(page).run()
    assert [(c.spec["key"], c.spec["radiological"]) for c in viewer_calls(at)] == [("one", False), ("two", False)]
    at.sidebar.toggle[0].set_value(True).run()
    assert [(c.spec["key"], c.spec["radiological"]) for c in viewer_calls(at)] == [("one", True), ("two", False)]
