"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``checkpoints/step-000123/`` holding ``tensors.safetensors`` (network
weights, optimiser moments, RNG states) and ``state.json`` (step, optimiser hyper-parameters, grad
scaler, numpy / Python RNG states, the loop's position in the data). It is written into a hidden
temporary folder, fsynced and renamed into place, so a run killed at any moment leaves either the
complete checkpoint or none; the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from synthbrain.errors import SynthBrainError

PREFIX = "step-"


class CheckpointError(SynthBrainError):
    """A checkpoint that cannot be read or does not match the run."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    found = [p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "state.json").is_file() and (p / "tensors.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def optimizer_to_flat(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state dict into tensors (for safetensors) and JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{name}/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim/{name}/"
    for key, v in tensors.items():
        if key.startswith(prefix):
            pid, k = key[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: the torch CPU generator and, on a GPU, that one GPU's generator
    (``torch`` and ``cuda`` tensors, uint8), numpy's and Python's (JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _listify(random.getstate())}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, rank: int = 0,
                  device: torch.device | None = None) -> bool:
    """Restore the RNG states that rank ``rank`` saved (``rng/rank<r>/torch``, ``rng/rank<r>/cuda``).

    A run resumed onto a different number of processes restores what exists: a rank the checkpoint has
    no state for keeps its fresh seed (returns False). A CUDA state goes to this rank's own GPU only, so
    a checkpoint from a machine with more GPUs loads on one with fewer. Checkpoints from before per-rank
    states (``rng/torch`` and ``rng/cuda/<gpu>``) restore rank 0's state, as they always did."""
    own = f"rng/rank{rank}/"
    cuda_here = device is not None and device.type == "cuda"
    if own + "torch" in tensors:
        torch.set_rng_state(tensors[own + "torch"])
        cuda = tensors.get(own + "cuda")
    elif "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
        cuda = tensors.get(f"rng/cuda/{device.index or 0}") if cuda_here else None
    else:
        return False
    if cuda is not None and cuda_here:
        torch.cuda.set_rng_state(cuda, device)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_tuplify(meta["python"]))
    return True


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = load_file(str(Path(path) / "tensors.safetensors"))
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e
    return tensors, state
