"""Crash-safe training: checkpoints carry the sha256 of their files; on resume a damaged newest
checkpoint is skipped with a warning (through the progress callback), set aside, and the one before it
resumes the run to the weights of the uninterrupted run; a full disk while writing a checkpoint is one
line and exit code 2 from the CLI, and leaves the previous checkpoint usable."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import TINY_AUTOENCODER, write_json
from safetensors.torch import load_file

from synthbrain.testing import CHECKPOINT_DAMAGE
from synthbrain.training import checkpoint as ckpt
from synthbrain.training.autoencoder import train_autoencoder
from synthbrain.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cohort):
    """A 6-step run, and the same run stopped after 4 steps (checkpoints at 2 and 4)."""
    base = tmp_path_factory.mktemp("ckpt_runs")
    data = shutil.copytree(tiny_cohort.root, base / "data")
    cfg = json.loads(json.dumps(TINY_AUTOENCODER))
    cfg["train"].update(steps=6, ckpt_every=2, val_every=0)
    config = write_json(base / "c.json", cfg)
    train_autoencoder(data, base / "full", grid="tiny", config_file=config)
    train_autoencoder(data, base / "part", grid="tiny", steps=4, config_file=config)
    return base


def _weights(run):
    t = load_file(str(list_checkpoints(run)[-1] / "tensors.safetensors"))
    return {k: v for k, v in t.items() if k.startswith("net/")}


def test_a_checkpoint_lists_the_sha256_of_its_files(runs):
    import hashlib

    newest = list_checkpoints(runs / "part")[-1]
    listed = json.loads((newest / "checksums.json").read_text())
    assert listed == {name: hashlib.sha256((newest / name).read_bytes()).hexdigest()
                      for name in ("tensors.safetensors", "state.json")}
    assert ckpt.verify_checkpoint(newest)


@pytest.mark.parametrize("how", list(CHECKPOINT_DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, how):
    run = shutil.copytree(runs / "part", tmp_path / "run")
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step-0000004"
    CHECKPOINT_DAMAGE[how](newest)
    with pytest.raises(CheckpointError, match="step-0000004"):
        load_checkpoint(newest)
    warnings = []
    train_autoencoder(runs / "data", run, grid="tiny", steps=6, resume=True,
                      on_step=lambda i, n, info: "warning" in info and warnings.append(info["warning"]))
    assert len(warnings) == 1
    assert warnings[0].startswith("skipped checkpoint step-0000004") and "resuming from step-0000002" in warnings[0]
    mine, want = _weights(run), _weights(runs / "full")
    assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want)


def test_a_damaged_checkpoint_is_set_aside_and_not_counted_when_pruning(runs, tmp_path):
    """Checkpoints 4 and 6, 6 damaged, resumed to step 5 (keep 2): 6 is renamed out of the way, so saving 5
    keeps 4 and 5 (were 6 still counted, 4 would be pruned, leaving 5 and the damaged 6)."""
    run = shutil.copytree(runs / "full", tmp_path / "run")
    assert [p.name for p in list_checkpoints(run)] == ["step-0000004", "step-0000006"]
    CHECKPOINT_DAMAGE["one bit flipped"](run / "checkpoints" / "step-0000006")
    warnings = []
    train_autoencoder(runs / "data", run, grid="tiny", steps=5, resume=True,
                      on_step=lambda i, n, info: "warning" in info and warnings.append(info["warning"]))
    assert warnings == [warnings[0]] and "set aside as .damaged-step-0000006" in warnings[0]
    assert [p.name for p in list_checkpoints(run)] == ["step-0000004", "step-0000005"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        ".damaged-step-0000006", "step-0000004", "step-0000005"]
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(run / "checkpoints" / ".damaged-step-0000006")  # kept for a look, not resumed from
    assert load_checkpoint(list_checkpoints(run)[-1])[1]["step"] == 5


def test_a_folder_sync_failing_after_the_rename_says_the_checkpoint_was_written(tmp_path, monkeypatch):
    real = ckpt._fsync_dir

    def failing(path):
        if path.name == "checkpoints":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path)

    monkeypatch.setattr(ckpt, "_fsync_dir", failing)
    with pytest.raises(CheckpointError, match="step-0000003 was written, but the folder could not be synced"):
        ckpt.save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"step": 3})
    tensors, state = load_checkpoint(tmp_path / "checkpoints" / "step-0000003")
    assert state["step"] == 3 and torch.equal(tensors["w"], torch.ones(2))


def test_no_readable_checkpoint_is_one_error_naming_each(runs, tmp_path):
    run = shutil.copytree(runs / "part", tmp_path / "run")
    for c in list_checkpoints(run):
        (c / "tensors.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as e:
        train_autoencoder(runs / "data", run, grid="tiny", steps=6, resume=True)
    assert "step-0000002" in str(e.value) and "step-0000004" in str(e.value)


def test_a_full_disk_is_one_line_exit_2_and_the_previous_checkpoint_resumes(runs, tmp_path, monkeypatch, capsys):
    """ENOSPC from the writer of the second checkpoint, through the real CLI entry point in this process."""
    from synthbrain.cli import main

    real_save, calls = ckpt.save_file, []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # a partial file, as a full disk leaves it
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["synthbrain", "train", "autoencoder", "--data", str(runs / "data"), "--out",
                                      str(run), "--grid", "tiny", "--config", str(runs / "c.json"), "--device", "cpu"])
    assert main() == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"synthbrain: error: {run / 'checkpoints'}: cannot write checkpoint step-0000004 (the disk is "
                   "full); step-0000002 is kept"]
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt, "save_file", real_save)
    train_autoencoder(runs / "data", run, grid="tiny", resume=True)
    mine, want = _weights(run), _weights(runs / "full")
    assert all(torch.equal(mine[k], want[k]) for k in want)
