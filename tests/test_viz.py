"""synthbrain.viz: display NIfTI encoding, orthogonal-plane PNGs, brain / ventricle surfaces."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import DEMO
from synthbrain.io import Volume
from synthbrain.viz.display import content_id, display_nifti_bytes
from synthbrain.viz.slices import orthogonal_png, planes
from synthbrain.viz.surfaces import MAX_TRIANGLES, brain_surfaces, isosurface, read_mz3, to_mz3


def ball(shape=(40, 48, 36), centre=(20, 24, 18), radius=10.0, spacing=2.0) -> Volume:
    idx = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum((i - c) ** 2 for i, c in zip(idx, centre)))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-40.0, -50.0, -30.0]
    return Volume((r < radius).astype(np.float32), affine, source="ball")


# ---------------------------------------------------------------------------------------- display


def test_display_nifti_keeps_values_geometry_and_sign():
    rng = np.random.default_rng(0)
    data = rng.uniform(-0.5, 1.0, (12, 10, 9)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-12, -10, -9]
    payload = display_nifti_bytes(Volume(data, affine))
    img = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.get_fdata(), data, atol=1.0 / 32767 + 1e-7)
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["sform_code"]) == 4
    assert len(payload) < data.nbytes  # smaller than raw float32


def test_display_nifti_of_zeros_and_bad_values():
    img = nib.Nifti1Image.from_bytes(gzip.decompress(display_nifti_bytes(Volume(np.zeros((8, 8, 8)), np.eye(4)))))
    assert np.all(img.get_fdata() == 0)
    bad = np.zeros((8, 8, 8), np.float32)
    bad[0, 0, 0] = np.inf
    with pytest.raises(InvalidVolumeError, match="NaN or infinite"):
        display_nifti_bytes(Volume(bad, np.eye(4), source="x"))


def test_content_id_depends_on_voxels_and_affine():
    v = ball()
    assert content_id(v) == content_id(Volume(v.data.copy(), v.affine.copy()))
    assert content_id(v) != content_id(Volume(v.data * 0.5, v.affine))
    assert content_id(v) != content_id(Volume(v.data, v.affine + np.diag([0, 0, 0, 0.0]) + 1e-3))


# ----------------------------------------------------------------------------------------- slices


def test_planes_orientation():
    data = np.zeros((20, 30, 25), np.float32)
    data[15:, :, :] = 1.0   # the subject's right (RAS: high x)
    data[:, 25:, :] += 2.0  # anterior
    v = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    pl = planes(v)
    axial = pl["axial"][0]  # rows P->A (bottom to top), columns L->R
    assert axial.shape == (30, 20)
    assert axial[0, -1] == 1.0 and axial[0, 0] == 0.0      # right is on the right (neurological)
    assert axial[-1, 0] == 2.0                               # anterior is at the top
    sag = pl["sagittal"][0]  # columns P->A
    assert sag[0, -1] >= 2.0 and sag[0, 0] < 2.0


def test_orthogonal_png_is_an_image_with_its_planes():
    png = orthogonal_png(ball(), title="ball", footer="synthetic", width_px=600)
    img = Image.open(io.BytesIO(png))
    assert img.size[0] == 600
    a = np.asarray(img.convert("L"), dtype=np.float32)
    assert a.std() > 10  # not blank
    flipped = orthogonal_png(ball(), radiological=True, width_px=600)
    assert flipped != png


def test_orthogonal_png_refuses_oblique_volumes():
    a = np.eye(4)
    a[:3, :3] = [[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]
    with pytest.raises(InvalidVolumeError, match="axis-aligned"):
        orthogonal_png(Volume(np.zeros((8, 8, 8)), a))


# --------------------------------------------------------------------------------------- surfaces


def test_isosurface_of_a_ball_is_in_mm_and_encloses_its_volume():
    v = ball(radius=10.0)  # 10 voxels of 2 mm: radius 20 mm
    mesh = isosurface(v.data, v.affine, 0.5, name="ball", smooth_sigma=0.0, max_triangles=200_000)
    expected = 4 / 3 * np.pi * 20.0**3 / 1000  # mL
    assert mesh.enclosed_volume_ml == pytest.approx(expected, rel=0.06)
    centre = mesh.vertices.mean(axis=0)
    np.testing.assert_allclose(centre, v.affine[:3, :3] @ [20, 24, 18] + v.affine[:3, 3], atol=0.5)


def test_isosurface_is_decimated_to_its_budget():
    v = ball(radius=14.0)
    full = isosurface(v.data, v.affine, 0.5, name="b", max_triangles=10**7)
    small = isosurface(v.data, v.affine, 0.5, name="b", max_triangles=2000)
    assert full.n_triangles > 4000 and small.n_triangles <= 2000
    assert small.enclosed_volume_ml == pytest.approx(full.enclosed_volume_ml, rel=0.05)


def test_mz3_round_trip():
    v = ball()
    mesh = isosurface(v.data, v.affine, 0.5, name="b", max_triangles=3000)
    verts, faces = read_mz3(to_mz3(mesh))
    np.testing.assert_array_equal(faces, mesh.faces)
    np.testing.assert_allclose(verts, mesh.vertices)
    assert isosurface(np.zeros((8, 8, 8)), np.eye(4), 0.5, name="empty").n_triangles == 0


def test_brain_surfaces_match_the_measured_volumes():
    from synthbrain.data.cohort import render_subject, sample_subject
    from synthbrain.data.preprocess import preprocess
    from synthbrain.measure import measure_volume

    subject = render_subject(sample_subject(0, 0), DEMO)
    vol = preprocess(Volume(subject.t1, DEMO.affine), DEMO)[0]
    surf = brain_surfaces(vol, DEMO)
    assert surf.note is None
    brain, vent = surf.meshes
    assert (brain.name, vent.name) == ("brain", "ventricles")
    assert surf.n_triangles <= MAX_TRIANGLES
    m = measure_volume(vol, DEMO)
    # the surfaces are the 0.5 level of the measured fractions: close to the measured volumes
    assert vent.enclosed_volume_ml == pytest.approx(m.ventricular_volume, rel=0.3)
    assert brain.enclosed_volume_ml == pytest.approx(m.brain_volume + m.ventricular_volume, rel=0.15)


def test_brain_surfaces_of_a_volume_without_contrast_say_why():
    v = ball(shape=DEMO.shape, centre=(40, 56, 40), radius=30, spacing=DEMO.spacing)
    v = Volume(v.data, DEMO.affine, source="blob")
    surf = brain_surfaces(v, DEMO)
    assert [m.name for m in surf.meshes] == ["brain"]
    assert "ventricles not segmented" in surf.note


def test_brain_surfaces_budget_is_checked():
    with pytest.raises(ValueError, match="max_triangles"):
        brain_surfaces(ball(), max_triangles=300_000)
