"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``checkpoints/step-000123/`` holding ``tensors.safetensors`` (network
weights, optimiser moments, RNG states), ``state.json`` (step, optimiser hyper-parameters, grad
scaler, numpy / Python RNG states, the loop's position in the data) and ``checksums.json`` (the
sha256 of the other two). It is written into a hidden temporary folder, fsynced and renamed into
place, so a run killed at any moment leaves either the complete checkpoint or none; the newest
``keep`` checkpoints are kept. A checkpoint damaged later (a truncated copy, flipped bits, another
file put in its place) fails its checksums when it is read, and the loop falls back to an older one;
the damaged one is set aside as ``checkpoints/.damaged-step-000123`` (no longer a checkpoint of the run,
so it is neither resumed from nor counted when old checkpoints are pruned).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from synthbrain.bundle import sha256_file
from synthbrain.errors import SynthBrainError

PREFIX = "step-"
DAMAGED = ".damaged-"
CHECKSUMS = "checksums.json"
FILES = ("tensors.safetensors", "state.json")


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
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    A failed write (a full disk, a folder that became read-only) raises :class:`CheckpointError`
    and leaves the checkpoints written before it as they were."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp-{uuid.uuid4().hex}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / FILES[0]))
        (tmp / FILES[1]).write_text(json.dumps(state, indent=1))
        (tmp / CHECKSUMS).write_text(json.dumps({name: sha256_file(tmp / name) for name in FILES}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(run_dir) if p != final]
        kept = f"; {previous[-1]} is kept" if previous else ""
        what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"{ckpt_root}: cannot write checkpoint {final.name} ({what}){kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:  # the rename itself made durable; the checkpoint is complete and in place either way
        _fsync_dir(ckpt_root)
    except OSError as e:
        raise CheckpointError(f"{ckpt_root}: checkpoint {final.name} was written, but the folder could not be "
                              f"synced to disk ({e.strerror or e}); a power failure now may lose it") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> bool:
    """Check a checkpoint's files against its ``checksums.json``; raises :class:`CheckpointError` if
    they differ. Returns False for a checkpoint written before checksums existed (nothing to check)."""
    path = Path(path)
    listed = path / CHECKSUMS
    if not listed.is_file():
        return False
    try:
        want = json.loads(listed.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable {CHECKSUMS} ({e})") from None
    if not isinstance(want, dict) or any(not isinstance(want.get(name), str) for name in FILES):
        raise CheckpointError(f"{path.name}: {CHECKSUMS} does not list {', '.join(FILES)}")
    for name in FILES:
        try:
            got = sha256_file(path / name)
        except OSError as e:
            raise CheckpointError(f"{path.name}/{name}: cannot read ({e.strerror or e})") from None
        if got != want[name]:
            size = (path / name).stat().st_size
            raise CheckpointError(f"{path.name}/{name}: checksum mismatch ({size:,} bytes; damaged or replaced)")
    return True


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and state of a checkpoint whose checksums match; :class:`CheckpointError` otherwise."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        tensors = load_file(str(path / FILES[0]))
        state = json.loads((path / FILES[1]).read_text())
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{path.name}: cannot read checkpoint ({' '.join(str(e).split())})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path.name}/{FILES[1]}: not a checkpoint state")
    return tensors, state


def load_newest_checkpoint(found: list[Path], on_skip: Callable[[str], None] | None = None,
                           set_aside: bool = True) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The newest readable checkpoint of ``found`` (oldest first): a damaged one is skipped, with
    its reason passed to ``on_skip(message)``, and the one before it is tried. Once one is read, the
    damaged newer ones are renamed ``.damaged-step-N`` (``set_aside``; under DDP only rank 0 renames):
    left in place, they would count among the ``keep`` newest and the next save would prune a good one.
    If none is readable, nothing is renamed and the error names each."""
    problems: list[tuple[Path, CheckpointError]] = []
    for path in reversed(found):
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            problems.append((path, e))
            continue
        for bad, e in problems:
            note = ""
            if set_aside:
                note = _set_aside(bad)
            if on_skip is not None:
                on_skip(f"skipped checkpoint {e}{note}; resuming from {path.name}")
        return (path, *loaded)
    where = found[-1].parent if found else "checkpoints"
    reasons = "; ".join(str(e) for _, e in problems)
    raise CheckpointError(f"{where}: no readable checkpoint to resume from ({reasons})")


def _set_aside(path: Path) -> str:
    """Rename a damaged checkpoint out of the run's checkpoints (an older damaged copy of that step is
    replaced); returns the note for the warning."""
    target = path.with_name(DAMAGED + path.name)
    try:
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
    except OSError as e:
        return f" (could not be set aside: {e.strerror or e})"
    return f" (set aside as {target.name})"
