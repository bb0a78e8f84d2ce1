"""The run folder: ``run.json`` (what the run is and every command that worked on it), the metrics
log (``metrics.csv``) and the check that a folder fits ``--resume``. Rank 0 alone writes here;
checkpoints (``checkpoints/``) are :mod:`synthbrain.training.checkpoint`'s."""

from __future__ import annotations

import csv
import json
import shlex
import sys
import time
from pathlib import Path

from synthbrain.errors import ConfigError, SynthBrainError
from synthbrain.training import checkpoint as ckpt


def check_run_dir(run_dir: Path, resume: bool) -> list[Path]:
    """Refuse a run folder that does not fit ``resume``; returns its checkpoints (oldest first)."""
    found = ckpt.list_checkpoints(run_dir)
    if resume and not found:
        raise SynthBrainError(f"{run_dir}: --resume given but there is no checkpoint to resume from")
    if not resume and found:
        raise SynthBrainError(f"{run_dir} already holds checkpoints; pass --resume to continue that run "
                              "or choose another --out")
    return found


def command_line() -> str:
    return "synthbrain " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_run_json(run_dir: Path, info: dict) -> None:
    """run.json: what the run is, and every command that has worked on it (first run, resumes).
    A resumed run must see the same training and validation subjects it started with."""
    from synthbrain.io import atomic_write

    path = run_dir / "run.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("train_subjects", "val_subjects", "conditions"):
        if key in old and old[key] != json.loads(json.dumps(info.get(key))):  # as run.json holds it
            raise ConfigError(f"{run_dir}: the data's {key.replace('_', ' ')} differ from those the run started "
                              "with; resume with the same dataset, --schema and --condition options (or start a "
                              "new --out)")
    info = {**info, "command": command_line(), "commands": [*old.get("commands", []), command_line()]}
    atomic_write(path, json.dumps(info, indent=2) + "\n")


def run_commands(run_dir: Path) -> list[str]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()).get("commands", []) if path.is_file() else []


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
