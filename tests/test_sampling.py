"""Sampling: deterministic per seed, guidance matters, conditions are validated, outputs are labelled."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import cli_in_process, subprocess_env

from synthbrain.bundle import load_bundle
from synthbrain.data.bids import read_tsv
from synthbrain.errors import ConditionError
from synthbrain.io import read_volume
from synthbrain.sampling import Generator


@pytest.fixture(scope="module")
def gen(tiny_bundle):
    return Generator(load_bundle(tiny_bundle), device="cpu")


def test_same_seed_same_brain_different_seeds_differ(gen):
    a = gen.sample({"age": 70}, n=2, seed=3, steps=3)
    b = gen.sample({"age": 70}, n=2, seed=3, steps=3)
    assert np.array_equal(a[0].volume.data, b[0].volume.data)
    assert not np.array_equal(a[0].volume.data, a[1].volume.data)
    assert [s.seed for s in a] == [3, 4]


def test_a_brain_depends_on_its_seed_not_on_the_batch(gen):
    batch = gen.sample({"age": 70}, n=3, seed=10, steps=3, batch_size=3)
    alone = gen.sample({"age": 70}, n=1, seed=12, steps=3)
    np.testing.assert_allclose(batch[2].volume.data, alone[0].volume.data, atol=1e-5)


def test_guidance_changes_the_output(gen):
    a = gen.sample({"age": 70}, seed=0, steps=3, guidance=1.0)[0].volume.data
    b = gen.sample({"age": 70}, seed=0, steps=3, guidance=4.0)[0].volume.data
    assert not np.allclose(a, b)


def test_output_is_a_volume_on_the_grid(gen):
    s = gen.sample(None, seed=0, steps=2)[0]
    assert s.volume.shape == gen.grid.shape
    np.testing.assert_array_equal(s.volume.affine, gen.grid.affine)
    assert s.volume.data.min() >= 0.0 and s.volume.data.max() <= 1.0
    # unspecified: age and sex take the schema's defaults, the volumes what is typical for them
    typical = gen.bundle.population.typical(gen.schema, {"age": gen.schema["age"].default, "sex": "F"})
    assert s.conditions == gen.schema.complete(typical)
    old = gen.complete({"age": gen.schema["age"].high, "sex": "F"})
    young = gen.complete({"age": gen.schema["age"].low, "sex": "F"})
    assert old["ventricular_volume"] != young["ventricular_volume"]
    given = gen.schema["ventricular_volume"].high
    assert gen.complete({"age": 70, "ventricular_volume": given})["ventricular_volume"] == given


@pytest.mark.parametrize("bad, message", [
    ({"age": 200}, "valid range"),
    ({"sex": "X"}, "expected one of F, M"),
    ({"height": 180}, "unknown condition"),
    ({"ventricular_volume": "lots"}, "not a number"),
])
def test_invalid_conditions_are_refused(gen, bad, message):
    with pytest.raises(ConditionError, match=message):
        gen.sample(bad, steps=2)


def _sample_cli(bundle, out, *args):
    return subprocess.run([sys.executable, "-m", "synthbrain", "sample", "--bundle", str(bundle), "--out", str(out),
                           "--device", "cpu", *args], capture_output=True, text=True, env=subprocess_env())


def test_sample_cli_writes_a_labelled_synthetic_dataset(tiny_bundle, tmp_path):
    r = _sample_cli(tiny_bundle, tmp_path / "out", "--age", "72", "--sex", "M", "--n", "2", "--seed", "7",
                    "--steps", "2", "--guidance", "1.5")
    assert r.returncode == 0, r.stderr
    rows = read_tsv(tmp_path / "out" / "participants.tsv")
    assert [row["seed"] for row in rows] == ["7", "8"]
    assert {row["sex"] for row in rows} == {"M"} and float(rows[0]["age"]) == 72.0
    assert {"measured_brain_volume", "measured_ventricular_volume", "ventricular_volume",
            "brain_volume"} <= set(rows[0])
    files = sorted((tmp_path / "out").glob("sub-*/anat/*_T1w.nii.gz"))
    assert len(files) == 2 and "res-5" in files[0].name and "space-MNI152NLin2009aSym" in files[0].name
    side = json.loads(files[0].with_name(files[0].name.replace(".nii.gz", ".json")).read_text())
    assert side["Synthetic"] is True and side["Seed"] == 7 and side["Steps"] == 2 and side["Guidance"] == 1.5
    assert side["Conditions"]["age"] == 72.0 and side["Bundle"]["prior_sha256"]
    vol = read_volume(files[0])
    assert vol.shape == (32, 48, 32)
    import nibabel as nib

    hdr = nib.load(files[0]).header
    assert b"SYNTHETIC" in hdr["descrip"].tobytes() and hdr["db_name"].tobytes().strip(b"\0") == b""
    desc = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert desc["Synthetic"] is True


def test_sample_cli_refuses_out_of_range_in_one_line(tiny_bundle, tmp_path):
    r = _sample_cli(tiny_bundle, tmp_path / "out", "--age", "150")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "valid range" in r.stderr and "years" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_solver_runs_on_the_noise_schedule_the_prior_was_trained_with(gen):
    import torch
    from monai.networks.schedulers import DDPMScheduler

    from synthbrain.sampling import make_scheduler

    trained = DDPMScheduler(**gen.config.scheduler_kwargs())
    solver = make_scheduler(gen.config)
    torch.testing.assert_close(solver.alphas_cumprod.float(), trained.alphas_cumprod.float())
    assert solver.config.prediction_type == gen.config.prediction_type
    solver.set_timesteps(5)
    assert len(solver.timesteps) == 5 and int(solver.timesteps[0]) > int(solver.timesteps[-1])



def _all_at_once(jobs):
    """Run each job in its own thread, all released together; their results in order (errors re-raised)."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(run, job) for job in jobs]]


def test_threads_sharing_one_generator_get_the_serial_results(gen):
    """Different steps, seeds, guidance and an edit at once through ONE generator: each thread gets
    bit for bit what it gets alone (a shared solver mixed their timesteps and multistep history)."""
    scan = gen.sample({"age": 60}, seed=9, steps=2)[0].volume.data
    jobs = [lambda: gen.sample({"age": 55}, n=2, seed=1, steps=2),
            lambda: gen.sample({"age": 80, "sex": "M"}, seed=2, steps=5, guidance=3.0),
            lambda: gen.sample(None, seed=3, steps=3, guidance=1.0),  # unguided: a half-size batch
            lambda: [gen.edit(scan, {"age": 85}, strength=0.6, seed=4, steps=4)]]
    serial = [[s.volume.data for s in job()] for job in jobs]
    for _ in range(2):
        together = _all_at_once(jobs)
        for alone, got in zip(serial, together):
            assert len(got) == len(alone)
            for a, b in zip(alone, got):
                assert np.array_equal(a, b.volume.data)
    assert not gen.prior.training and not gen.autoencoder.training


def test_denoising_steps_end_at_the_sample(gen):
    """The Learn page's strip: the noise, then the chosen steps decoded; the last one is the brain
    that sample() gives for the same seed, steps and guidance."""
    from synthbrain.errors import ConfigError

    seen = list(gen.denoising_steps({"age": 70}, seed=6, steps=4, guidance=2.0, shown=[1, 3, 4]))
    assert [d.step for d in seen] == [0, 1, 3, 4]
    assert [d.label for d in seen][:2] == ["noise", "step 1 of 4"]
    assert seen[0].latent.shape == tuple(gen.prior.latent_shape)
    assert all(d.volume.shape == gen.grid.shape for d in seen)
    sample = gen.sample({"age": 70}, seed=6, steps=4, guidance=2.0)[0]
    assert np.array_equal(seen[-1].volume.data, sample.volume.data)
    assert not np.array_equal(seen[1].volume.data, seen[-1].volume.data)
    assert len(list(gen.denoising_steps(None, seed=6, steps=2))) == 3  # noise + every step
    with pytest.raises(ConfigError, match="shown steps must be in 1..4"):
        gen.denoising_steps(None, steps=4, shown=[0, 5])  # at the call, not at the first step

def test_precision_is_resolved_checked_and_recorded(gen, tiny_bundle):
    import torch

    from synthbrain.errors import ConfigError
    from synthbrain.sampling import resolve_precision, sample_sidecar

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    assert resolve_precision(cpu, "auto") in ("fp32", "bf16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision(cpu, "int8")
    fp32 = Generator(load_bundle(tiny_bundle), device="cpu", precision="fp32")
    bf16 = Generator(load_bundle(tiny_bundle), device="cpu", precision="bf16")
    a = fp32.sample({"age": 70}, seed=5, steps=3)[0]
    b = bf16.sample({"age": 70}, seed=5, steps=3)[0]
    assert sample_sidecar(a, fp32.bundle)["Precision"] == "fp32"
    assert sample_sidecar(b, bf16.bundle)["Precision"] == "bf16"
    # bf16 autocast rounds, it does not change the brain
    assert float(np.abs(a.volume.data - b.volume.data).mean()) < 0.02



@pytest.mark.slow
def test_guidance_outside_the_measured_range_is_warned_about(tiny_bundle, tmp_path):
    """`evaluate guidance` measures each scale and writes the curve; outside the good range in
    config.json, `synthbrain sample` warns (and still samples)."""
    from synthbrain.bundle import copy_bundle, read_config, write_config
    from synthbrain.sampling import guidance_warning

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    env = subprocess_env()
    data = tiny_bundle.parents[1] / "data"
    cli_in_process("evaluate", "guidance", "--bundle", b, "--data", data, "--values", "1,4", "--n-conditions", 3,
                   "--steps", 2)
    sweep = json.loads((b / "metrics.json").read_text())["guidance_sweep"]
    assert [p["guidance"] for p in sweep["curve"]] == [1.0, 4.0]
    assert {"ventricular_volume", "brain_volume", "ms_ssim_same_condition", "bright_outside_brain", "good"} <= set(
        sweep["curve"][0])
    cfg = read_config(b)
    cfg["prior"]["guidance_range"] = [1.0, 3.0]   # as a sweep that found 1..3 good would write it
    write_config(b, cfg)
    bundle = load_bundle(b)
    assert guidance_warning(bundle, 2.0) is None and guidance_warning(bundle, None) is None  # the default, 2
    assert "outside this model's measured good range 1-3" in guidance_warning(bundle, 10.0)
    assert "followed loosely" in guidance_warning(bundle, 0.0)
    r = subprocess.run([sys.executable, "-m", "synthbrain", "sample", "--bundle", str(b), "--guidance", "9",
                        "--steps", "2", "--out", str(tmp_path / "out"), "--no-measure"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "warning: guidance 9 is outside" in r.stderr
    assert len(list((tmp_path / "out").glob("sub-*/anat/*.nii.gz"))) == 1
