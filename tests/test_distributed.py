"""Data-parallel training with real torchrun processes (gloo on the CPU): both stages, checkpoints,
resume under DDP and onto one process, against single-process runs with the same global batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_AUTOENCODER, TINY_PRIOR, subprocess_env, write_json
from safetensors.torch import load_file

from synthbrain.training.autoencoder import train_autoencoder
from synthbrain.training.checkpoint import list_checkpoints, load_checkpoint
from synthbrain.training.prior import train_prior
from synthbrain.training.run import read_metrics

# One torchrun job, one process group for four runs (train_* reuse a group their caller set up): each
# stage trains 3 steps, checkpoints, and resumes to 6 steps in the same ranks.
DDP_JOB = """
import sys
from pathlib import Path

import torch

from synthbrain.training.autoencoder import train_autoencoder
from synthbrain.training.prior import train_prior

data, out, ae_config, prior_config = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.distributed.init_process_group("gloo")
bundle = train_autoencoder(data, out / "ae", grid="tiny", config_file=ae_config, device="cpu", steps=3)
train_autoencoder(data, out / "ae", grid="tiny", device="cpu", resume=True, steps=6)
train_prior(bundle, data, out / "prior", config_file=prior_config, device="cpu", steps=3)
train_prior(bundle, data, out / "prior", device="cpu", resume=True, steps=6)
torch.distributed.destroy_process_group()
"""


def _autoencoder_config(tmp_path, batch: int):
    """Dead-code restarts on (at step 0, from the global batch) and the adversarial term from step 3."""
    c = json.loads(json.dumps(TINY_AUTOENCODER))
    c["train"].update(steps=6, batch_size=batch, ckpt_every=3, val_every=0)
    c["loss"] = {"adversarial": 0.1, "adversarial_start": 3, "discriminator_channels": 4}
    return write_json(tmp_path / f"ae-batch{batch}.json", c)


def _prior_config(tmp_path, batch: int):
    """Two micro-batches a step (gradient accumulation), condition dropout on, a validation at the end."""
    c = json.loads(json.dumps(TINY_PRIOR))
    c["train"].update(steps=6, batch_size=batch, grad_accum=2, ckpt_every=3, val_every=6)
    c["model"]["condition_dropout"] = 0.3
    return write_json(tmp_path / f"prior-batch{batch}.json", c)


def _networks(run, step: int) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoints" / f"step-{step:07d}")
    return {k: v.float() for k, v in tensors.items() if k.startswith("net/")}


def _distance(a: dict, b: dict, prefix: str) -> float:
    """L2 distance between the tensors of one network (``net/<name>/``) of two checkpoints."""
    return sum(float((a[k] - b[k]).square().sum()) for k in a if k.startswith(prefix)) ** 0.5


@pytest.mark.slow
def test_two_ranks_train_both_stages_like_one_process_with_the_same_global_batch(tiny_cohort, tmp_path):
    """2 ranks of batch 1 against 1 process of batch 2 (and a control: 1 process of batch 1, half the data).

    Stated tolerances (distances: L2 over a network's tensors). The prior (noise, timesteps and dropout
    drawn for the global batch, each rank its slice; 2 micro-batches a step), after 6 steps and a resume:
    its EMA (the exported weights) within 1e-4 of the single process everywhere, prior and EMA at under 1%
    of the control's distance (measured: 0.2% and 0.1%; Adam magnifies float rounding in tiny gradients).
    The autoencoder at step 3, before the adversarial term: every tensor within 1e-4, the codebook
    included (restarted at step 0 from the gathered global batch). At step 6, after 3 adversarial steps:
    the autoencoder at under 5% of the control's distance (measured 0.6%); the discriminator only nearer
    than the control (measured 65%): its batch norm takes each rank's own statistics, as under any DDP
    without SyncBatchNorm (CUDA only), and its running statistics are rank 0's."""
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    job = tmp_path / "ddp_job.py"
    job.write_text(DDP_JOB)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job),
                        str(data), str(tmp_path / "ddp"), str(_autoencoder_config(tmp_path, 1)),
                        str(_prior_config(tmp_path, 1))], env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp_ae, ddp_prior = tmp_path / "ddp" / "ae", tmp_path / "ddp" / "prior"
    single_ae = train_autoencoder(data, tmp_path / "single", grid="tiny", config_file=_autoencoder_config(tmp_path, 2),
                                  device="cpu").parent
    control_ae = train_autoencoder(data, tmp_path / "control", grid="tiny",
                                   config_file=_autoencoder_config(tmp_path, 1), device="cpu").parent
    single_prior, control_prior = (train_prior(ddp_ae / "bundle", data, tmp_path / f"prior-{batch}",
                                               config_file=_prior_config(tmp_path, batch), device="cpu").parent
                                   for batch in (2, 1))

    for run in (ddp_ae, ddp_prior):  # rank 0 alone writes: each step logged once, through the resume
        assert json.loads((run / "run.json").read_text())["world_size"] == 2
        steps = [r["step"] for r in read_metrics(run / "metrics.csv") if r["name"] == "loss" and r["split"] == "train"]
        assert steps == [1, 2, 3, 4, 5, 6]
        tensors, state = load_checkpoint(list_checkpoints(run)[-1])
        assert {"rng/rank0/torch", "rng/rank1/torch"} <= set(tensors) and state["world_size"] == 2

    # the prior and its EMA (the exported weights)
    a, b, control = _networks(ddp_prior, 6), _networks(single_prior, 6), _networks(control_prior, 6)
    assert a.keys() == b.keys() and any(k.startswith("net/prior_ema/") for k in a)
    for net in ("net/prior/", "net/prior_ema/"):
        assert _distance(a, b, net) < 0.01 * _distance(control, b, net), net
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("net/prior_ema/")) < 1e-4
    assert {r["name"] for r in read_metrics(ddp_prior / "metrics.csv") if r["split"] == "val"} == {"loss"}

    # the autoencoder before the adversarial term: every tensor, the restarted codebook included
    a, b = _networks(ddp_ae, 3), _networks(single_ae, 3)
    assert a.keys() == b.keys() and "net/autoencoder/net.quantizer.quantizer.embedding.weight" in a
    worst = max(a, key=lambda k: float((a[k] - b[k]).abs().max()))
    assert float((a[worst] - b[worst]).abs().max()) < 1e-4, worst
    control = _networks(control_ae, 3)
    codebook = "net/autoencoder/net.quantizer.quantizer.embedding.weight"
    assert float((control[codebook] - b[codebook]).abs().max()) > 1e-2, "the control restarts from other latents"
    # ... and after 3 adversarial steps
    a, b, control = _networks(ddp_ae, 6), _networks(single_ae, 6), _networks(control_ae, 6)
    assert _distance(a, b, "net/autoencoder/") < 0.05 * _distance(control, b, "net/autoencoder/")
    assert _distance(a, b, "net/discriminator/") < _distance(control, b, "net/discriminator/")

    # resumed onto one process: the data order goes on from the global position (no batch seen twice)
    before = load_checkpoint(list_checkpoints(ddp_ae)[-1])[1]["sampler"]
    train_autoencoder(data, ddp_ae, grid="tiny", device="cpu", resume=True, steps=8)
    tensors, state = load_checkpoint(list_checkpoints(ddp_ae)[-1])
    assert state["step"] == 8 and state["world_size"] == 1 and set(k for k in tensors if k.startswith("rng/")) == {
        "rng/rank0/torch"}
    n_train = len(json.loads((ddp_ae / "run.json").read_text())["train_subjects"])
    consumed = lambda s: s["epoch"] * n_train + s["pos"]  # noqa: E731
    assert consumed(state["sampler"]) == consumed(before) + 2  # 2 steps of batch 1
    assert consumed(before) == 6 * 2  # 6 steps of 2 ranks x batch 1
    assert [r["step"] for r in read_metrics(ddp_ae / "metrics.csv") if r["name"] == "l1"] == list(range(1, 9))
    config = json.loads((ddp_ae / "bundle" / "config.json").read_text())["autoencoder"]
    assert config["steps_trained"] == 8
    weights = load_file(str(ddp_ae / "bundle" / "autoencoder.safetensors"))
    assert not any("disc" in k for k in weights)
