"""Sharded sampling: `torchrun -m synthbrain sample` over 2 gloo processes writes the dataset one process writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

from synthbrain.bundle import load_bundle
from synthbrain.data.bids import read_tsv
from synthbrain.io import read_volume
from synthbrain.sampling import Generator, sample_dataset, shard

ARGS = ["--age", "71", "--sex", "F", "-n", "5", "--seed", "3", "--steps", "2", "--device", "cpu"]


@pytest.mark.parametrize("n, batch, world", [(5, 4, 2), (1, 4, 3), (9, 2, 4), (12, 4, 3), (7, 1, 2)])
def test_every_subject_is_in_exactly_one_shard_in_whole_batches(n, batch, world):
    shards = [shard(n, batch, r, world) for r in range(world)]
    indices = sorted(i for s in shards for b in s for i in b)
    assert indices == list(range(n))
    single = shard(n, batch)
    assert sorted((b for s in shards for b in s), key=lambda b: b.start) == single  # the batches one process makes


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _torchrun(bundle, out: Path):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "synthbrain", "sample", "--bundle", str(bundle), "--out", str(out), *ARGS],
                          capture_output=True, text=True, env=subprocess_env())


def _one_process(bundle, out: Path) -> None:
    """What ``synthbrain sample`` with ARGS writes in one process (here, to spare a start-up)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: bit-equality holds per thread count
    try:
        sample_dataset(Generator(load_bundle(bundle), device="cpu"), out, {"age": 71, "sex": "F"}, n=5, seed=3,
                       steps=2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_ranks_write_the_dataset_one_process_writes(tiny_bundle, tmp_path):
    one = tmp_path / "one"
    _one_process(tiny_bundle, one)
    two = tmp_path / "two"
    r = _torchrun(tiny_bundle, two)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote 5 synthetic brains") == 1 and "2 processes" in r.stdout  # rank 0 alone speaks

    files = _files(one)
    assert files == _files(two)
    niftis = [f for f in files if f.endswith(".nii.gz")]
    assert len(niftis) == 5 and len({f.split("/")[0] for f in niftis}) == 5
    for f in niftis:  # rank 0 made subjects 1-4 (one batch), rank 1 subject 5: bit for bit the same brains
        assert np.array_equal(read_volume(one / f).data, read_volume(two / f).data), f
        side = f.replace(".nii.gz", ".json")
        assert json.loads((one / side).read_text()) == json.loads((two / side).read_text())
    for f in ("participants.tsv", "participants.json", "dataset_description.json"):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    rows = read_tsv(two / "participants.tsv")
    assert [row["seed"] for row in rows] == ["3", "4", "5", "6", "7"]
    assert [row["participant_id"] for row in rows] == [f"sub-synth{i:04d}" for i in range(1, 6)]

    # a rank that fails leaves no dataset that looks complete, not even the one the folder held
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("participants.tsv", "dataset_description.json"):
        (bad / f).write_bytes((one / f).read_bytes())
    (bad / niftis[-1]).mkdir(parents=True)  # rank 1's only subject cannot be written
    r = _torchrun(tiny_bundle, bad)
    assert r.returncode != 0
    assert "IsADirectoryError" in r.stderr + r.stdout
    assert not (bad / "participants.tsv").exists() and not (bad / "dataset_description.json").exists()
