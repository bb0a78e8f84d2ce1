"""The demo bundle shipped in the package: complete, trained, and its figures reproducible."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import cli_in_process

from synthbrain.bundle import demo_bundle_path, load_bundle
from synthbrain.data.bids import read_tsv


def test_demo_bundle_is_complete_and_documented():
    b = load_bundle()
    assert b.grid.name == "demo" and b.has_prior
    assert b.schema.names[:4] == ["age", "sex", "ventricular_volume", "brain_volume"]
    for section, keys in (("autoencoder", {"psnr", "ssim", "ms_ssim", "per_subject", "latent_values_per_voxel"}),
                          ("prior", {"ventricular_volume_adherence", "brain_volume_adherence", "ageing"})):
        assert keys <= set(b.metrics.get(section, {})), section
    assert b.metrics["autoencoder"]["held_out"] is True
    assert b.metrics["autoencoder"]["latent_values_per_voxel"] < 0.01
    card = b.card
    assert "synthbrain cohort" in card and "synthbrain train autoencoder" in card and "synthbrain train prior" in card
    weights = sum(p.stat().st_size for p in demo_bundle_path().glob("*.safetensors"))
    assert weights < 50e6


def _cohort_args(generated_by: str) -> dict:
    return {k: v for k, v in re.findall(r"--(n|grid|seed) (\S+)", generated_by)}


@pytest.mark.slow
def test_demo_autoencoder_figures_match_a_rerun_of_evaluate(tmp_path):
    """Re-create three of the held-out phantom subjects byte for byte (cohort --only), evaluate a copy
    of the bundle on them: the per-subject figures equal those in the shipped metrics.json."""
    b = load_bundle(components=())
    shipped = b.metrics["autoencoder"]["per_subject"]
    labels = sorted(shipped)[:3]
    args = _cohort_args(b.config["autoencoder"]["data_fingerprint"]["generated_by"])
    cli_in_process("cohort", "--n", args["n"], "--grid", args["grid"], "--seed", args["seed"],
                   "--only", ",".join(labels), "--out", tmp_path / "data")
    copy = shutil.copytree(demo_bundle_path(), tmp_path / "bundle")
    cli_in_process("evaluate", "autoencoder", "--bundle", copy, "--data", tmp_path / "data")
    rerun = json.loads((copy / "metrics.json").read_text())["autoencoder"]
    assert rerun["held_out"] is True and sorted(rerun["per_subject"]) == labels
    for label in labels:
        assert rerun["per_subject"][label]["psnr"] == pytest.approx(shipped[label]["psnr"], abs=0.01)
        assert rerun["per_subject"][label]["ssim"] == pytest.approx(shipped[label]["ssim"], abs=1e-3)
    for key in ("psnr_brain", "ssim_brain"):
        assert rerun["mni152_template"][key] == pytest.approx(b.metrics["autoencoder"]["mni152_template"][key],
                                                              abs=1e-3)


@pytest.mark.slow
def test_demo_sample_cli_volumes_move_with_the_request(tmp_path):
    """`synthbrain sample` with the shipped bundle on the CPU: older brains (with their age's typical
    volumes) get larger measured ventricles and smaller measured brains, seed for seed."""
    out = {}
    for age in (45, 85):
        cli_in_process("sample", "--age", age, "--sex", "F", "--n", 3, "--seed", 0, "--device", "cpu",
                       "--out", tmp_path / f"age{age}")
        out[age] = read_tsv(tmp_path / f"age{age}" / "participants.tsv")
    for young, old in zip(out[45], out[85]):
        assert young["seed"] == old["seed"]
        assert float(old["ventricular_volume"]) > float(young["ventricular_volume"])  # requested
        assert float(old["measured_ventricular_volume"]) > float(young["measured_ventricular_volume"])
        assert float(old["measured_brain_volume"]) < float(young["measured_brain_volume"])


def test_demo_edit_keeps_the_subject_at_low_strength():
    """SDEdit starts the solver part-way: a weak edit of the MNI152 template under new conditions
    stays near the template, a full-strength one is a new brain."""
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.data.preprocess import preprocess
    from synthbrain.io import read_volume
    from synthbrain.sampling import Generator

    gen = Generator.from_bundle(device="cpu")
    source = preprocess(read_volume(MNI152_FILE_PATH), gen.grid)[0].data
    weak = gen.edit(source, {"age": 85}, strength=0.3, seed=1)
    full = gen.edit(source, {"age": 85}, strength=1.0, seed=1)
    assert weak.info["strength"] == 0.3 and weak.volume.shape == source.shape
    err_weak = float(np.abs(weak.volume.data - source).mean())
    err_full = float(np.abs(full.volume.data - source).mean())
    assert err_weak < 0.6 * err_full
