"""Reconstruction and evaluation through the CLI, end to end on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_AUTOENCODER, TINY_PRIOR, cli_in_process, subprocess_env, write_json

from synthbrain.io import read_volume


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "synthbrain", *map(str, args)], capture_output=True, text=True,
                       env=subprocess_env())
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_reconstruct_lps_file_equals_its_ras_twin(tiny_bundle, tiny_cohort, tmp_path):
    ras = tiny_cohort.t1w("sub-0002")
    img = nib.load(ras)
    shape = np.array(img.shape)
    # LPS twin: the same world, x and y axes reversed in the array
    to_lps = np.eye(4)
    to_lps[:2, :2] = -np.eye(2)
    to_lps[:2, 3] = shape[:2] - 1
    lps_affine = img.affine @ to_lps
    lps = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1, :], lps_affine), lps)
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    r1 = _cli("reconstruct", ras, "--bundle", tiny_bundle, "--out", tmp_path / "a.nii.gz")
    r2 = _cli("reconstruct", lps, "--bundle", tiny_bundle, "--out", tmp_path / "b.nii.gz")
    a, b = read_volume(tmp_path / "a.nii.gz"), read_volume(tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert "PSNR" in r1.stdout and "SSIM" in r1.stdout and r1.stdout.split("PSNR")[1] == r2.stdout.split("PSNR")[1] \
        .replace("b.nii.gz", "a.nii.gz")
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["Metrics"]["psnr"] > 0 and side["Compression"]["latent_values_per_voxel"] < 0.02


@pytest.mark.slow
def test_cli_end_to_end_cohort_to_samples_with_evaluation(tmp_path):
    """cohort -> train autoencoder -> evaluate -> train prior -> evaluate -> sample, all from the CLI (in this
    process: six more torch imports would add half a minute; test_sampling runs `python -m synthbrain`)."""
    cli_in_process("cohort", "--n", 8, "--grid", "tiny", "--seed", 21, "--out", tmp_path / "data")
    cli_in_process("train", "autoencoder", "--data", tmp_path / "data", "--out", tmp_path / "ae", "--grid", "tiny",
                   "--config", write_json(tmp_path / "ae.json", TINY_AUTOENCODER), "--device", "cpu")
    bundle = tmp_path / "ae" / "bundle"
    out = cli_in_process("evaluate", "autoencoder", "--bundle", bundle, "--data", tmp_path / "data").stdout
    assert "held out" in out
    m = json.loads((bundle / "metrics.json").read_text())["autoencoder"]
    assert m["held_out"] is True and m["subjects"] >= 1
    assert {"psnr_brain", "ssim_brain", "psnr", "ssim", "ms_ssim", "mae", "codebook_usage",
            "latent_values_per_voxel"} <= set(m)
    assert m["latent_values_per_voxel"] == pytest.approx(4 * 4 * 6 * 4 / (32 * 48 * 32))
    t = m["mni152_template"]  # the real brain on the machine, through the same reconstruct() as the CLI
    assert 0 < t["psnr_brain"] < t["psnr"] and 0 < t["ssim_brain"] <= 1 and "MNI152" in t["source"]
    assert m["code_bits"] == 4 * 6 * 4 * 5 and "PSNR" in out and "% of a 16-bit volume" in out  # 32 codes: 5 bits
    picture = (bundle / m["picture"]["file"]).read_bytes()
    assert picture[:8] == b"\x89PNG\r\n\x1a\n" and m["picture"]["subject"] in m["per_subject"]
    assert f"]({m['picture']['file']})" in (bundle / "MODEL_CARD.md").read_text()

    cli_in_process("train", "prior", "--bundle", bundle, "--data", tmp_path / "data", "--out", tmp_path / "prior",
                   "--config", write_json(tmp_path / "p.json", TINY_PRIOR), "--device", "cpu")
    full = tmp_path / "prior" / "bundle"
    cli_in_process("evaluate", "prior", "--bundle", full, "--data", tmp_path / "data", "--n-conditions", 4,
                   "--n-ageing", 2, "--steps", 2, "--guidance", 1.5, "--set-defaults")
    p = json.loads((full / "metrics.json").read_text())["prior"]
    assert p["steps"] == 2 and p["guidance"] == 1.5 and "DPM-Solver++" in p["sampler"]
    defaults = json.loads((full / "config.json").read_text())["prior"]["config"]
    assert (defaults["default_steps"], defaults["default_guidance"]) == (2, 1.5)
    assert {"ventricular_volume_adherence", "brain_volume_adherence", "ageing", "diversity", "realism",
            "seconds_per_sample"} <= set(p)
    assert p["ageing"]["seeds"] == 2 and 0.0 <= p["ageing"]["share_larger_ventricles_when_older"] <= 1.0
    assert "autoencoder" in json.loads((full / "metrics.json").read_text()), "stage 1 figures are kept"
    card = (full / "MODEL_CARD.md").read_text()
    assert "## Prior" in card and "### prior" in card and "### autoencoder" in card

    cli_in_process("sample", "--bundle", full, "--n", 2, "--steps", 2, "--out", tmp_path / "synth", "--device", "cpu")
    assert len(list((tmp_path / "synth").glob("sub-*/anat/*_T1w.nii.gz"))) == 2
