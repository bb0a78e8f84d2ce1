"""Training loop: the loss falls, checkpoints are atomic and resume exactly, bad configs are refused."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_AUTOENCODER, cli_in_process, subprocess_env, write_json
from safetensors.torch import load_file

from synthbrain.errors import ConfigError, SynthBrainError
from synthbrain.training.autoencoder import AutoencoderTraining, train_autoencoder
from synthbrain.training.checkpoint import list_checkpoints
from synthbrain.training.run import read_metrics


def _losses(run_dir):
    return [r["value"] for r in read_metrics(run_dir / "metrics.csv") if r["split"] == "train" and r["name"] == "l1"]


def test_tiny_autoencoder_loss_falls(tiny_cohort, tmp_path):
    cfg = json.loads(json.dumps(TINY_AUTOENCODER))
    cfg["train"].update(steps=40, ckpt_every=40, val_every=0)
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    train_autoencoder(data, tmp_path / "run", grid="tiny", config_file=write_json(tmp_path / "c.json", cfg))
    l1 = _losses(tmp_path / "run")
    assert len(l1) == 40
    assert sum(l1[-5:]) / 5 < 0.75 * sum(l1[:5]) / 5


def test_run_folder_and_bundle(tiny_bundle):
    run = tiny_bundle.parent.parent / "ae"
    assert [p.name for p in list_checkpoints(run)] == ["step-0000006", "step-0000008"]  # newest two kept
    assert not list(run.glob("checkpoints/.tmp-*"))
    rows = read_metrics(run / "metrics.csv")
    assert {r["split"] for r in rows} == {"train", "val"}
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= {r["name"] for r in rows if r["split"] == "val"}
    cfg = json.loads((run / "bundle" / "config.json").read_text())
    assert cfg["autoencoder"]["steps_trained"] == 8
    assert cfg["autoencoder"]["val_subjects"], "held-out subjects are recorded"
    assert cfg["autoencoder"]["data_fingerprint"]["phantom"] is True


def _cli_train(data, out, config, *extra):
    return [sys.executable, "-m", "synthbrain", "train", "autoencoder", "--data", str(data), "--out", str(out),
            "--grid", "tiny", "--config", str(config), "--device", "cpu", *extra]


# Trains like `synthbrain train autoencoder`, but holds for good at the step given as its 4th argument,
# so that the run cannot finish before the test kills it; the kill lands wherever the run is then.
HOLD_AT = """
import sys, threading
from synthbrain.training.autoencoder import train_autoencoder

def on_step(i, n, info):
    if i == int(sys.argv[4]):
        threading.Event().wait()  # until SIGKILL

train_autoencoder(sys.argv[1], sys.argv[2], grid="tiny", config_file=sys.argv[3], device="cpu", on_step=on_step)
"""


def _newest_step(run) -> int:
    found = list_checkpoints(run)
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_cohort, tmp_path):
    """SIGKILL in the middle of training, then --resume: the final weights are bit-identical."""
    cfg = json.loads(json.dumps(TINY_AUTOENCODER))
    # warm-up longer than the checkpoint interval: the learning rate is mid-ramp when the run dies
    cfg["train"].update(steps=16, ckpt_every=2, val_every=0, warmup_steps=10)
    config = write_json(tmp_path / "c.json", cfg)
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    env = subprocess_env()

    # the uninterrupted run and the resume are what `synthbrain train` does, in this process (one thread,
    # as the killed subprocess runs); only the run that is killed needs a process of its own
    cli_in_process(*_cli_train(data, tmp_path / "full", config)[3:])

    proc = subprocess.Popen([sys.executable, "-c", HOLD_AT, str(data), str(tmp_path / "killed"), str(config), "12"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the condition: checkpoint 6 is complete (the run holds at step 12, so it is still running); the
        # deadline is far beyond any healthy run, so that a stalled one fails instead of hanging the suite
        deadline = time.monotonic() + 300
        while _newest_step(tmp_path / "killed") < 6:
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint 6 after 300 s: the run stalled"
            time.sleep(0.05)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)  # somewhere between checkpoint 6 and step 12, perhaps mid-write
        proc.wait()
    killed_at = _newest_step(tmp_path / "killed")
    assert 6 <= killed_at <= 12

    # a resumed run needs --resume; without it the folder is refused
    from typer.testing import CliRunner

    from synthbrain.cli import app

    refused = CliRunner().invoke(app, _cli_train(data, tmp_path / "killed", config)[3:])
    assert isinstance(refused.exception, SynthBrainError) and "pass --resume" in str(refused.exception)
    cli_in_process("train", "autoencoder", "--data", data, "--out", tmp_path / "killed", "--grid", "tiny",
                   "--device", "cpu", "--resume")  # the config comes from run.json
    recorded = json.loads((tmp_path / "killed" / "bundle" / "config.json").read_text())["autoencoder"]
    assert recorded["config_file"] == str(config.resolve())  # the first run's --config, kept by the resume

    a = load_file(str(tmp_path / "full" / "bundle" / "autoencoder.safetensors"))
    b = load_file(str(tmp_path / "killed" / "bundle" / "autoencoder.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.csv") if r["name"] == "l1"]
    assert steps == list(range(1, 17)), "metrics.csv has each step once after the resume"


@pytest.mark.parametrize("bad, message", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"amp": "fp8"}}, "train.amp"),
    ({"model": {"channels": [4, 8], "num_res_channels": [4]}}, "num_res_channels"),
    ({"model": {"colour": 3}}, "unknown keys"),
    ({"optimiser": {}}, "unknown config sections"),
])
def test_bad_config_is_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        AutoencoderTraining.from_dict(bad)


def test_cli_refuses_bad_config_file(tiny_cohort, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run(_cli_train(tiny_cohort.root, tmp_path / "run", bad), env=subprocess_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "bad.json" in r.stderr
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_is_an_error(tiny_cohort, tmp_path):
    with pytest.raises(SynthBrainError, match="no checkpoint"):
        train_autoencoder(shutil.copytree(tiny_cohort.root, tmp_path / "d"), tmp_path / "run", grid="tiny",
                          resume=True, config_file=write_json(tmp_path / "c.json", TINY_AUTOENCODER))


def test_resumed_prior_equals_uninterrupted_prior(tiny_bundle, tiny_cohort, tmp_path):
    """The prior's noise, timesteps and condition dropout come from (seed, rank, step): a run stopped
    after a checkpoint and resumed ends where the uninterrupted run does."""
    from conftest import TINY_PRIOR

    from synthbrain.training.prior import train_prior

    ae = tiny_bundle  # any bundle with an autoencoder
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    cfg = json.loads(json.dumps(TINY_PRIOR))
    cfg["train"].update(steps=8, ckpt_every=2, val_every=0, warmup_steps=5)
    config = write_json(tmp_path / "p.json", cfg)
    full = train_prior(ae, data, tmp_path / "full", config_file=config)
    train_prior(ae, data, tmp_path / "part", steps=4, config_file=config)
    part = train_prior(ae, data, tmp_path / "part", steps=8, resume=True)
    a = load_file(str(full / "prior.safetensors"))
    b = load_file(str(part / "prior.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume with other conditions (here one more column) is refused in one line before any network is built
    with pytest.raises(ConfigError, match="conditions differ from those the run started with.*--schema"):
        train_prior(ae, data, tmp_path / "part", steps=10, resume=True, extra_conditions=["intracranial_volume"])


def test_adversarial_term_trains_a_discriminator_that_stays_out_of_the_bundle(tiny_cohort, tmp_path):
    cfg = json.loads(json.dumps(TINY_AUTOENCODER))
    cfg["train"].update(steps=4, ckpt_every=4, val_every=0)
    cfg["loss"] = {"adversarial": 0.1, "adversarial_start": 2, "discriminator_channels": 4}
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    bundle = train_autoencoder(data, tmp_path / "run", grid="tiny", config_file=write_json(tmp_path / "c.json", cfg))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    steps_with = {r["step"] for r in rows if r["name"] == "d_loss"}
    assert steps_with == {3, 4}, "the discriminator joins after adversarial_start"
    ckpt = load_file(str(list_checkpoints(tmp_path / "run")[-1] / "tensors.safetensors"))
    assert any(k.startswith("net/discriminator/") for k in ckpt)
    assert any(k.startswith("optim/discriminator/") for k in ckpt)
    weights = load_file(str(bundle / "autoencoder.safetensors"))
    assert not any("disc" in k for k in weights)


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    from synthbrain.training.config import TrainConfig
    from synthbrain.training.loop import lr_scale

    cfg = TrainConfig(steps=110, warmup_steps=10, lr_decay="cosine", min_lr_ratio=0.1)
    scales = [lr_scale(cfg, s) for s in range(110)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0)
    assert scales[10] == pytest.approx(1.0) and scales[60] == pytest.approx(0.55)
    assert scales[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(scales[10:], scales[11:])), "non-increasing after the warm-up"
    flat = TrainConfig(steps=110, warmup_steps=10)
    assert [lr_scale(flat, s) for s in (10, 60, 109)] == [1.0, 1.0, 1.0], "no decay unless asked"
    with pytest.raises(ConfigError, match="lr_decay"):
        TrainConfig(lr_decay="step")


def test_adversarial_run_with_decay_resumes_bit_exactly(tiny_cohort, tmp_path):
    """Stopped after a checkpoint (discriminator on, learning rate decaying) and resumed: the same
    autoencoder and discriminator weights as the uninterrupted run."""
    cfg = json.loads(json.dumps(TINY_AUTOENCODER))
    cfg["train"].update(steps=6, ckpt_every=2, val_every=0, warmup_steps=1, lr_decay="cosine")
    cfg["loss"] = {"adversarial": 0.1, "adversarial_start": 2, "discriminator_channels": 4}
    config = write_json(tmp_path / "c.json", cfg)
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    train_autoencoder(data, tmp_path / "full", grid="tiny", config_file=config)

    class Stop(Exception):
        pass

    def stop_at_4(step, total, info):  # called after step 4's checkpoint is written
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train_autoencoder(data, tmp_path / "part", grid="tiny", config_file=config, on_step=stop_at_4)
    train_autoencoder(data, tmp_path / "part", grid="tiny", resume=True)
    a = load_file(str(list_checkpoints(tmp_path / "full")[-1] / "tensors.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "part")[-1] / "tensors.safetensors"))
    nets = [k for k in a if k.startswith("net/")]
    assert any(k.startswith("net/discriminator/") for k in nets)
    for k in nets:
        assert torch.equal(a[k], b[k]), k


class _LinearStage:
    """Least squares through one linear layer: no randomness, so what the loop does to gradients shows."""

    def __init__(self) -> None:
        self.net = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
            self.net.bias.zero_()
        self.networks = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=0.1)}
        self.dtypes: list[torch.dtype] = []  # of the layer's output, in training and validation

    def train_step(self, batch, step, backward):
        x, y = batch
        out = self.net(x)
        self.dtypes.append(out.dtype)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        backward(loss, "net")
        return {"loss": loss.item()}

    def after_step(self, step):
        return {}

    def validate(self, batches):
        out = self.net(batches[0][0])
        self.dtypes.append(out.dtype)
        return {"loss": float(torch.nn.functional.mse_loss(out.float(), batches[0][1]))}

    def extra_state(self):
        return {}, {}

    def load_extra_state(self, tensors, meta):
        pass


def _fit_linear(tmp_path, name: str, **train) -> _LinearStage:
    from synthbrain.training.config import TrainConfig
    from synthbrain.training.loop import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g)
    y = x @ torch.tensor([[1.0], [2.0], [-1.0]]) + 0.1 * torch.randn(8, 1, generator=g)
    stage = _LinearStage()
    run = tmp_path / name
    run.mkdir()
    cfg = TrainConfig(**{"steps": 6, "lr": 0.1, "ckpt_every": 100, "log_every": 1, "val_every": 3, **train})
    Trainer(stage, lambda idx: (x[idx], y[idx]), 8, [(x[:4], y[:4])], cfg, run, torch.device("cpu")).fit()
    return stage


def test_gradient_accumulation_of_two_micro_batches_equals_one_batch_of_two(tmp_path):
    """The loss is divided by grad_accum, the norm clipped (0.5, active here) after the last micro-batch,
    and the micro-batches take the next subjects of the epoch: 2 x 1 equals 1 x 2."""
    accumulated = _fit_linear(tmp_path, "accum", batch_size=1, grad_accum=2, grad_clip=0.5)
    whole = _fit_linear(tmp_path, "whole", batch_size=2, grad_accum=1, grad_clip=0.5)
    half = _fit_linear(tmp_path, "half", batch_size=1, grad_accum=1, grad_clip=0.5)
    for p, q, r in zip(accumulated.net.parameters(), whole.net.parameters(), half.net.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (p, q)
        assert not torch.allclose(p, r, atol=1e-3), "one micro-batch a step trains otherwise"
    logged = [[r["value"] for r in read_metrics(tmp_path / n / "metrics.csv") if r["name"] == "loss"]
              for n in ("accum", "whole")]
    assert logged[0] == pytest.approx(logged[1], rel=1e-5), "the logged loss is the mean over micro-batches"
    norms = [r["value"] for r in read_metrics(tmp_path / "accum" / "metrics.csv") if r["name"] == "grad_norm_net"]
    assert max(norms) > 0.5, "the clipping threshold is reached (the norm is logged before clipping)"


def test_bf16_autocast_on_the_cpu_stands_in_for_mixed_precision_on_a_gpu(tmp_path):
    """amp=bf16 runs training and validation under CPU autocast (the code path of CUDA's bf16/fp16),
    the weights stay fp32; auto and off are fp32 on the CPU; fp16 (CUDA's grad scaler) is refused."""
    from synthbrain.training.config import TrainConfig
    from synthbrain.training.loop import autocast_dtype

    bf16 = _fit_linear(tmp_path, "bf16", batch_size=2, amp="bf16")
    assert len(bf16.dtypes) == 6 + 2 and set(bf16.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16.net.parameters())
    fp32 = _fit_linear(tmp_path, "fp32", batch_size=2, amp="auto")
    assert set(fp32.dtypes) == {torch.float32}
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(bf16.net.parameters(), fp32.net.parameters()))
    assert 0 < diff < 0.05, "bf16 rounds, and trains the same model"
    assert autocast_dtype(TrainConfig(amp="off"), torch.device("cpu")) is None
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        autocast_dtype(TrainConfig(amp="fp16"), torch.device("cpu"))


def test_fine_tuning_starts_from_the_bundle_weights(tiny_bundle, tiny_cohort, tmp_path):
    """--init-from copies a bundle's network into the new run (and says so in the provenance); a
    network of another configuration or condition width is refused, naming what differs."""
    from conftest import TINY_PRIOR

    from synthbrain.bundle import load_bundle, read_config
    from synthbrain.models.autoencoder import Autoencoder
    from synthbrain.models.prior import Prior, PriorConfig
    from synthbrain.training.loop import init_from_bundle
    from synthbrain.training.prior import train_prior

    src = load_bundle(tiny_bundle)
    for name, fresh in (("prior", Prior(src.prior.config, src.prior.latent_shape, src.prior.condition_width)),
                        ("autoencoder", Autoencoder(src.autoencoder.config))):
        theirs = getattr(src, name).state_dict()
        assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in theirs.items())
        info = init_from_bundle(fresh, tiny_bundle, name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in theirs.items())
        assert info["sha256"] == read_config(tiny_bundle)[name]["sha256"]

    p = src.prior
    other = PriorConfig.from_dict({**p.config.to_dict(), "num_res_blocks": p.config.num_res_blocks + 1})
    with pytest.raises(ConfigError, match="prior is another network.*num_res_blocks"):
        init_from_bundle(Prior(other, p.latent_shape, p.condition_width), tiny_bundle, "prior")
    with pytest.raises(ConfigError, match="does not fit this run's data.*set of conditions"):
        init_from_bundle(Prior(p.config, p.latent_shape, p.condition_width + 1), tiny_bundle, "prior")

    cfg = json.loads(json.dumps(TINY_PRIOR))
    cfg["train"].update(steps=2, val_every=0)
    out = train_prior(tiny_bundle, shutil.copytree(tiny_cohort.root, tmp_path / "data"), tmp_path / "ft",
                      config_file=write_json(tmp_path / "p.json", cfg), init_from=tiny_bundle)
    assert read_config(out)["prior"]["initialised_from"]["sha256"] == read_config(tiny_bundle)["prior"]["sha256"]
    from synthbrain.model_card import write_model_card

    write_model_card(out)
    assert "- started from the prior of `bundle`" in (out / "MODEL_CARD.md").read_text()
