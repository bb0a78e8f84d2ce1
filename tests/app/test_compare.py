"""The Compare page under AppTest: built-in scans and uploads, the locked viewer with its difference
overlay, metrics and compression figures, and bad uploads as one-line messages."""

from __future__ import annotations

import numpy as np
import pytest

from synthbrain.data.template import load_template
from synthbrain.io import Volume, to_nifti_bytes

from .app_helpers import frame, nifti_array, open_page, texts, viewer_calls


@pytest.fixture(scope="module")
def template_upload(bundle) -> bytes:
    """A valid scan as a user would upload it: the template on the demo grid, arbitrary units."""
    t1 = load_template(bundle.grid).t1 * 800.0
    return to_nifti_bytes(Volume(t1, bundle.grid.affine), description="test scan")


def check_result(at, bundle):
    """What every reconstruction shows: linked viewer, overlay, metrics, compression, download."""
    assert not at.exception
    (call,) = viewer_calls(at)
    assert call.spec["sync"] is True
    original, recon = call.panels
    assert len(original["layers"]) == 1 and len(recon["layers"]) == 2
    diff = recon["layers"][1]
    assert diff["colormap_negative"]  # diverging: both signs shown
    assert diff["opacity"] == at.slider(key="cmp_opacity").value
    result = at.session_state["cmp_result"]
    # the overlay is reconstruction - original, sent as is
    np.testing.assert_allclose(nifti_array(call.volume(1, 1)), result.recon.difference.data, atol=1e-4)
    np.testing.assert_allclose(nifti_array(call.volume(0)), result.recon.original.data, atol=1e-4)
    assert call.volume(0).shape == bundle.grid.shape
    # the default overlay marks where the two differ most, leaving most of the brain uncoloured, with a colour bar
    threshold = at.slider(key="cmp_threshold").value
    assert diff["cal_min"] == threshold == result.diff_threshold > 0 and diff["cal_max"] > threshold
    brain = result.recon.original.data > 0
    coloured = np.abs(nifti_array(call.volume(1, 1)))[brain] >= threshold
    assert 0.005 < coloured.mean() < 0.1, coloured.mean()
    assert "0..1" in diff["colorbar"] and "reconstruction − original" in diff["colorbar"]
    assert all("(0..1, normalised)" in p["layers"][0]["label"] for p in call.panels)  # the readout's unit

    metrics = frame(at.table[0].value)
    assert metrics["Metric"][:1] == ["PSNR"] and {"SSIM", "MS-SSIM", "MAE"} <= set(metrics["Metric"])
    psnr = metrics["Value"][0]
    assert psnr == pytest.approx(result.recon.metrics["psnr"], abs=1e-3) and 5 < psnr < 80
    compression = frame(at.table[1].value)
    assert "Latent values per voxel" in compression["Figure"]
    assert any("Download the reconstruction" in b.label for b in at.get("download_button"))
    return call


def test_template_reconstruction(bundle):
    at = open_page("compare")
    assert not at.exception
    assert list(at.radio(key="cmp_source").options) == ["MNI152 template", "Phantom subject", "Upload a NIfTI"]
    assert not viewer_calls(at)  # nothing runs before the button
    at.button(key="cmp_go").click().run()
    call = check_result(at, bundle)
    # the opacity slider reaches the overlay without recomputing anything
    result = at.session_state["cmp_result"]
    at.slider(key="cmp_opacity").set_value(0.25).run()
    assert viewer_calls(at)[0].panels[1]["layers"][1]["opacity"] == 0.25
    assert at.session_state["cmp_result"] is result
    assert viewer_calls(at)[0].panels[1]["layers"][1]["id"] == call.panels[1]["layers"][1]["id"]
    # the user's threshold holds across reruns; 0 colours every voxel that differs
    at.slider(key="cmp_threshold").set_value(0.0).run()
    assert viewer_calls(at)[0].panels[1]["layers"][1]["cal_min"] == 0.0
    at.slider(key="cmp_opacity").set_value(0.5).run()
    assert at.slider(key="cmp_threshold").value == 0.0

    # the volumes measured on the scan and on its reconstruction, and the voxels counted as overlays
    from synthbrain.measure import measure_volume

    rows = frame(at.table[2].value)
    assert rows["Volume"][1].startswith("Ventricles (lateral + third)")
    for col, vol in (("Original (mL)", result.recon.original), ("Reconstruction (mL)", result.recon.reconstruction)):
        m = measure_volume(vol, bundle.grid)
        assert float(rows[col][0]) == pytest.approx(m.brain_volume, abs=0.06)
        assert float(rows[col][1]) == pytest.approx(m.ventricular_volume, abs=0.06)
    assert float(rows["Difference (mL)"][1]) == pytest.approx(float(rows["Reconstruction (mL)"][1])
                                                              - float(rows["Original (mL)"][1]), abs=0.11)
    at.toggle(key="cmp_masks").set_value(True).run()
    original, recon = viewer_calls(at)[0].panels
    assert [layer["label"] for layer in original["layers"][1:]] == ["brain (measured)", "ventricles (measured)"]
    assert [layer["label"] for layer in recon["layers"][2:]] == ["brain (measured)", "ventricles (measured)"]
    from synthbrain.measure import segment

    vent = nifti_array(viewer_calls(at)[0].volume(0, 2)) > 0.5
    np.testing.assert_array_equal(vent, segment(result.recon.original, bundle.grid).ventricle_mask)


def test_phantom_subject_is_labelled_as_phantom(bundle):
    at = open_page("compare")
    at.radio(key="cmp_source").set_value("phantom").run()
    at.number_input(key="cmp_phantom").set_value(2).run()
    at.button(key="cmp_go").click().run()
    check_result(at, bundle)
    page = texts(at)
    assert "Phantom subject 2" in page and "not a person" in page
    # another subject: the old result is not shown as if it were the new one
    at.number_input(key="cmp_phantom").set_value(3).run()
    assert not viewer_calls(at)


def test_upload_is_reconstructed(bundle, template_upload):
    at = open_page("compare")
    at.radio(key="cmp_source").set_value("upload").run()
    assert at.button(key="cmp_go").disabled  # nothing to reconstruct yet
    at.get("file_uploader")[0].upload("my_scan.nii.gz", template_upload, "application/gzip")
    at.run()
    assert not at.error and not at.button(key="cmp_go").disabled
    assert "my_scan.nii.gz: 80 x 112 x 80 voxels" in texts(at)
    at.button(key="cmp_go").click().run()
    check_result(at, bundle)
    assert at.session_state["cmp_result"].key.startswith("upload:")
    # a template scan reconstructs well enough that the numbers are meaningful
    assert at.session_state["cmp_result"].recon.metrics["ssim"] > 0.3


# (a wrong extension never gets this far: the uploader only takes .nii and .nii.gz)
@pytest.mark.parametrize("bad_nifti", ["truncated .nii.gz", "text named .nii", "4D with 5 volumes", "NaN voxels",
                                       "1024^3 declared, tiny file"], indirect=True)
def test_bad_upload_is_a_one_line_error(bad_nifti):
    at = open_page("compare")
    at.radio(key="cmp_source").set_value("upload").run()
    at.get("file_uploader")[0].upload(bad_nifti.path.name, bad_nifti.path.read_bytes())
    at.run()
    assert not at.exception
    (error,) = at.error
    assert error.value.startswith(bad_nifti.path.name + ":") and bad_nifti.expected in error.value
    assert "\n" not in error.value and "Traceback" not in error.value
    assert at.button(key="cmp_go").disabled
    assert not viewer_calls(at)
