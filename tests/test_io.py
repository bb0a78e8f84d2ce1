"""NIfTI read/write: round trips, canonical orientation, and refusal of every kind of bad file.

Files are real NIfTI written with nibabel (or hand-crafted headers where nibabel would refuse to
write the defect) into pytest's tmp_path; the writers and the table of bad files live in conftest.py.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time

import nibabel as nib
import numpy as np
import pytest

from synthbrain import io as sio
from synthbrain.errors import InvalidVolumeError
from synthbrain.io import Volume, read_volume, sidecar_path, to_nifti_bytes, volume_from_bytes, write_volume

SHAPE = (12, 10, 9)
AFFINE = np.array([[2.0, 0, 0, -12], [0, 2, 0, -10], [0, 0, 2.5, -9], [0, 0, 0, 1]])


def _rng_data(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _rotation_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("affine", [AFFINE, _rotation_z(20) @ AFFINE], ids=["axis-aligned", "oblique"])
def test_write_read_round_trip(tmp_path, suffix, affine):
    data = _rng_data()
    out = write_volume(tmp_path / f"sub-01_T1w{suffix}", Volume(data, affine), description="test")
    vol = read_volume(out)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.shape == SHAPE
    np.testing.assert_allclose(vol.spacing, (2.0, 2.0, 2.5), rtol=1e-6)
    assert vol.source == out.name


def test_uint8_labels_are_rounded_and_clipped(tmp_path):
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, :4] = [2.6, -3.0, 300.0, 41.2]
    out = write_volume(tmp_path / "labels.nii.gz", Volume(data, AFFINE), description="labels", dtype="uint8")
    assert nib.load(out).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_volume(out).data[0, 0, :4], [3, 0, 255, 41])


@pytest.mark.parametrize("make", [
    lambda d, a: nib.Nifti2Image(d, a),
    lambda d, a: nib.Nifti1Image(d.astype(">f4"), a, nib.Nifti1Header(endianness=">")),
], ids=["NIfTI-2", "big-endian"])
def test_other_nifti_flavours_read(tmp_path, make):
    data = _rng_data()
    nib.save(make(data, AFFINE), tmp_path / "other.nii.gz")
    vol = read_volume(tmp_path / "other.nii.gz")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE)


def test_scaling_is_applied(tmp_path, nifti):
    ints = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    path = nifti.crafted(tmp_path / "scaled.nii.gz", SHAPE, dtype=np.int16, payload=ints.tobytes(order="F"),
                    slope=0.5, inter=10.0)
    np.testing.assert_allclose(read_volume(path).data, ints * 0.5 + 10.0)


def _lps(data, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]  # voxel i -> n-1-i
    return data[::-1, ::-1, :].copy(), affine @ flip


def _axes_permuted(data, affine):
    perm = np.zeros((4, 4))
    perm[[0, 1, 2, 3], [2, 0, 1, 3]] = 1  # new axis 0 = old z, 1 = old x, 2 = old y
    return np.transpose(data, (2, 0, 1)).copy(), affine @ np.linalg.inv(perm)


@pytest.mark.parametrize("reorient", [_lps, _axes_permuted], ids=["LPS", "ZXY"])
def test_non_ras_file_reads_as_its_ras_twin(tmp_path, nifti, reorient):
    data = _rng_data()
    other_data, other_affine = reorient(data, AFFINE)
    assert not np.array_equal(other_affine, AFFINE)
    ras = read_volume(nifti.save(tmp_path / "ras.nii.gz", data))
    other = read_volume(nifti.save(tmp_path / "other.nii.gz", other_data, other_affine))
    np.testing.assert_array_equal(other.data, ras.data)
    np.testing.assert_allclose(other.affine, ras.affine, atol=1e-6)
    assert other.data.flags.c_contiguous


@pytest.mark.parametrize("shape", [(*SHAPE, 1), (*SHAPE, 1, 1)], ids=["4D", "5D"])
def test_singleton_trailing_dims_are_squeezed(tmp_path, nifti, shape):
    data = _rng_data()
    vol = read_volume(nifti.save(tmp_path / "single.nii.gz", data.reshape(shape)))
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data, data)


# ------------------------------------------------------------------------------------ bad inputs


def _from_bytes(path):
    return volume_from_bytes(path.read_bytes(), path.name, max_voxels=None)  # the same checks as a file


@pytest.mark.parametrize("reader", [read_volume, _from_bytes], ids=["file", "bytes"])
def test_bad_file_is_refused_quickly_with_one_line_naming_it(bad_nifti, reader):
    path, expected = bad_nifti.path, bad_nifti.expected
    start = time.perf_counter()
    with pytest.raises(InvalidVolumeError) as err:
        reader(path)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert message.startswith(f"{path.name}: ")
    assert "\n" not in message
    assert expected in message


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidVolumeError, match=r"^absent\.nii\.gz: file not found$"):
        read_volume(tmp_path / "absent.nii.gz")


def test_volume_from_bytes_reads_an_upload_and_leaves_no_files(tmp_path, nifti, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data = _rng_data()
    vol = volume_from_bytes((nifti.save(tmp_path / "up.nii.gz", data)).read_bytes(), "C:\\fakepath/up.nii.gz")
    np.testing.assert_array_equal(vol.data, data)
    assert vol.source == "up.nii.gz"
    with pytest.raises(InvalidVolumeError, match="^junk.nii.gz: not gzip"):
        volume_from_bytes(b"\x00garbage" * 50, "junk.nii.gz")
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("data, affine", [
    (np.zeros((8, 8)), np.eye(4)),
    (np.zeros((8, 8, 8, 2)), np.eye(4)),
    (np.zeros((8, 8, 8)), np.eye(3)),
    (np.zeros((8, 8, 8)), np.diag([1.0, np.inf, 1, 1])),
])
def test_volume_validates_its_arrays(data, affine):
    with pytest.raises(InvalidVolumeError):
        Volume(data, affine)


# ------------------------------------------------------------------------------------------- write


def test_written_header_is_scrubbed(tmp_path):
    # The input carries identifying fields and an extension; none may survive a read -> write.
    img = nib.Nifti1Image(_rng_data(), AFFINE)
    img.header["descrip"], img.header["db_name"], img.header["aux_file"] = b"Doe^John 1970", b"PACS", b"x.lut"
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"patient: John Doe"))
    nib.save(img, tmp_path / "dicom_convert.nii.gz")
    description = "SynthBrain synthetic T1w " + "x" * 100
    out = write_volume(tmp_path / "out.nii.gz", read_volume(tmp_path / "dicom_convert.nii.gz"),
                       description=description)

    hdr = nib.load(out).header
    assert hdr["descrip"].item().decode() == description[:79]
    for field in ("db_name", "aux_file", "intent_name"):
        assert hdr[field].item() == b""
    assert len(hdr.extensions) == 0
    assert b"John" not in gzip.decompress(out.read_bytes())
    assert int(hdr["sform_code"]) == 4 and int(hdr["qform_code"]) == 4
    assert hdr.get_xyzt_units()[0] == "mm"


def test_sidecar_is_written_sorted_and_parsed(tmp_path):
    sidecar = {"seed": np.int64(7), "age": np.float32(63.5), "conditions": {"sex": "F"},
               "volumes_ml": np.array([1.5, 2.0]), "Description": "synthetic"}
    out = write_volume(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz", Volume(_rng_data(), AFFINE),
                       description="test", sidecar=sidecar)
    text = sidecar_path(out).read_text()
    assert json.loads(text) == {"seed": 7, "age": 63.5, "conditions": {"sex": "F"}, "volumes_ml": [1.5, 2.0],
                                "Description": "synthetic"}
    assert text.index('"Description"') < text.index('"age"') < text.index('"seed"')  # sorted keys
    assert '\n  "age"' in text  # pretty-printed


@pytest.mark.parametrize("name, expected", [
    ("sub-01_T1w.nii.gz", "sub-01_T1w.json"), ("sub-01_T1w.nii", "sub-01_T1w.json"),
    ("a.b.NII.GZ", "a.b.json"),
])
def test_sidecar_path(tmp_path, name, expected):
    assert sidecar_path(tmp_path / name) == tmp_path / expected


def test_write_refuses_non_nifti_name(tmp_path):
    with pytest.raises(InvalidVolumeError, match="brain.mgz"):
        write_volume(tmp_path / "brain.mgz", Volume(_rng_data(), AFFINE), description="x")
    assert list(tmp_path.iterdir()) == []


def test_successful_write_leaves_only_the_outputs(tmp_path):
    write_volume(tmp_path / "a.nii.gz", Volume(_rng_data(), AFFINE), description="x", sidecar={"k": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.nii.gz"]


def test_failing_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous version")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_volume(target, Volume(_rng_data(), AFFINE), description="x")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    assert target.read_bytes() == b"previous version"


@pytest.mark.parametrize("data, affine, kwargs, error", [
    (np.full(SHAPE, np.nan, np.float32), AFFINE, {}, InvalidVolumeError),
    (_rng_data(), np.diag([1.0, 0, 1, 1]), {}, InvalidVolumeError),
    (_rng_data(), AFFINE, {"dtype": "complex64"}, InvalidVolumeError),
    (_rng_data(), AFFINE, {"sidecar": {"bad": object()}}, TypeError),
], ids=["NaN data", "singular affine", "complex dtype", "unserialisable sidecar"])
def test_unwritable_input_creates_no_file(tmp_path, data, affine, kwargs, error):
    with pytest.raises(error):
        write_volume(tmp_path / "out" / "x.nii.gz", Volume(data, affine), description="x", **kwargs)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("compress", [True, False])
def test_to_nifti_bytes(compress):
    data = _rng_data()
    blob = to_nifti_bytes(Volume(data, AFFINE), description="download", compress=compress)
    assert blob[:2] == b"\x1f\x8b" if compress else int.from_bytes(blob[:4], "little") == 348
    vol = volume_from_bytes(blob, "download.nii.gz" if compress else "download.nii")
    np.testing.assert_array_equal(vol.data, data)
    assert to_nifti_bytes(Volume(data, AFFINE), description="download", compress=compress) == blob
    assert os.path.basename(vol.source) == vol.source


def test_upload_voxel_cap_refuses_a_small_file_that_inflates_hugely(tmp_path):
    """1024 x 1024 x 64 int16 of zeros gzips to ~0.1 MB but would be 256 MB of float32 in the server."""
    import gzip

    import nibabel as nib

    from synthbrain.io import UPLOAD_MAX_VOXELS

    img = nib.Nifti1Image(np.zeros((1024, 1024, 80), np.int16), np.eye(4))
    raw = gzip.compress(img.to_bytes(), compresslevel=1)
    assert len(raw) < 2_000_000
    with pytest.raises(InvalidVolumeError, match="more than this server accepts"):
        volume_from_bytes(raw, "big.nii.gz", max_voxels=UPLOAD_MAX_VOXELS)
    small = gzip.compress(nib.Nifti1Image(np.ones((10, 10, 10), np.int16), np.eye(4)).to_bytes())
    assert volume_from_bytes(small, "ok.nii.gz").shape == (10, 10, 10)
