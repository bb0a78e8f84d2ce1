"""Provenance: every output says whether it is synthetic, derived from a person's scan, or real, and a
derived output carries no trace of the source's name or header text."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
from conftest import subprocess_env

from app_support.results import make_compare
from synthbrain.bundle import load_bundle
from synthbrain.data.preprocess import preprocess
from synthbrain.errors import ConfigError
from synthbrain.export import DERIVED, REAL, SYNTHETIC, read_provenance, sidecar
from synthbrain.io import read_volume
from synthbrain.reconstruction import reconstruct
from synthbrain.sampling import Generator, write_samples
from synthbrain.series import build_trajectory

PERSONAL = ("John", "Doe", "1970-01-01", "MRN123")


@pytest.fixture(scope="module")
def gen(tiny_bundle):
    return Generator(load_bundle(tiny_bundle), device="cpu")


@pytest.fixture
def johns_scan(tiny_cohort, tmp_path):
    """A real-looking scan whose file name, description, db_name, aux_file and a header extension all
    hold a name, a birth date and a record number."""
    img = nib.load(tiny_cohort.t1w("sub-0001"))
    out = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
    out.header["descrip"] = b"John Doe 1970-01-01 MRN123"
    out.header["db_name"] = b"JohnDoe"
    out.header["aux_file"] = b"MRN123"
    out.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"patient John Doe born 1970-01-01 MRN123"))
    path = tmp_path / "John_Doe_1970-01-01_MRN123_T1w.nii.gz"
    nib.save(out, path)
    return path


def _no_personal_data(blob: bytes, where: str) -> None:
    for word in PERSONAL:
        assert word.encode() not in blob, f"{word!r} found in {where}"


def _zip_members(payload: bytes) -> dict[str, bytes]:
    """Every member of a zip, NIfTIs decompressed (so their headers are searched too)."""
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        return {n: gzip.decompress(z.read(n)) if n.endswith(".gz") else z.read(n) for n in z.namelist()}


def test_an_edit_of_a_real_scan_is_derived_everywhere_and_anonymous(gen, johns_scan):
    vol = read_volume(johns_scan)
    pre = preprocess(vol, gen.grid)[0]
    traj = build_trajectory(gen, gen.bundle, [{"age": 60.0}, {"age": 80.0}], axis="age", seed=1, steps=2,
                            guidance=1.5, source=pre, source_label=johns_scan.name, strength=0.1)
    assert traj.provenance == DERIVED and all(f.sample.provenance == DERIVED for f in traj.frames)
    members = _zip_members(traj.zip())
    niftis = [n for n in members if n.endswith(".nii.gz")]
    assert len(niftis) == 2 and all("desc-derived" in n and "synth" not in n for n in niftis)
    for name, blob in members.items():
        _no_personal_data(blob, name)
        assert b"not a person" not in blob and b"not a scan of any person" not in blob, name
    for n in niftis:
        img = nib.Nifti1Image.from_bytes(members[n])
        assert b"DERIVED" in img.header["descrip"].tobytes() and not img.header.extensions
        side = json.loads(members[n[: -len(".nii.gz")] + ".json"])
        assert side["Provenance"] == DERIVED and side["Synthetic"] is False
        assert side["SourceDigest"].startswith("sha256:") and "Source" not in side
    desc = json.loads(members["dataset_description.json"])
    assert desc["Provenance"] == DERIVED and desc["Synthetic"] is False
    # the viewer's copy says so too
    shown = nib.Nifti1Image.from_bytes(gzip.decompress(traj.frames[0].display))
    assert b"DERIVED" in shown.header["descrip"].tobytes()


def test_a_reconstruction_download_is_derived_and_anonymous(gen, johns_scan):
    recon = reconstruct(gen.bundle, read_volume(johns_scan))
    result = make_compare("upload:x", johns_scan.name, recon, provenance=REAL)
    assert result.recon_provenance == DERIVED and "desc-derived" in result.download_stem(gen.grid)
    members = _zip_members(result.download_zip(gen.bundle))
    assert len(members) == 2
    for name, blob in members.items():
        _no_personal_data(blob, name)
        assert b"not a person" not in blob
    # a phantom is not a person: its reconstruction is synthetic
    assert make_compare("phantom:1", "Phantom", recon, provenance=SYNTHETIC).recon_provenance == SYNTHETIC


def test_cli_reconstruct_writes_a_derived_file_without_the_source_name(tiny_bundle, johns_scan, tmp_path):
    out = tmp_path / "recon.nii.gz"
    subprocess.run([sys.executable, "-m", "synthbrain", "reconstruct", str(johns_scan), "--bundle", str(tiny_bundle),
                    "--out", str(out)], check=True, env=subprocess_env(), capture_output=True)
    _no_personal_data(gzip.decompress(out.read_bytes()), "the NIfTI")
    _no_personal_data((tmp_path / "recon.json").read_bytes(), "the sidecar")
    assert read_provenance(out) == DERIVED
    assert b"DERIVED" in nib.load(out).header["descrip"].tobytes()


def test_samples_are_synthetic_and_edits_cannot_be_written_as_samples(gen, tmp_path):
    s = gen.sample({"age": 70}, n=1, seed=0, steps=2)
    out = write_samples(tmp_path / "out", s, gen.bundle, measure=False)
    (nii,) = sorted(out.glob("sub-*/anat/*.nii.gz"))
    assert "desc-synthetic" in nii.name and read_provenance(nii) == SYNTHETIC
    edit = gen.edit(s[0].volume.data, {"age": 80}, strength=0.3, seed=0, steps=2)
    with pytest.raises(ConfigError, match="synthetic samples only"):
        write_samples(tmp_path / "bad", [edit], gen.bundle)
    assert not (tmp_path / "bad").exists()


def test_a_derived_sidecar_refuses_identifying_fields():
    with pytest.raises(ConfigError, match="identify the source"):
        sidecar(DERIVED, {"Source": "sub-0003_T1w.nii.gz"}, source="sha256:0")
    with pytest.raises(ConfigError, match="needs the volume it was derived from"):
        sidecar(DERIVED, {})
    assert sidecar(SYNTHETIC, {"Seed": 1})["Synthetic"] is True


def test_files_without_a_provenance_field_are_not_taken_for_synthetic(tmp_path):
    """Sidecars of versions before 0.2 said "Synthetic": true on edits of real scans too."""
    (tmp_path / "a_T1w.json").write_text(json.dumps({"Synthetic": True}))
    assert read_provenance(tmp_path / "a_T1w.nii.gz") is None
    assert read_provenance(tmp_path / "missing_T1w.nii.gz") is None
