"""Preprocessing the real MNI152 T1 that nilearn ships: geometry by world coordinates, whatever the
input's orientation or array size, and intensities normalised to [0, 1]."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import MNI152_FILE_PATH
from scipy import ndimage as ndi

from synthbrain.data.preprocess import preprocess, resample_to_grid
from synthbrain.data.template import load_template
from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import DEMO, FULL
from synthbrain.io import Volume, read_volume


@pytest.fixture(scope="module")
def mni() -> Volume:
    """The MNI152 2009 T1 at 1 mm, 197 x 233 x 189, RAS."""
    return read_volume(MNI152_FILE_PATH)


@pytest.fixture(scope="module")
def mni_demo(mni) -> Volume:
    return preprocess(mni, "demo")[0]


def _centroid_mm(vol: Volume, *, mask: bool) -> np.ndarray:
    """Centre of mass in world mm: of the intensities, or of the non-zero voxels."""
    ijk = np.array(ndi.center_of_mass(vol.data > 0 if mask else vol.data))
    return vol.affine[:3, :3] @ ijk + vol.affine[:3, 3]


def _shift_index(affine: np.ndarray, offset) -> np.ndarray:
    """The affine of an array whose voxel 0 is voxel ``offset`` of the array ``affine`` belongs to."""
    shift = np.eye(4)
    shift[:3, 3] = offset
    return affine @ shift


# Each gives the same image in world space as a different array: flipped, permuted, cropped, padded.
def _lps(data, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]  # voxel i -> n-1-i
    return data[::-1, ::-1, :].copy(), affine @ flip


def _zxy(data, affine):
    perm = np.zeros((4, 4))
    perm[[0, 1, 2, 3], [2, 0, 1, 3]] = 1  # new axis 0 = old z, 1 = old x, 2 = old y
    return np.transpose(data, (2, 0, 1)).copy(), affine @ np.linalg.inv(perm)


def _cropped(data, affine):
    # the MNI T1 has empty margins (but none below the brain): cut some off
    return data[12:-7, 3:, :-9].copy(), _shift_index(affine, (12, 3, 0))


def _padded(data, affine):
    return np.pad(data, ((20, 3), (0, 11), (5, 5))), _shift_index(affine, (-20, 0, -5))


REARRANGED = {"LPS": _lps, "ZXY": _zxy, "cropped": _cropped, "padded": _padded}


# ------------------------------------------------------------------------------------ demo grid


def test_output_is_on_the_grid_and_normalised(mni, mni_demo):
    assert mni_demo.shape == DEMO.shape
    np.testing.assert_array_equal(mni_demo.affine, DEMO.affine)
    assert mni_demo.data.dtype == np.float32
    assert mni_demo.data.min() == 0.0 and mni_demo.data.max() == 1.0
    brain = mni_demo.data[mni_demo.data > 0]
    assert 0.5 < np.percentile(brain, 99.5) <= 1.0  # robust maximum near 1: only the brightest 0.5 % clip
    assert np.mean(brain >= 1.0) < 0.01


@pytest.mark.parametrize("mask", [False, True], ids=["intensity", "mask"])
def test_brain_centroid_stays_put(mni, mni_demo, mask):
    moved = _centroid_mm(mni_demo, mask=mask) - _centroid_mm(mni, mask=mask)
    assert np.linalg.norm(moved) < 2.0


def test_brain_volume_is_kept(mni, mni_demo):
    # 1 mm^3 voxels in, 8 mm^3 out: the same brain, give or take its partial-volume rim
    before = np.count_nonzero(mni.data) * 1e-3
    after = np.count_nonzero(mni_demo.data) * DEMO.voxel_volume_ml
    assert after == pytest.approx(before, rel=0.1)


def test_info_reports_the_intensity_scale(mni):
    vol, info = preprocess(mni, "demo")
    assert info.grid == "demo"
    assert info.brain_voxels == np.count_nonzero(vol.data)
    # the scale is the input's robust maximum: dividing by it gives the output (where unclipped)
    inside = (vol.data > 0.05) & (vol.data < 0.95)
    resampled = resample_to_grid(mni.data, mni.affine, "demo")
    np.testing.assert_allclose(vol.data[inside], resampled[inside] / info.intensity_scale, rtol=1e-5)
    assert set(info.to_dict()) >= {"grid", "intensity_scale", "brain_voxels", "normalisation"}


@pytest.mark.parametrize("rearrange", list(REARRANGED.values()), ids=list(REARRANGED))
def test_same_world_image_in_another_array_gives_the_same_result(mni, mni_demo, rearrange):
    data, affine = rearrange(mni.data, mni.affine)
    assert data.shape != mni.shape or not np.array_equal(affine, mni.affine)
    out, _ = preprocess(Volume(data, affine), "demo")
    np.testing.assert_allclose(out.data, mni_demo.data, atol=1e-5)


def test_lps_file_gives_the_same_result_as_the_ras_original(tmp_path, mni, mni_demo):
    data, affine = _lps(mni.data, mni.affine)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "lps.nii.gz")
    assert nib.aff2axcodes(nib.load(tmp_path / "lps.nii.gz").affine) == ("L", "P", "S")
    out, _ = preprocess(read_volume(tmp_path / "lps.nii.gz"), "demo")
    np.testing.assert_allclose(out.data, mni_demo.data, atol=1e-5)


def test_shift_in_the_affine_shifts_the_result_by_world_coordinates(mni, mni_demo):
    # +10 mm in x = 5 demo voxels: the grid crops and pads by world position, not by array index
    affine = mni.affine.copy()
    affine[0, 3] += 10.0
    before = resample_to_grid(mni.data, mni.affine, "demo")
    after = resample_to_grid(mni.data, affine, "demo")
    np.testing.assert_array_equal(after[5:], before[:-5])

    shifted, _ = preprocess(Volume(mni.data, affine), "demo")
    # inside the brain exactly so; at its edge the MNI brain mask (6 mm margin) may trim the shifted one
    deep = load_template("demo").depth[:-5] > 10.0
    np.testing.assert_allclose(shifted.data[5:][deep], mni_demo.data[:-5][deep], atol=1e-3)
    moved = _centroid_mm(shifted, mask=False) - _centroid_mm(mni_demo, mask=False)
    assert moved[0] == pytest.approx(10.0, abs=2.0)
    assert np.all(np.abs(moved[1:]) < 1.0)


def test_parts_outside_the_input_are_zero(mni):
    # only the right hemisphere (x > 0 mm) was acquired
    first = int(np.ceil(-mni.affine[0, 3]))  # index of x = 0
    right = resample_to_grid(mni.data[first:], _shift_index(mni.affine, (first, 0, 0)), "demo")
    x = DEMO.voxel_to_world(np.c_[np.arange(DEMO.shape[0]), np.zeros((DEMO.shape[0], 2))])[:, 0]
    assert not right[x < -3].any()  # beyond the anti-aliasing kernel's reach
    assert right[x > 3].any()


@pytest.mark.parametrize("data", [np.zeros((40, 40, 40)), np.full((40, 40, 40), -5.0)],
                         ids=["zeros", "negative"])
def test_no_brain_in_the_mni_region_is_refused(data):
    affine = _shift_index(np.eye(4), (-20, -20, -20))
    with pytest.raises(InvalidVolumeError, match=r"^empty\.nii\.gz: the image is empty inside the MNI brain"):
        preprocess(Volume(data, affine, source="empty.nii.gz"), "demo")


def test_image_outside_mni_space_is_refused(mni):
    # a brain 300 mm away from the MNI brain: nothing of it lies in the field of view
    affine = mni.affine.copy()
    affine[2, 3] += 300.0
    with pytest.raises(InvalidVolumeError, match=r"^far\.nii\.gz: .*aligned to MNI space"):
        preprocess(Volume(mni.data, affine, source="far.nii.gz"), "demo")


# ------------------------------------------------------------------------------------ full grid


def test_full_grid_crops_and_pads_without_resampling(mni):
    # full-grid voxel centres are the template's own: a pure crop (x, y) and pad (z), no interpolation
    out = resample_to_grid(mni.data, mni.affine, "full")
    assert out.shape == FULL.shape
    i0, j0, k0 = np.rint(np.linalg.solve(mni.affine, np.r_[FULL.origin, 1.0])[:3]).astype(int)
    assert (i0, j0, k0) == (18, 5, -4)
    np.testing.assert_array_equal(out[:, :, -k0:], mni.data[i0:i0 + 160, j0:j0 + 224, : 160 + k0])
    assert not out[:, :, :-k0].any()


def test_full_grid_preprocessing(mni):
    vol, info = preprocess(mni, "full")
    assert info.grid == "full"
    assert vol.shape == FULL.shape
    np.testing.assert_array_equal(vol.affine, FULL.affine)
    assert vol.data.min() == 0.0 and vol.data.max() == 1.0
    for mask in (False, True):
        assert np.linalg.norm(_centroid_mm(vol, mask=mask) - _centroid_mm(mni, mask=mask)) < 2.0
