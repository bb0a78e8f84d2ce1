"""An upload that is not prepared (not in MNI space, or with a skull) gets the message that says to run
``synthbrain prepare`` and a **Prepare it** button, on both pages that take uploads, and never a silent
result; pressed, it prepares the upload in the job queue, shows the before / after and the registration
quality, and the page goes on with the prepared (real, preprocessed) volume."""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import MNI152_FILE_PATH

from synthbrain.data import native
from synthbrain.data.template import load_template
from synthbrain.export import KINDS
from synthbrain.io import read_volume, to_nifti_bytes

from .app_helpers import frame, open_page, texts, viewer_calls

# page -> (the source radio's key, the go button's key, whether the button sits in the sidebar, what to pick first)
PAGES = {"compare": ("cmp_source", "cmp_go", False, None), "trajectories": ("traj_source", "traj_go", True, "scan")}
ROTATION, SHIFT = (12.0, 0.0, 0.0), (0.0, 16.0, 0.0)   # degrees (pitch), mm (forward)


@pytest.fixture(scope="module")
def native_upload(bundle) -> bytes:
    """nilearn's MNI152 T1 turned 12 degrees (pitch) and moved 16 mm forward on a 2 mm scanner grid of its own
    (98 x 116 x 94 voxels), as a scanner might place a head: a real NIfTI file's bytes."""
    mni = read_volume(MNI152_FILE_PATH)
    moved = native.native_copy(mni, mni.data, native.motion(ROTATION, SHIFT, load_template(bundle.grid).centroid_mm))
    return to_nifti_bytes(moved, description="test scan")


def upload(page: str, data: bytes):
    radio, go, in_sidebar, start = PAGES[page]
    at = open_page(page)
    if start:
        at.radio(key="traj_start").set_value(start).run()
    at.radio(key=radio).set_value("upload").run()
    at.get("file_uploader")[0].upload("native.nii.gz", data, "application/gzip")
    at.run()
    button = at.sidebar.button(key=go) if in_sidebar else at.button(key=go)
    return at, button


@pytest.mark.parametrize("page", list(PAGES))
def test_unprepared_upload_gets_the_prepare_message(page, native_upload):
    at, go = upload(page, native_upload)
    assert not at.exception
    (error,) = at.error
    assert re.match(r"native\.nii\.gz: not prepared: it is 1[1-3] degrees and 1[4-8] mm away", error.value)
    assert "synthbrain prepare" in error.value and "\n" not in error.value
    assert go.disabled
    assert not viewer_calls(at)
    prefix = PAGES[page][0].split("_")[0]
    assert at.button(key=f"{prefix}_prepare").label == "Prepare it"  # the step is offered, not run unasked
    assert f"{prefix}_prepared" not in at.session_state


def test_prepare_it_shows_before_after_and_goes_on_with_the_prepared_scan(bundle, native_upload, media):
    at, _ = upload("compare", native_upload)
    at.button(key="cmp_prepare").click().run()
    assert not at.exception and not at.error
    done = at.session_state["cmp_prepared"]
    # it landed on the template: brain-masked correlation and the brain's centre
    tmpl = load_template(bundle.grid)
    brain = tmpl.brain > 0.5
    r = np.corrcoef(done.volume.data[brain], tmpl.t1[brain])[0, 1]
    assert r >= 0.95, r
    mass = done.volume.data * brain
    centroid = bundle.grid.voxel_to_world(np.array([np.average(np.indices(mass.shape)[i], weights=mass)
                                                    for i in range(3)])[None])[0]
    true = bundle.grid.voxel_to_world(np.array([np.average(np.indices(brain.shape)[i], weights=tmpl.t1 * brain)
                                                for i in range(3)])[None])[0]
    assert np.linalg.norm(centroid - true) < 2.0
    # the registration quality the page shows is the pipeline's own, with units
    qc = frame(at.table[0].value)
    shown = dict(zip(qc["Figure"], zip(qc["Value"], qc["Unit"], strict=True), strict=True))
    assert float(shown["Correlation with the MNI152 template"][0]) == pytest.approx(done.result.qc["correlation"],
                                                                                    abs=1e-3)
    assert 11 <= float(shown["Rotation of the upload off MNI152"][0]) <= 13
    assert shown["Rotation of the upload off MNI152"][1] == "degrees"
    assert 14 <= float(shown["Shift of the upload off MNI152"][0]) <= 18
    assert shown["Brain volume"][1] == "mL" and shown["Time"][1] == "s"
    assert "has been prepared here" in texts(at)
    # the before / after picture: three planes of the upload, the prepared scan and the template
    (image,) = at.get("image")
    png = media(image.value[0])
    assert png.startswith(b"\x89PNG") and png == done.picture
    # its download is real data (the upload, preprocessed) that never names the upload
    (button,) = [b for b in at.get("download_button") if "prepared scan" in b.label]
    assert "real scan (preprocessed)" in button.label
    name, blob = media.deferred(button)
    z = zipfile.ZipFile(io.BytesIO(blob))
    names = z.namelist()
    (nii,) = [n for n in names if n.endswith(".nii.gz")]
    assert "desc-real" in nii and any(n.endswith(".tfm") for n in names) and any(n.endswith(".png") for n in names)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(z.read(nii)))
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == KINDS["real"].description
    np.testing.assert_allclose(np.asarray(img.dataobj), done.volume.data, atol=1e-6)
    side = json.loads(z.read(nii.replace(".nii.gz", ".json")))
    assert side["Provenance"] == "real"
    assert side["Prepare"]["QC"]["correlation"] == pytest.approx(r, abs=1e-3)
    for n in names:  # no file name, no header text of the upload anywhere
        text = z.read(n) if not n.endswith(".nii.gz") else gzip.decompress(z.read(n))
        assert b"native" not in text and b"test scan" not in text, n
    # the page goes on with the prepared scan (real): the reconstruction is of it, and derived
    assert not at.button(key="cmp_go").disabled
    at.button(key="cmp_go").click().run()
    assert not at.exception and not at.error
    result = at.session_state["cmp_result"]
    assert result.key.endswith(":prepared") and result.recon_provenance == "derived"
    np.testing.assert_allclose(result.recon.original.data, done.volume.data, atol=2e-3)
    (call,) = viewer_calls(at)
    assert [p["title"].split(":")[0].split(" (")[0] for p in call.panels] == ["Original", "Reconstruction"]
    assert "real" in call.panels[0]["title"] and "derived" in call.panels[1]["title"]
    assert frame(at.table[1].value)["Metric"][0] == "PSNR"  # the reconstruction's figures, after the QC table
    assert result.recon.metrics["ssim"] > 0.3


def test_a_scan_prepare_cannot_handle_gets_its_message(bundle):
    """An image with nothing in it is offered the step (the check cannot tell what it is); preparing it
    fails with the pipeline's one-line message, and nothing reaches the model."""
    from synthbrain.io import Volume

    empty = to_nifti_bytes(Volume(np.zeros(bundle.grid.shape, np.float32), bundle.grid.affine), description="")
    at, go = upload("compare", empty)
    at.button(key="cmp_prepare").click().run()
    assert not at.exception
    assert [e.value for e in at.error][-1] == "the upload: the image is empty (no positive intensities)"
    assert "cmp_prepared" not in at.session_state and at.button(key="cmp_go").disabled
    assert not viewer_calls(at)
