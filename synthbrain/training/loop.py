"""One training loop for both stages, and :func:`run_stage`, the one way either stage is run.

The loop owns what every stage shares: the data order (:class:`EpochSampler`), mixed precision
(autocast: bf16 or fp16 on CUDA, bf16 on the CPU when asked), gradient accumulation, the learning-rate
schedule, validation every N steps, the metrics log, progress through a callback, and atomic
checkpoints that restore everything (weights, optimisers, grad scaler, step, data position, every
rank's RNG state); a damaged newest checkpoint is skipped on resume (a warning through the callback)
for the one before it. A *stage* (:class:`Stage`) says what a step computes.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the stage wraps its networks in DistributedDataParallel, every
rank trains on its slice of each global batch and rank 0 alone writes logs and checkpoints. A run's
global batch is ``world_size * batch_size``: K processes of batch B train like one process of batch
K * B (up to float rounding and per-rank batch norm statistics), so a run may resume on another
number of processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from synthbrain.errors import ConfigError, TrainingDiverged
from synthbrain.training import checkpoint as ckpt
from synthbrain.training.config import TrainConfig, recorded_config_file, resolve_config
from synthbrain.training.distributed import DistContext, distributed, pick_device, unwrap
from synthbrain.training.run import MetricsLog, check_run_dir, write_run_json

OnStep = Callable[[int, int, dict], None]
# called with (step, validation metrics) after each validation; it may stop the run by raising
OnValidate = Callable[[int, dict], None]


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
    """The order of the training subjects: a seeded permutation per epoch, read as one stream. Each
    micro-batch takes the next ``world_size * size`` indices of the stream (the global batch) and each
    rank the slice at its rank, as DistributedSampler shards an epoch; the state (epoch, position in the
    stream) is the same on every rank and means the same for any number of ranks."""

    def __init__(self, n: int, seed: int, dist: DistContext) -> None:
        if n < 1:
            raise ConfigError("no training subjects")
        self.n, self.seed, self.dist = n, seed, dist
        self.epoch, self.pos = 0, 0
        self._perm = self._make()

    def _make(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _next(self) -> int:
        if self.pos >= len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make()
        i = self._perm[self.pos]
        self.pos += 1
        return i

    def batch(self, size: int) -> list[int]:
        """This rank's ``size`` indices of the next global batch."""
        every = [self._next() for _ in range(size * self.dist.world_size)]
        return every[self.dist.rank * size:(self.dist.rank + 1) * size]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._make()


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``config.amp`` on ``device`` (None: full fp32). ``auto`` is bf16 on a GPU
    that has it, else fp16, and off on the CPU; bf16 on the CPU autocasts there too."""
    if config.amp == "off" or (config.amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        if config.amp == "fp16":
            raise ConfigError(f"train.amp fp16 needs a CUDA device (its gradient scaler is CUDA's); on {device.type} "
                              "use bf16 or off")
        return torch.bfloat16
    if config.amp == "fp16" or (config.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


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
    def _backward(self, loss: torch.Tensor, optimizer: str) -> None:
        self.scaler.scale(loss / self.config.grad_accum).backward()
        self._used.add(optimizer)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

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
                    g["lr"] = lr * lr_scale(cfg, self.step)
            self._used: set[str] = set()
            sums: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                batch = self.get_batch(self.sampler.batch(cfg.batch_size))
                with self._autocast():
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
            with self._autocast():
                return self.stage.validate(self.val_batches)
        finally:
            for net in self.stage.networks.values():
                net.train()


# -- running a stage ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A training run as :func:`run_stage` hands it to a stage's set-up."""

    dir: Path
    config: Any                  # the stage's training config (AutoencoderTraining, PriorTraining, ...)
    config_file: str | None      # the absolute path of its --config, as recorded (a resume keeps the first)
    device: torch.device
    dist: DistContext


@dataclass(frozen=True)
class StageSetup:
    """What a stage gives :func:`run_stage` once the run's config, device and ranks are known."""

    info: dict                                     # run.json's entries: stage, data, subjects, ...
    prepare: Callable[[], None]                    # rank 0 alone, before any rank reads the data
    # every rank, after ``prepare``: (stage, get_batch(indices), number of training items, validation batches)
    build: Callable[[], tuple[Stage, Callable[[list[int]], Any], int, Sequence[Any]]]
    export: Callable[[Path, int, dict], None]      # rank 0 after training: (bundle folder, steps, last validation)


# model settings a fine-tuning run may change: how it samples, trains or updates its codebook, not the network
FINE_TUNABLE = frozenset({"default_steps", "default_guidance", "condition_dropout",
                          "commitment_cost", "decay", "dead_code_threshold"})


def init_from_bundle(model: torch.nn.Module, bundle: str | Path, component: str) -> dict:
    """Copy the ``component`` weights of ``bundle`` (``autoencoder`` or ``prior``) into ``model``, a new
    network of the run's configuration, so that a run fine-tunes them instead of starting from a random
    initialisation; returns what was loaded (for the provenance). Raises ``ConfigError`` naming what
    differs when the two are not the same network (configuration, other than :data:`FINE_TUNABLE`, or
    a tensor's shape: e.g. another latent shape or condition width)."""
    from synthbrain.bundle import load_bundle, read_config
    from synthbrain.errors import BundleError

    src = getattr(load_bundle(bundle, components=(component,)), component)
    if src is None:
        raise BundleError(f"{bundle}: no {component} to start from (train one, or leave out --init-from)")
    ours, theirs = model.config.to_dict(), src.config.to_dict()
    diff = sorted(k for k in (ours.keys() | theirs.keys()) - FINE_TUNABLE if ours.get(k) != theirs.get(k))
    if diff:
        what = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff)
        raise ConfigError(f"--init-from {bundle}: its {component} is another network ({what}); "
                          "train with the same model configuration")
    theirs_sd, ours_sd = src.state_dict(), model.state_dict()
    for k, v in ours_sd.items():
        if k not in theirs_sd or theirs_sd[k].shape != v.shape:
            there = tuple(theirs_sd[k].shape) if k in theirs_sd else "missing"
            raise ConfigError(f"--init-from {bundle}: its {component} does not fit this run's data "
                              f"({k}: {there} there, {tuple(v.shape)} here: another latent shape, grid "
                              "or set of conditions)")
    model.load_state_dict(theirs_sd)
    cfg = read_config(bundle)[component]
    return {"bundle": str(Path(bundle).resolve().name), "sha256": cfg.get("sha256", ""),
            "steps_trained": cfg.get("steps_trained")}


def run_stage(cls, out: str | Path, setup: Callable[[Run], StageSetup], *, steps: int | None = None,
              resume: bool = False, config_file: Path | None = None, device: str | None = None,
              on_step: OnStep | None = None, on_validate: OnValidate | None = None,
              check: Callable[[Any], None] | None = None) -> Path:
    """Train one stage into the run folder ``out`` and export ``out/bundle``; returns that folder.

    ``cls`` is the stage's training config class (``from_dict``, ``to_dict``, a ``train`` section);
    ``check(config)`` may refuse the config before any data is read or written. The run folder must fit
    ``resume``; a resumed run keeps its run.json config (``steps`` may grow). Under torchrun each rank
    takes its device and seed, rank 0 writes run.json and prepares the data while the others wait."""
    run_dir = Path(out)
    dev = pick_device(device)
    check_run_dir(run_dir, resume)
    cfg = resolve_config(run_dir, resume, config_file, {"steps": steps}, cls)
    cfg_file = recorded_config_file(run_dir, resume, config_file)
    if check is not None:
        check(cfg)
    with distributed(dev) as dist:
        if dev.type == "cuda":  # pick_device gave this rank's GPU (or the one --device names)
            torch.cuda.set_device(dev)
        torch.manual_seed(cfg.train.seed + dist.rank)
        plan = setup(Run(run_dir, cfg, cfg_file, dev, dist))
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_json(run_dir, {**plan.info, "config": cfg.to_dict(), "config_file": cfg_file,
                                     "world_size": dist.world_size})
            plan.prepare()
        dist.barrier()
        stage, get_batch, n_train, val_batches = plan.build()
        trainer = Trainer(stage, get_batch, n_train, val_batches, cfg.train, run_dir, dev, dist, on_step, on_validate)
        val = trainer.fit(resume=resume)
        bundle_dir = run_dir / "bundle"
        if dist.is_main:
            plan.export(bundle_dir, trainer.step, val)
        dist.barrier()
    return bundle_dir
