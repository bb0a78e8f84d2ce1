"""The Trajectories page under AppTest (widgets from the schema, a tiny series from one seed and from
a scan, the series the viewer steps through, the chart, the downloads) and the viz parts it is built
from (the GIF and strip makers, the chart figure). The series plan is tested in tests/test_series.py."""

from __future__ import annotations

import base64
import gzip
import io
import json
import zipfile

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from synthbrain.data.template import load_template
from synthbrain.io import Volume, to_nifti_bytes
from synthbrain.series import MEASURED, MODES

from .app_helpers import frame, nifti_array, open_page, texts, viewer_calls


@pytest.fixture(scope="module")
def generator(bundle):
    from synthbrain.sampling import Generator

    return Generator(bundle, device="cpu")


def plotly_values(a) -> list:
    """A plotly JSON array as a list: a list, or (plotly >= 6) {"dtype", "bdata": base64}."""
    if isinstance(a, dict):
        return np.frombuffer(base64.b64decode(a["bdata"]), dtype=a["dtype"]).tolist()
    return list(a)


def chart(at) -> dict[str, dict]:
    (el,) = at.get("plotly_chart")
    fig = json.loads(el.proto.spec)
    return {t["name"]: {"x": plotly_values(t["x"]), "y": plotly_values(t["y"])} for t in fig["data"]}


def run_series(at, *, k=3, steps=2, low=50.0, high=70.0, seed=4):
    at.sidebar.slider(key="traj_range").set_value((low, high))
    at.sidebar.slider(key="traj_k").set_value(k)
    at.sidebar.slider(key="traj_steps").set_value(steps)
    at.sidebar.number_input(key="traj_seed").set_value(seed)
    return at.sidebar.button(key="traj_go").click().run()


# ------------------------------------------------------------------------------------------ page


def test_widgets_follow_the_schema(bundle):
    at = open_page("trajectories")
    assert not at.exception
    age = bundle.schema["age"]
    rng = at.sidebar.slider(key="traj_range")
    assert (rng.min, rng.max) == (age.low, age.high) and age.low <= rng.value[0] < rng.value[1] <= age.high
    for c in bundle.schema:
        if c.name == "age":
            continue
        if c.kind == "continuous":  # the volumes: typical for age and sex by default, or fixed, or swept
            mode = at.sidebar.selectbox(key=f"traj_mode_{c.name}")
            assert list(mode.options) == [MODES[m] for m in ("typical", "fixed", "sweep")]
            assert mode.value == "typical"
        else:  # sex: fixed along one brain's series
            radio = next(r for r in at.sidebar.radio if r.label == c.label)
            assert list(radio.options) == list(c.categories)
    assert at.sidebar.slider(key="traj_steps").value == bundle.prior.config.default_steps
    assert not at.sidebar.button(key="traj_go").disabled
    # nothing is sampled before the button
    assert "traj_result" not in at.session_state and not viewer_calls(at) and not at.get("plotly_chart")
    assert "phantom" in texts(at) and "not a scan of any person" in texts(at)


def test_a_series_from_one_seed(bundle, generator, media):
    at = run_series(open_page("trajectories"), k=3, steps=2, low=50.0, high=70.0, seed=4)
    assert not at.exception and not at.error
    traj = at.session_state["traj_result"]
    assert len(traj.frames) == 3 and traj.axis_values == [50.0, 60.0, 70.0]
    assert {f.sample.seed for f in traj.frames} == {4} and {f.sample.steps for f in traj.frames} == {2}
    # every frame is the same brain (seed) under its own conditions: as the library samples it
    typical = [bundle.population.typical(bundle.schema, {"age": a, "sex": "F"}) for a in (50.0, 60.0, 70.0)]
    for f, want in zip(traj.frames, typical):
        assert f.sample.conditions == bundle.schema.complete(want)
    for i in (0, 2):
        direct = generator.sample(typical[i], n=1, seed=4, steps=2)[0]
        np.testing.assert_allclose(traj.frames[i].volume.data, direct.volume.data, atol=1e-5)

    # live ageing: the viewer holds the whole series (frame t of its 4D volume = frame t) and labels
    # every frame, so its own slider steps through them in the browser
    (call,) = viewer_calls(at)
    assert len(call.panels) == 1
    shown = nifti_array(call.volume(0))
    assert shown.shape == (*bundle.grid.shape, 3)
    for t in range(3):
        np.testing.assert_allclose(shown[..., t], traj.frames[t].volume.data, atol=1e-4)
    frames = call.spec["frames"]
    assert frames["name"] == "Age" and len(frames["labels"]) == 3
    assert frames["labels"][2].startswith("Frame 3 of 3. Requested: age 70 years")

    # the chart: measured (gaps where a frame could not be measured) against the requested values
    lines = chart(at)
    for name, label in MEASURED:
        measured, requested = lines[f"{label}: measured"], lines[f"{label}: requested"]
        assert measured["x"] == requested["x"] == [50.0, 60.0, 70.0]
        assert requested["y"] == pytest.approx([t[name] for t in typical])
        want = [f.measured[name] if f.measured else None for f in traj.frames]
        assert measured["y"] == [pytest.approx(v) if v is not None else None for v in want]
    table = frame(at.dataframe[0].value)
    assert table["Ventricular volume, measured (mL)"] == [
        f"{f.measured['ventricular_volume']:.1f}" if f.measured else "n/a" for f in traj.frames]

    # the GIF preview and its download: one frame per age
    (gif_image,) = at.get("image")
    gif = media(gif_image.value[0])
    assert gif[:6] in (b"GIF87a", b"GIF89a") and iio.imread(gif, index=None).shape[0] == 3
    (gif_button,) = [b for b in at.get("download_button") if b.proto.label.startswith("GIF")]
    assert media(gif_button.proto.url) == gif
    assert any(b.proto.label.startswith("NIfTI series") for b in at.get("download_button"))


def test_the_series_zip_holds_every_frame_with_its_sidecar(bundle):
    at = run_series(open_page("trajectories"), k=3, steps=2)
    traj = at.session_state["traj_result"]
    with zipfile.ZipFile(io.BytesIO(traj.zip())) as z:
        names = z.namelist()
        niftis = sorted(n for n in names if n.endswith(".nii.gz"))
        sidecars = sorted(n for n in names if n.endswith(".json") and "/anat/" in n)
        assert len(niftis) == len(sidecars) == 3
        assert "dataset_description.json" in names and f"{traj.subject}/{traj.subject}_sessions.tsv" in names
        for i, (nii, side) in enumerate(zip(niftis, sidecars)):
            assert f"ses-{i + 1:02d}" in nii and nii[:-7] == side[:-5]
            img = nib.Nifti1Image.from_bytes(gzip.decompress(z.read(nii)))
            assert img.shape == bundle.grid.shape
            np.testing.assert_allclose(np.asarray(img.dataobj), traj.frames[i].volume.data, atol=1e-6)
            meta = json.loads(z.read(side))
            assert meta["Synthetic"] is True and meta["Conditions"]["age"] == traj.axis_values[i]
            assert meta["Series"]["Frame"] == i + 1 and meta["Series"]["Frames"] == 3
            assert "brain_volume_mL" in meta["Measured"] or "error" in meta["Measured"]
        sessions = z.read(f"{traj.subject}/{traj.subject}_sessions.tsv").decode().splitlines()
    assert sessions[0].split("\t")[:2] == ["session_id", "age"] and len(sessions) == 4


def test_a_swept_volume_is_requested_frame_by_frame():
    at = open_page("trajectories")
    at.sidebar.selectbox(key="traj_mode_ventricular_volume").set_value("sweep").run()
    at.sidebar.slider(key="traj_from_ventricular_volume").set_value(20.0)
    at.sidebar.slider(key="traj_to_ventricular_volume").set_value(40.0)
    at = run_series(at, k=3, steps=2)
    assert not at.exception
    traj = at.session_state["traj_result"]
    assert [f.sample.conditions["ventricular_volume"] for f in traj.frames] == [20.0, 30.0, 40.0]
    assert chart(at)["Ventricular volume: requested"]["y"] == [20.0, 30.0, 40.0]


def test_an_edited_scan_keeps_its_source_beside_each_frame(bundle, generator):
    from synthbrain.data.preprocess import preprocess
    from synthbrain.io import read_volume

    at = open_page("trajectories")
    at.radio(key="traj_start").set_value("scan").run()
    assert list(at.radio(key="traj_source").options) == ["MNI152 template", "Phantom subject", "Upload a NIfTI"]
    at.sidebar.slider(key="traj_strength").set_value(0.4)
    at = run_series(at, k=2, steps=2, low=60.0, high=80.0, seed=1)
    assert not at.exception and not at.error
    traj = at.session_state["traj_result"]
    assert traj.is_edit and traj.strength == 0.4 and len(traj.frames) == 2
    # the frames are the library's edits of the preprocessed template
    from nilearn.datasets import MNI152_FILE_PATH

    source = preprocess(read_volume(MNI152_FILE_PATH), bundle.grid)[0]
    np.testing.assert_allclose(traj.source.data, source.data, atol=1e-6)
    cond = traj.frames[1].sample.conditions
    direct = generator.edit(source.data, cond, strength=0.4, seed=1, steps=2)
    np.testing.assert_allclose(traj.frames[1].volume.data, direct.volume.data, atol=1e-5)
    # source and frame side by side, crosshair locked
    (call,) = viewer_calls(at)
    assert call.spec["sync"] is True and len(call.panels) == 2
    np.testing.assert_allclose(nifti_array(call.volume(0)), source.data, atol=1e-4)
    np.testing.assert_allclose(nifti_array(call.volume(1))[..., 1], traj.frames[1].volume.data, atol=1e-4)
    assert "edits of **MNI152 template** at strength 0.4" in texts(at)
    assert traj.sidecar(0)["Series"]["Strength"] == 0.4


def test_an_upload_can_be_edited_and_a_bad_one_cannot(bundle):
    at = open_page("trajectories")
    at.radio(key="traj_start").set_value("scan").run()
    at.radio(key="traj_source").set_value("upload").run()
    assert at.sidebar.button(key="traj_go").disabled  # no scan yet
    at.get("file_uploader")[0].upload("broken.nii.gz", b"\x1f\x8b not a scan")
    at.run()
    assert not at.exception and at.error[0].value.startswith("broken.nii.gz:")
    assert at.sidebar.button(key="traj_go").disabled
    scan = to_nifti_bytes(Volume(load_template(bundle.grid).t1 * 700.0, bundle.grid.affine), description="test")
    at.get("file_uploader")[0].upload("mine.nii.gz", scan, "application/gzip")
    at.run()
    assert not at.error and not at.sidebar.button(key="traj_go").disabled
    at = run_series(at, k=2, steps=2)
    traj = at.session_state["traj_result"]
    assert traj.is_edit and traj.source_label == "mine.nii.gz" and len(traj.frames) == 2
    assert viewer_calls(at)
    # a new, bad upload: its error, and not the old series under it
    at.get("file_uploader")[0].upload("other.nii.gz", b"\x1f\x8b not a scan either")
    at.run()
    assert not at.exception and at.error[0].value.startswith("other.nii.gz:")
    assert "traj_result" not in at.session_state and not viewer_calls(at) and not at.get("plotly_chart")


# ----------------------------------------------------------------------------------- viz parts


def series(n=4) -> list[Volume]:
    from synthbrain.grids import DEMO

    t1 = load_template(DEMO).t1
    return [Volume(t1 * (1.0 - 0.15 * i), DEMO.affine) for i in range(n)]


@pytest.mark.parametrize("plane, size", [("axial", (448 + 22, 320)), ("coronal", (320 + 22, 320)),
                                         ("sagittal", (320 + 22, 448))])
def test_series_gif_has_one_frame_per_volume(plane, size):
    from synthbrain.viz.series import series_gif

    vols = series(4)
    gif = series_gif(vols, plane, labels=[f"age {a}" for a in (50, 60, 70, 80)], px_per_mm=2.0)
    frames = iio.imread(gif, index=None)
    assert frames.shape[:3] == (4, *size)  # (frames, H incl. the caption band, W): 2 px per mm
    # one window for the series: a darker volume gives a darker frame
    brightness = frames[:, 30:].mean(axis=(1, 2, 3))
    assert np.all(np.diff(brightness) < 0)
    # equal volumes still give distinct frames (a GIF writer may merge equal ones)
    assert iio.imread(series_gif([vols[0]] * 3, plane), index=None).shape[0] == 3


def test_series_frames_follow_the_point_and_orientation():
    from synthbrain.grids import DEMO
    from synthbrain.viz.series import plane_image

    data = np.zeros(DEMO.shape, np.float32)
    data[60:, :, 30] = 1.0                                     # the subject's right, on one axial plane
    v = Volume(data, DEMO.affine)
    z_mm = float(DEMO.affine[2, 3] + 2.0 * 30)
    img = plane_image(v, "axial", point_mm=(0.0, 0.0, z_mm), px_per_mm=1.0)
    assert img[:, -20:].mean() > 200 and img[:, :20].mean() < 5  # right on the right (neurological)
    assert plane_image(v, "axial", point_mm=(0.0, 0.0, z_mm + 10.0), px_per_mm=1.0).max() == 0


def test_strip_png_and_bad_arguments():
    from PIL import Image

    from synthbrain.viz.series import series_frames, strip_png

    vols = series(3)
    png = Image.open(io.BytesIO(strip_png(vols, "axial", labels=["a", "b", "c"], px_per_mm=1.0)))
    one = series_frames(vols[:1], "axial", px_per_mm=1.0)[0]
    assert png.size == (3 * one.shape[1] + 2 * 4, one.shape[0])
    with pytest.raises(ValueError, match="plane"):
        series_frames(vols, "oblique")
    with pytest.raises(ValueError, match="labels"):
        series_frames(vols, "axial", labels=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        series_frames([], "axial")


def test_trajectory_figure_has_measured_and_requested_lines():
    from synthbrain.viz.figures import VolumeSeries, trajectory_figure

    fig = trajectory_figure([50, 60, 70], [
        VolumeSeries("Brain volume", [1100.0, None, 1000.0], [1120.0, 1080.0, 1040.0]),
        VolumeSeries("Ventricular volume", [20.0, 25.0, 31.0])])
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"Brain volume: measured", "Brain volume: requested", "Ventricular volume: measured"}
    assert list(traces["Brain volume: measured"].y) == [1100.0, None, 1000.0]  # a gap, not a zero
    assert traces["Brain volume: requested"].line.dash == "dash"
    assert traces["Ventricular volume: measured"].yaxis == "y2"
    with pytest.raises(ValueError, match="2 values for 3"):
        trajectory_figure([50, 60, 70], [VolumeSeries("Brain volume", [1.0, 2.0])])
