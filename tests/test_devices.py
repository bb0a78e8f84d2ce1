"""Device handling without a GPU: random draws that a CUDA run would refuse, ``--device`` parsing,
per-rank RNG states in checkpoints, and one ``--device`` default for every command."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import TINY_AUTOENCODER, TINY_PRIOR
from torch.overrides import TorchFunctionMode

from synthbrain.errors import ConfigError
from synthbrain.training import checkpoint as ckpt
from synthbrain.training.distributed import DistContext, pick_device, step_generator


class GeneratorDeviceCheck(TorchFunctionMode):
    """Records every call that takes a ``generator`` and fails the ones whose result is not on the
    generator's device: the rule PyTorch enforces for CUDA (a CPU generator cannot draw on a GPU) and
    does not enforce for ``meta``, which stands in for the GPU here."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[str] = []
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        g = kwargs.get("generator")
        if isinstance(g, torch.Generator):
            name = getattr(func, "__name__", str(func))
            self.draws.append(name)
            if isinstance(out, torch.Tensor) and out.device.type != g.device.type:
                self.bad.append(f"{name}: {g.device.type} generator, result on {out.device}")
        return out


def test_dead_code_restart_draws_on_the_generators_device_with_data_on_meta():
    """The autoencoder's dead-code restart (every code dead at the start) with its latent and codebook
    on ``meta``: the draw uses the training's CPU generator and is then moved, as CUDA requires."""
    from synthbrain.models.autoencoder import Autoencoder, AutoencoderConfig

    cfg = AutoencoderConfig(**{**TINY_AUTOENCODER["model"], "channels": (4, 8, 8), "num_res_channels": (4, 8, 8)})
    model = Autoencoder(cfg).to("meta")
    z = torch.empty(2, cfg.embedding_dim, 4, 6, 4, device="meta")
    check = GeneratorDeviceCheck()
    with check:
        n = model.restart_dead_codes(z, step_generator(0, 0, 0, salt=1))
    assert check.draws, "the restart drew nothing with the generator"
    assert not check.bad, check.bad
    assert n.device.type == "meta" and model.quantizer.embedding.weight.device.type == "meta"


def test_dead_code_restart_replaces_only_dead_codes():
    from synthbrain.models.autoencoder import Autoencoder, AutoencoderConfig

    cfg = AutoencoderConfig(channels=(4, 8), num_res_channels=(4, 8), num_embeddings=8, embedding_dim=3)
    model = Autoencoder(cfg)
    q = model.quantizer
    q.ema_cluster_size.data[:] = torch.tensor([0.0, 5, 0, 5, 5, 5, 0, 5])
    before = q.embedding.weight.detach().clone()
    z = torch.randn(1, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    n = model.restart_dead_codes(z, torch.Generator().manual_seed(1))
    dead = torch.tensor([True, False, True, False, False, False, True, False])
    assert int(n) == 3
    after = q.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    rows = z.movedim(1, -1).reshape(-1, 3)
    for code in after[dead]:  # each restarted code is one of the encoder outputs
        assert (rows - code).abs().sum(1).min() < 1e-6
    assert torch.all(q.ema_cluster_size[dead] == 2 * cfg.dead_code_threshold)


def test_prior_training_draws_on_the_generators_device_with_data_on_meta():
    """A prior training step (noise, timesteps, condition dropout) with every tensor on ``meta``."""
    from synthbrain.models.prior import Prior, PriorConfig
    from synthbrain.training.prior import PriorStage, PriorTraining

    model = {**TINY_PRIOR["model"], "condition_dropout": 0.5}
    cfg = PriorTraining.from_dict({"model": model})
    prior = Prior(PriorConfig.from_dict(model), latent_shape=(4, 4, 6, 4), condition_width=5)
    meta = torch.device("meta")
    stage = PriorStage(prior, cfg, 1.0, meta, DistContext())
    batch = (torch.empty(3, 4, 4, 6, 4, device=meta), torch.empty(3, 5, device=meta))
    check = GeneratorDeviceCheck()
    with check:  # what train_step computes, short of the loss's .item() (no value on meta)
        loss = stage._loss(*batch, stage.net, step_generator(0, 0, 0), cfg.model.condition_dropout)
    assert {"randn", "randint", "rand"} <= set(check.draws), check.draws
    assert not check.bad, check.bad
    assert loss.device.type == "meta"


# ------------------------------------------------------------------------------------------ --device


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend to be a machine with two GPUs (pick_device only asks torch.cuda how many there are)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("asked, dist, expected", [
    ("cuda:1", DistContext(), "cuda:1"),                 # the index is honoured
    ("cuda", DistContext(), "cuda:0"),
    ("auto", DistContext(), "cuda:0"),
    ("auto", DistContext(1, 2, 1), "cuda:1"),            # torchrun: each rank its own GPU
    ("cuda", DistContext(3, 4, 1), "cuda:1"),            # second node, local rank 1
    ("cpu", DistContext(1, 2, 1), "cpu"),
])
def test_pick_device_on_a_two_gpu_machine(two_gpus, asked, dist, expected):
    assert pick_device(asked, dist) == torch.device(expected)


@pytest.mark.parametrize("asked, dist, message", [
    ("cuda:2", DistContext(), "has 2 GPU(s)"),
    ("cuda:1", DistContext(0, 2, 0), "CUDA_VISIBLE_DEVICES"),
    ("gpu", DistContext(), "expected auto, cpu, cuda or cuda:N"),
])
def test_pick_device_refuses_what_it_cannot_honour(two_gpus, asked, dist, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pick_device(asked, dist)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", DistContext()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        pick_device("cuda:0", DistContext())


def test_every_command_defaults_to_the_same_device():
    import typer.main

    from synthbrain.cli import app

    found = {}

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")
        for p in getattr(cmd, "params", []):
            if "--device" in getattr(p, "opts", []):
                found[path.strip()] = p.default

    walk(typer.main.get_command(app), "")
    assert {"train autoencoder", "train prior", "sample", "reconstruct", "audit", "evaluate prior"} <= set(found)
    assert set(found.values()) == {"auto"}, found


# ------------------------------------------------------------------------------------ RNG per rank


def _states(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return ckpt.rng_state(torch.device("cpu"))[0]


def test_each_rank_restores_its_own_rng_state_and_a_new_rank_keeps_its_seed():
    saved = {f"rng/rank{r}/{k}": v for r in (0, 1) for k, v in _states(100 + r).items()}
    np.random.seed(7)
    random.seed(7)
    meta = json.loads(json.dumps(ckpt.rng_state()[1]))  # through JSON, as in state.json
    expected = {r: torch.rand(4, generator=torch.Generator().manual_seed(100 + r)) for r in (0, 1)}
    expected_np = np.random.rand(2)

    for r in (0, 1):  # resumed on the same number of processes
        torch.manual_seed(0)
        np.random.seed(0)
        assert ckpt.set_rng_state(saved, meta, rank=r, device=torch.device("cpu"))
        assert torch.equal(torch.rand(4), expected[r]), r
        assert np.array_equal(np.random.rand(2), expected_np)

    torch.manual_seed(5)  # resumed onto more processes: rank 2 has no saved state and keeps its own seed
    fresh = torch.rand(4, generator=torch.Generator().manual_seed(5))
    assert not ckpt.set_rng_state(saved, meta, rank=2, device=torch.device("cpu"))
    assert torch.equal(torch.rand(4), fresh)


def test_rng_state_of_a_machine_with_more_gpus_loads_on_the_cpu_and_on_fewer_gpus(monkeypatch):
    """Older checkpoints held every GPU's state under rng/cuda/<gpu> (8 GPUs here). On the CPU they load
    rank 0's CPU state and touch no GPU; on a GPU, only that GPU's own state is set, on that GPU (not
    set_rng_state_all over 8 GPUs the machine lacks). Per-rank states go to the rank's own GPU. The CUDA
    setter is recorded instead of called: this machine has no GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))
    gpu_states = {f"rng/cuda/{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(8)}
    old = {"rng/torch": _states(9)["torch"], **gpu_states}
    meta = ckpt.rng_state()[1]
    torch.manual_seed(0)
    assert ckpt.set_rng_state(old, meta, rank=0, device=torch.device("cpu"))
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(9)))
    assert calls == []

    gpu1 = torch.device("cuda", 1)
    assert ckpt.set_rng_state(old, meta, rank=0, device=gpu1)
    assert calls == [(1, gpu1)]

    calls.clear()  # per-rank states: rank 1 of a run resumed on one GPU per rank, its GPU being cuda:0
    per_rank = {f"rng/rank{r}/{k}": v for r in (0, 1) for k, v in
                {"torch": _states(r)["torch"], "cuda": torch.full((16,), 10 + r, dtype=torch.uint8)}.items()}
    assert ckpt.set_rng_state(per_rank, meta, rank=1, device=torch.device("cuda", 0))
    assert calls == [(11, torch.device("cuda", 0))]
