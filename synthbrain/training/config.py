"""Training configs: the loop's settings (:class:`TrainConfig`), stage configs built section by section
from JSON (``--config``), and the config of a resumed run (the one it started with)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from synthbrain.errors import ConfigError


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
    amp: str = "auto"              # auto | bf16 | fp16 | off: autocast; auto is bf16/fp16 on CUDA, off on the CPU

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


def resolve_config(run_dir: Path, resume: bool, config_file: Path | None, overrides: dict[str, Any], cls):
    """The run's config (a ``cls``: AutoencoderTraining, PriorTraining): a resumed run keeps the one in
    its run.json (only ``train`` fields given in ``overrides``, such as ``steps``, may change)."""
    saved = run_dir / "run.json"
    if resume and saved.is_file():
        cfg = cls.from_dict(json.loads(saved.read_text())["config"])
        if config_file is not None:
            raise ConfigError("--config cannot change a resumed run; it keeps the config in run.json")
    else:
        cfg = cls.from_dict(load_config_file(config_file))
    train = replace(cfg.train, **{k: v for k, v in overrides.items() if v is not None})
    return replace(cfg, train=train)


def recorded_config_file(run_dir: Path, resume: bool, config_file: Path | None) -> str | None:
    """The absolute path of the run's ``--config`` (a resumed run keeps the one it started with): the
    bundle records it, so that the app finds a tuning summary beside it whatever the working folder."""
    if config_file is not None:
        return str(Path(config_file).expanduser().resolve())
    path = run_dir / "run.json"
    return json.loads(path.read_text()).get("config_file") if resume and path.is_file() else None
