"""The viewer's copy of a 1 mm volume: uint8 (half the bytes of int16) where the data are not negative,
int16 where they are signed (a difference map) or the volume is small."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from synthbrain.grids import DEMO, FULL
from synthbrain.io import Volume
from synthbrain.viz import display


def _read(b: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(b))


@pytest.fixture(scope="module")
def head() -> np.ndarray:
    """A 1 mm volume in [0, 1] with smooth structure and noise, as a decoded whole head has."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in FULL.shape), indexing="ij")
    smooth = np.clip(1.2 - (x**2 + y**2 + z**2), 0, 1)
    return np.clip(smooth + 0.05 * rng.standard_normal(FULL.shape, dtype=np.float32), 0, 1).astype(np.float32)


def test_a_1mm_volume_is_sent_as_uint8_with_its_values(head, monkeypatch):
    b = display.display_nifti_bytes(Volume(head, FULL.affine))
    img = _read(b)
    assert img.get_data_dtype() == np.uint8 and img.shape == FULL.shape
    np.testing.assert_allclose(img.affine, FULL.affine)
    assert np.abs(img.get_fdata(dtype=np.float32) - head).max() <= head.max() / 255 / 2 + 1e-6
    monkeypatch.setattr(display, "LARGE_VOXELS", 10**9)  # what it was: int16
    as_int16 = display.display_nifti_bytes(Volume(head, FULL.affine))
    assert _read(as_int16).get_data_dtype() == np.int16
    assert len(b) < 0.6 * len(as_int16)


def test_signed_or_small_volumes_keep_int16(head):
    diff = Volume(head - 0.5, FULL.affine)
    assert _read(display.display_nifti_bytes(diff)).get_data_dtype() == np.int16  # exact near zero
    small = Volume(np.asarray(head[::2, ::2, ::2]), DEMO.affine)
    assert _read(display.display_nifti_bytes(small)).get_data_dtype() == np.int16


def test_a_1mm_series_is_uint8_frame_for_frame(head):
    frames = [Volume(head, FULL.affine), Volume(head * 0.5, FULL.affine)]
    img = _read(display.display_series_bytes(frames, "synthetic"))
    assert img.get_data_dtype() == np.uint8 and img.shape == (*FULL.shape, 2)
    assert b"SYNTHETIC" in img.header["descrip"].tobytes()
    np.testing.assert_allclose(img.dataobj[..., 1], head * 0.5, atol=1 / 255)
