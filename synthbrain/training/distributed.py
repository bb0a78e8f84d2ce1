"""The distributed context of a training (or sampling) process: torchrun's ranks, the process group
(nccl on GPUs, gloo on the CPU), this process's device, collectives that never pickle, and the
per-rank random streams.

One process is a world of size 1: every collective here is then a no-op, so the stages and the loop
call them unconditionally.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from synthbrain.errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistContext:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather_json(self, obj: Any, device: torch.device) -> list:
        """``obj`` (JSON-able) of every rank, in rank order; a collective, so every rank calls it. Sent as
        UTF-8 JSON in uint8 tensors, never pickled (``device``: a GPU under nccl, the CPU under gloo)."""
        from synthbrain.io import json_default

        payload = json.dumps(obj, default=json_default).encode()
        if not self.enabled:
            return [json.loads(payload)]
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        size = torch.tensor([data.numel()], dtype=torch.long, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, size)
        padded = torch.zeros(max(int(s) for s in sizes), dtype=torch.uint8, device=device)
        padded[: data.numel()] = data
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return [json.loads(p[: int(s)].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (the same shape on each) concatenated along dim 0 in rank order: the
        global batch, as one process with ``world_size`` times the batch would hold it. A collective."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in DistributedDataParallel when there are several processes, else as it is."""
        if not self.enabled:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[DistContext]:
    """Initialise torch.distributed from torchrun's environment (nccl on GPUs, gloo on CPU)."""
    ctx = DistContext.from_env()
    if not ctx.enabled or torch.distributed.is_initialized():  # one process, or a group its caller owns (tune)
        yield ctx
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    try:
        yield ctx
    finally:
        torch.distributed.destroy_process_group()


def pick_device(device: str | torch.device | None = None, dist: DistContext | None = None) -> torch.device:
    """The device of this process for ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...).

    ``auto`` (or None) is a GPU when there is one, else the CPU. ``cuda`` / ``auto`` on a GPU mean
    ``cuda:LOCAL_RANK``: each torchrun process its own GPU (``cuda:0`` alone). An explicit ``cuda:N`` is
    honoured in a single process; under torchrun with several processes it is refused (they would all
    share GPU N; ``CUDA_VISIBLE_DEVICES`` chooses the GPUs). ``dist`` defaults to torchrun's environment."""
    dist = dist or DistContext.from_env()
    name = str(device) if device is not None else "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if dev.index is None:
        dev = torch.device("cuda", dist.local_rank)
    elif dist.enabled:
        raise ConfigError(f"--device {name} names one GPU, but torchrun started {dist.world_size} processes: each "
                          "takes cuda:LOCAL_RANK; pass --device cuda (or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    if dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {dev}: this machine has {torch.cuda.device_count()} GPU(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def step_generator(seed: int, rank: int, step: int, salt: int = 0) -> torch.Generator:
    """The random stream of one rank at one step: a pure function of (seed, rank, step), so a resumed
    run draws what the uninterrupted run would have. The stages draw a step's noise for the global
    batch from rank 0's stream and each rank takes its slice: ranks never share noise, and a run's
    draws do not depend on how many processes share its global batch."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 31 + salt)
