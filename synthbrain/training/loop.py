"""One training loop for both stages.

The loop owns what every stage shares: the data order (a seeded permutation per epoch, sharded over
ranks, so a resumed run sees exactly the batches it would have seen), mixed precision (bf16 or fp16
autocast on CUDA, plain fp32 on the CPU), gradient accumulation, validation every N steps, a metrics
log (``metrics.csv``), progress through a callback, and atomic checkpoints that restore everything
(weights, optimisers, grad scaler, step, every RNG state); a damaged newest checkpoint is skipped on
resume (a warning through the callback) for the one before it. A *stage* says what a step computes.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the stage wraps its networks in DistributedDataParallel,
every rank trains on its shard of each epoch and rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from synthbrain.errors import ConfigError, SynthBrainError, TrainingDiverged
from synthbrain.training import checkpoint as ckpt

OnStep = Callable[[int, int, dict], None]
# called with (step, validation metrics) after each validation; it may stop the run by raising
OnValidate = Callable[[int, dict], None]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1            # per rank
    grad_accum: int = 1            # micro-batches per optimiser step
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0         # max global grad norm (0: off)
    warmup_steps: int = 0          # linear learning-rate warm-up
    lr_decay: str = "none"         # none | cosine: after the warm-up, cosine to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1
    val_every: int = 200           # steps between validations (0: never)
    ckpt_every: int = 100          # steps between checkpoints
    log_every: int = 10
    keep_checkpoints: int = 2
    val_fraction: float = 0.1      # held-out subjects
    seed: int = 0
    amp: str = "auto"              # auto | bf16 | fp16 | off (autocast only on CUDA)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"train.lr_decay must be none or cosine, got {self.lr_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"train.amp must be auto, bf16, fp16 or off, got {self.amp!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def dataclass_from_dict(cls, d: dict | None, what: str):
    """Build a frozen config dataclass from a dict, refusing unknown keys with a clear message."""
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown keys {unknown}; known: {sorted(names)}")
    for f in fields(cls):
        if f.name in d and isinstance(d[f.name], list):
            d[f.name] = tuple(d[f.name])
    return cls(**d)


def config_sections(cls, d: dict):
    """Build a stage's training config (a dataclass whose fields are config dataclasses or scalars)
    from a JSON dict: each section overrides the defaults field by field; unknown keys are refused."""
    base = cls()
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; expected {', '.join(names)}")
    values = {}
    for name in names:
        default = getattr(base, name)
        if hasattr(default, "to_dict"):
            values[name] = dataclass_from_dict(type(default), {**default.to_dict(), **d.get(name, {})}, name)
        else:
            values[name] = type(default)(d.get(name, default))
    return cls(**values)


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

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in DistributedDataParallel when there are several processes, else as it is."""
        if not self.enabled:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)


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


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "fp16" or (config.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def check_run_dir(run_dir: Path, resume: bool) -> list[Path]:
    """Refuse a run folder that does not fit ``resume``; returns its checkpoints (oldest first)."""
    found = ckpt.list_checkpoints(run_dir)
    if resume and not found:
        raise SynthBrainError(f"{run_dir}: --resume given but there is no checkpoint to resume from")
    if not resume and found:
        raise SynthBrainError(f"{run_dir} already holds checkpoints; pass --resume to continue that run "
                              "or choose another --out")
    return found


def step_generator(seed: int, rank: int, step: int, salt: int = 0) -> torch.Generator:
    """The random stream of one rank at one step: a pure function of (seed, rank, step), so a resumed
    run draws what the uninterrupted run would have, and ranks never share noise."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 31 + salt)


class Stage(Protocol):
    """What a stage of training provides to the loop."""

    networks: dict[str, torch.nn.Module]        # saved in checkpoints
    optimizers: dict[str, torch.optim.Optimizer]

    def train_step(self, batch: Any, step: int, backward: Callable[[torch.Tensor, str], None]) -> dict[str, float]:
        """Compute the losses of one micro-batch and call ``backward(loss, optimizer_name)`` for each."""

    def after_step(self, step: int) -> dict[str, float]:
        """Called after the optimisers stepped (codebook restarts, EMA, ...)."""

    def validate(self, batches: Sequence[Any]) -> dict[str, float]:
        """Metrics on held-out data (no randomness that touches the training RNG)."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON the stage needs restored on resume (its own generators, ...)."""

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


class EpochSampler:
    """Indices in a seeded permutation per epoch; each rank takes every world_size-th index."""

    def __init__(self, n: int, seed: int, dist: DistContext) -> None:
        if n < 1:
            raise ConfigError("no training subjects")
        self.n, self.seed, self.dist = n, seed, dist
        self.epoch, self.pos = 0, 0
        self._perm = self._make()

    def _make(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        shard = perm[self.dist.rank::self.dist.world_size]
        return shard or perm[: 1]

    def next(self) -> int:
        if self.pos >= len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make()
        i = self._perm[self.pos]
        self.pos += 1
        return i

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._make()


class MetricsLog:
    """Long-format CSV (step, split, name, value); rows past a resumed step are dropped first."""

    COLUMNS = ("step", "split", "name", "value", "time")

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        now = round(time.time(), 3)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in metrics.items():
                w.writerow((step, split, k, f"{float(v):.6g}", now))


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.csv`` with numbers parsed."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "split": r["split"], "name": r["name"], "value": float(r["value"])}
                for r in csv.DictReader(f)]


class Trainer:
    """Runs a stage for ``config.steps`` optimiser steps; see the module docstring."""

    def __init__(self, stage: Stage, get_batch: Callable[[list[int]], Any], n_train: int,
                 val_batches: Sequence[Any], config: TrainConfig, run_dir: Path, device: torch.device,
                 dist: DistContext | None = None, on_step: OnStep | None = None,
                 on_validate: OnValidate | None = None) -> None:
        self.stage, self.get_batch, self.val_batches = stage, get_batch, val_batches
        self.config, self.run_dir, self.device = config, Path(run_dir), device
        self.dist = dist or DistContext()
        self.on_step = on_step
        self.on_validate = on_validate
        self.sampler = EpochSampler(n_train, config.seed, self.dist)
        self.amp_dtype = autocast_dtype(config, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_payload(self, rng: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        state: dict[str, Any] = {"step": self.step, "sampler": self.sampler.state(),
                                 "scaler": self.scaler.state_dict(), "optimizers": {}, "config": self.config.to_dict()}
        for name, net in self.stage.networks.items():
            for k, v in unwrap(net).state_dict().items():
                tensors[f"net/{name}/{k}"] = v
        for name, opt in self.stage.optimizers.items():
            t, meta = ckpt.optimizer_to_flat(name, opt)
            tensors.update(t)
            state["optimizers"][name] = meta
        tensors.update(rng)
        state["rng"] = ckpt.rng_state(self.device)[1]
        state["world_size"] = self.dist.world_size
        t, meta = self.stage.extra_state()
        tensors.update({f"stage/{k}": v for k, v in t.items()})
        state["stage"] = meta
        return tensors, state

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        """Every rank's torch RNG state (and its own GPU's), as ``rng/rank<r>/torch`` / ``rng/rank<r>/cuda``:
        a collective under DDP (fixed-size uint8 tensors, gathered without pickling), so every rank calls it."""
        mine = ckpt.rng_state(self.device)[0]
        if not self.dist.enabled:
            return {f"rng/rank0/{k}": v for k, v in mine.items()}
        out = {}
        for k, v in mine.items():  # the same keys in the same order on every rank
            t = v.to(self.device)  # nccl gathers GPU tensors, gloo CPU ones
            parts = [torch.empty_like(t) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(parts, t)
            out.update({f"rng/rank{r}/{k}": part.cpu() for r, part in enumerate(parts)})
        return out

    def save(self) -> None:
        rng = self._rng_tensors()
        if self.dist.is_main:
            tensors, state = self._checkpoint_payload(rng)
            ckpt.save_checkpoint(self.run_dir, self.step, tensors, state, keep=self.config.keep_checkpoints)
        self.dist.barrier()

    def _warn(self, message: str) -> None:
        """A note for the user, through the progress callback (``info["warning"]``)."""
        if self.on_step is not None and self.dist.is_main:
            self.on_step(self.step, self.config.steps, {"warning": message})

    def restore(self, found: list[Path]) -> Path:
        """Restore the newest readable checkpoint of ``found`` (oldest first); a damaged one is
        skipped with a warning. Returns the checkpoint used."""
        path, tensors, state = ckpt.load_newest_checkpoint(found, self._warn, set_aside=self.dist.is_main)
        try:
            for name, net in self.stage.networks.items():
                prefix = f"net/{name}/"
                unwrap(net).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            for name, opt in self.stage.optimizers.items():
                ckpt.optimizer_from_flat(name, opt, tensors, state["optimizers"][name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: does not match this run's networks ({e})") from None
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(tensors, state["rng"], self.dist.rank, self.device)
        self.stage.load_extra_state({k[len("stage/"):]: v for k, v in tensors.items() if k.startswith("stage/")},
                                    state["stage"])
        self.sampler.load(state["sampler"])
        self.step = int(state["step"])
        return path

    # -- the loop ------------------------------------------------------------------------------
    def _lr_scale(self, step: int) -> float:
        return lr_scale(self.config, step)

    def _backward(self, loss: torch.Tensor, optimizer: str) -> None:
        self.scaler.scale(loss / self.config.grad_accum).backward()
        self._used.add(optimizer)

    def fit(self, resume: bool = False) -> dict[str, float]:
        cfg = self.config
        # the configured rates, read before a restore loads rates that the warm-up already scaled
        base_lrs = {n: [g["lr"] for g in o.param_groups] for n, o in self.stage.optimizers.items()}
        resume_step = None
        found = check_run_dir(self.run_dir, resume)
        if resume:
            self.restore(found)
            resume_step = self.step
        log = MetricsLog(self.run_dir / "metrics.csv", self.dist.is_main, resume_step)
        last_val: dict[str, float] = {}
        t_last, s_last = time.perf_counter(), self.step
        for net in self.stage.networks.values():
            net.train()
        while self.step < cfg.steps:
            for n, opt in self.stage.optimizers.items():
                for g, lr in zip(opt.param_groups, base_lrs[n]):
                    g["lr"] = lr * self._lr_scale(self.step)
            self._used: set[str] = set()
            sums: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                idx = [self.sampler.next() for _ in range(cfg.batch_size)]
                batch = self.get_batch(idx)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logs = self.stage.train_step(batch, self.step, self._backward)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            for name in self._used:
                opt = self.stage.optimizers[name]
                if cfg.grad_clip > 0:
                    self.scaler.unscale_(opt)
                    params = [p for g in opt.param_groups for p in g["params"]]
                    sums[f"grad_norm_{name}"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                self.scaler.step(opt)
            self.scaler.update()
            for opt in self.stage.optimizers.values():
                opt.zero_grad(set_to_none=True)
            sums.update(self.stage.after_step(self.step))
            self.step += 1
            finite = all(math.isfinite(v) for k, v in sums.items() if not k.startswith("grad_norm"))
            if self.dist.enabled:  # every rank stops together, or the others wait forever in the next all-reduce
                flag = torch.tensor([float(finite)], device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                finite = bool(flag.item())
            if not finite:
                raise TrainingDiverged(f"training diverged at step {self.step}: {sums}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                sums["steps_per_s"] = (self.step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, self.step
                log.write(self.step, "train", sums)
            if self.val_batches and cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                last_val = self._validate()
                log.write(self.step, "val", last_val)
                if self.on_validate is not None:  # on every rank: a tuner's pruning decision is collective
                    self.on_validate(self.step, last_val)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
            if self.on_step is not None and self.dist.is_main:
                info = {k: v for k, v in sums.items() if k in ("loss", "steps_per_s")}
                info.update({f"val_{k}": v for k, v in last_val.items() if k in ("psnr", "loss")})
                self.on_step(self.step, cfg.steps, info)
        return last_val

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        for net in self.stage.networks.values():
            net.eval()
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                return self.stage.validate(self.val_batches)
        finally:
            for net in self.stage.networks.values():
                net.train()


def lr_scale(config: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine decay to
    ``min_lr_ratio`` at ``config.steps`` (a run extended with ``--resume --steps`` decays over the new length)."""
    w = config.warmup_steps
    if w > 0 and step < w:
        return (step + 1) / w
    if config.lr_decay == "none" or config.steps <= w:
        return 1.0
    progress = min(1.0, (step - w) / (config.steps - w))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def load_config_file(path: Path | None) -> dict:
    """A JSON training config (``--config``): {"train": {...}, "model": {...}, "loss": {...}}."""
    if path is None:
        return {}
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return d
