"""BIDS datasets on a copy of the phantom cohort: items, the preprocessing cache, errors that name the
subject, the train/validation split, and TSV reading/writing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from synthbrain.conditions import DEFAULT_SCHEMA
from synthbrain.data.bids import (
    BIDSDataset,
    derivative_path,
    read_tsv,
    schema_for_dataset,
    split_subjects,
    tsv_text,
)
from synthbrain.data.preprocess import preprocess
from synthbrain.errors import DatasetError
from synthbrain.grids import DEMO, get_grid
from synthbrain.io import read_volume, sidecar_path


def _cache(cohort, label: str):
    return (cohort.root / "derivatives" / "synthbrain" / label / "anat"
            / f"{label}_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz")


def _edit_participants(cohort, label: str, column: str, value: str) -> None:
    rows = read_tsv(cohort.root / "participants.tsv")
    for row in rows:
        if row["participant_id"] == label:
            row[column] = value
    (cohort.root / "participants.tsv").write_text(tsv_text(rows, list(rows[0])))


# -------------------------------------------------------------------------------------- dataset


def test_items_are_preprocessed_volumes_with_condition_vectors(cohort_copy):
    ds = BIDSDataset(cohort_copy.root, grid="demo")
    assert len(ds) == cohort_copy.n
    assert ds.labels == cohort_copy.labels
    rows = cohort_copy.participants()
    for i in (0, len(ds) - 1):
        volume, cond = ds[i]
        assert isinstance(volume, torch.Tensor) and volume.shape == (1, *DEMO.shape)
        assert volume.dtype == torch.float32
        assert volume.min() >= 0.0 and volume.max() == 1.0
        assert cond.shape == (DEFAULT_SCHEMA.width,) == (4,) and cond.dtype == torch.float32
        assert torch.all((cond >= 0) & (cond <= 1))
        # the vector holds this subject's own values
        assert DEFAULT_SCHEMA.decode(cond.numpy())["sex"] == rows[i]["sex"]
        assert cond[0].item() == pytest.approx((float(rows[i]["age"]) - 40.0) / 50.0, abs=1e-6)
        # and the volume is what preprocessing makes of its T1w
        expected, _ = preprocess(read_volume(cohort_copy.t1w(ds.labels[i])), DEMO)
        np.testing.assert_array_equal(volume[0].numpy(), expected.data)


def test_subjects_restricts_the_dataset(cohort_copy):
    ds = BIDSDataset(cohort_copy.root, subjects=["sub-0002", "0005"])
    assert ds.labels == ["sub-0002", "sub-0005"]
    with pytest.raises(DatasetError, match="no subjects match"):
        BIDSDataset(cohort_copy.root, subjects=["sub-0099"])


def test_preprocessed_volume_is_cached_as_a_bids_derivative(cohort_copy):
    ds = BIDSDataset(cohort_copy.root)
    label = ds.labels[1]
    cache = _cache(cohort_copy, label)
    assert derivative_path(cohort_copy.root, label, DEMO) == cache
    assert not cache.exists()  # nothing happens before first access

    first = ds.volume(1)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    sidecar = json.loads(sidecar_path(cache).read_text())
    assert sidecar["Sources"] == [f"{label}/anat/{label}_T1w.nii.gz"]
    assert sidecar["SpatialReference"] == "MNI152NLin2009aSym" and sidecar["grid"] == "demo"
    assert sidecar["intensity_scale"] > 0

    # a second access, and a new dataset object, read the cache instead of preprocessing again
    np.testing.assert_array_equal(ds.volume(1), first)
    np.testing.assert_array_equal(BIDSDataset(cohort_copy.root).volume(1), first)
    assert cache.stat().st_mtime_ns == stamp
    assert {p.name for p in cache.parent.iterdir()} == {cache.name, sidecar_path(cache).name}


def test_changed_source_is_preprocessed_again(cohort_copy):
    ds = BIDSDataset(cohort_copy.root)
    ds.volume(0)
    cache = _cache(cohort_copy, ds.labels[0])
    stamp = cache.stat().st_mtime_ns
    t1w = cohort_copy.t1w(ds.labels[0])
    os.utime(t1w, ns=(t1w.stat().st_atime_ns, t1w.stat().st_mtime_ns + 10**9))  # the scan was replaced
    ds.volume(0)
    assert cache.stat().st_mtime_ns != stamp


def test_prepare_preprocesses_every_subject_and_reports_progress(cohort_copy):
    ds = BIDSDataset(cohort_copy.root, subjects=cohort_copy.labels[:2])
    steps = []
    ds.prepare(on_step=lambda i, n, info: steps.append((i, n, info["subject"])))
    assert steps == [(1, 2, "sub-0001"), (2, 2, "sub-0002")]
    assert all(_cache(cohort_copy, label).is_file() for label in cohort_copy.labels[:2])
    assert not _cache(cohort_copy, cohort_copy.labels[2]).exists()


def test_preprocess_jobs_write_what_one_process_writes(tiny_cohort, tmp_path, pool_tasks):
    import shutil

    from typer.testing import CliRunner

    from synthbrain.cli import app
    from synthbrain.data import bids

    labels = tiny_cohort.labels[:3]
    serial = shutil.copytree(tiny_cohort.root, tmp_path / "serial")
    parallel = shutil.copytree(tiny_cohort.root, tmp_path / "parallel")
    rows = (parallel / "participants.tsv").read_text().splitlines(keepends=True)
    (parallel / "participants.tsv").write_text("".join(rows[:4]))  # the header and the first 3 subjects
    BIDSDataset(serial, grid="tiny", subjects=labels).prepare()
    pool_tasks.watch(bids)
    result = CliRunner().invoke(app, ["preprocess", str(parallel), "--grid", "tiny", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(pool_tasks) == [(2, label) for label in labels]  # each subject in a pool of 2 workers
    grid = get_grid("tiny")
    for label in labels:
        a, b = derivative_path(serial, label, grid), derivative_path(parallel, label, grid)
        assert a.read_bytes() == b.read_bytes()
        assert json.loads(sidecar_path(a).read_text()) == json.loads(sidecar_path(b).read_text())
    with pytest.raises(DatasetError, match="--jobs"):
        BIDSDataset(parallel, grid="tiny").prepare(jobs=0)


def test_fingerprint_changes_with_the_data(cohort_copy):
    ds = BIDSDataset(cohort_copy.root)
    fp = ds.fingerprint()
    assert fp["subjects"] == cohort_copy.n and fp["grid"] == "demo"
    assert fp == BIDSDataset(cohort_copy.root).fingerprint()
    fewer = BIDSDataset(cohort_copy.root, subjects=cohort_copy.labels[:3])
    assert fewer.fingerprint()["sha256"] != fp["sha256"]
    _edit_participants(cohort_copy, "sub-0003", "age", "77.0")
    assert BIDSDataset(cohort_copy.root).fingerprint()["sha256"] != fp["sha256"]


# --------------------------------------------------------------------------------------- errors


def test_missing_t1w_names_the_subject(cohort_copy):
    cohort_copy.t1w("sub-0003").unlink()
    with pytest.raises(DatasetError, match=r"^sub-0003: no T1w image"):
        BIDSDataset(cohort_copy.root)


@pytest.mark.parametrize("column, value, fragment", [
    ("age", "n/a", "no value for 'age'"),
    ("age", "", "no value for 'age'"),
    ("sex", "n/a", "no value for 'sex'"),
    ("age", "120", "40..90 years"),
    ("brain_volume", "big", "not a number"),
    ("sex", "X", "one of F, M"),
])
def test_bad_participant_value_names_the_subject_and_column(cohort_copy, column, value, fragment):
    _edit_participants(cohort_copy, "sub-0004", column, value)
    with pytest.raises(DatasetError) as err:
        BIDSDataset(cohort_copy.root)
    message = str(err.value)
    assert message.startswith("sub-0004: ")
    assert column in message and fragment in message


def test_missing_column_is_named(cohort_copy):
    rows = read_tsv(cohort_copy.root / "participants.tsv")
    columns = [c for c in rows[0] if c != "ventricular_volume"]
    (cohort_copy.root / "participants.tsv").write_text(tsv_text(rows, columns))
    with pytest.raises(DatasetError, match="no 'ventricular_volume' column"):
        BIDSDataset(cohort_copy.root)


@pytest.mark.parametrize("damage, fragment", [
    (lambda root: (root / "participants.tsv").unlink(), "participants.tsv: file not found"),
    (lambda root: (root / "participants.tsv").write_text("participant_id\tage\n"), "no rows"),
], ids=["no participants.tsv", "header only"])
def test_broken_participants_table(cohort_copy, damage, fragment):
    damage(cohort_copy.root)
    with pytest.raises(DatasetError, match=fragment):
        BIDSDataset(cohort_copy.root)


def test_unreadable_t1w_names_the_subject_and_the_file(cohort_copy):
    t1w = cohort_copy.t1w("sub-0002")
    t1w.write_bytes(t1w.read_bytes()[:1000])
    ds = BIDSDataset(cohort_copy.root)  # construction does not read images
    with pytest.raises(DatasetError, match=r"^sub-0002: sub-0002_T1w\.nii\.gz: .*truncated"):
        ds.volume(1)
    assert not _cache(cohort_copy, "sub-0002").exists()


def test_not_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        BIDSDataset(tmp_path / "absent")


def test_schema_for_dataset_spans_its_participants(cohort_copy):
    schema = schema_for_dataset(cohort_copy.root, ["diagnosis"])
    assert schema.names == DEFAULT_SCHEMA.names + ["diagnosis"]
    ds = BIDSDataset(cohort_copy.root, schema=schema)  # every subject's values are inside the ranges
    ages = [float(r["age"]) for r in cohort_copy.participants()]
    assert schema["age"].low <= min(ages) and max(ages) <= schema["age"].high
    assert schema["age"].high - schema["age"].low < max(ages) - min(ages) + 2
    assert ds.conditions(0).shape == (schema.width,)


# ---------------------------------------------------------------------------------------- split

LABELS = [f"sub-{i:04d}" for i in range(200)]


@pytest.mark.parametrize("labels, fraction", [(LABELS[:6], 0.1), (LABELS[:20], 0.25), (LABELS, 0.1)])
def test_split_is_deterministic_and_disjoint(labels, fraction):
    train, val = split_subjects(labels, fraction, seed=1)
    assert (train, val) == split_subjects(list(labels), fraction, seed=1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(labels)
    assert train and val
    assert train == [s for s in labels if s in set(train)]  # in the dataset's order


def test_split_depends_on_the_seed():
    assert split_subjects(LABELS, 0.2, seed=1) != split_subjects(LABELS, 0.2, seed=2)


def test_split_holds_out_about_the_fraction_asked_for():
    labels = [f"sub-{i:05d}" for i in range(2000)]
    _, val = split_subjects(labels, 0.2, seed=0)
    assert len(val) == pytest.approx(400, abs=60)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("n_before, n_after", [(200, 300), (100, 101), (60, 200)])
def test_split_is_stable_when_subjects_are_added(seed, n_before, n_after):
    # a subject must never change sides: a validation subject must not be trained on later, and a
    # training subject must not leak into validation
    labels = [f"sub-{i:04d}" for i in range(n_after)]
    train, val = split_subjects(labels[:n_before], 0.2, seed=seed)
    train2, val2 = split_subjects(labels, 0.2, seed=seed)
    assert set(val) <= set(val2)
    assert set(train) <= set(train2)


@pytest.mark.parametrize("labels, fraction, min_val, fragment", [
    (["sub-01"], 0.1, 1, "too few"),
    (["sub-01", "sub-02"], 0.1, 2, "too few"),
    (LABELS, 1.0, 1, r"\[0, 1\)"),
    (LABELS, -0.1, 1, r"\[0, 1\)"),
])
def test_split_refuses_impossible_requests(labels, fraction, min_val, fragment):
    with pytest.raises(DatasetError, match=fragment):
        split_subjects(labels, fraction, min_val=min_val)


def test_split_with_no_validation():
    assert split_subjects(LABELS[:5], 0.0) == (LABELS[:5], [])


@pytest.mark.parametrize("n, min_val", [(2, 1), (6, 1), (10, 3)])
def test_small_split_holds_out_min_val(n, min_val):
    train, val = split_subjects(LABELS[:n], 0.01, min_val=min_val)
    assert len(val) == min_val and len(train) == n - min_val


# ------------------------------------------------------------------------------------------ TSV


def test_tsv_round_trip(tmp_path):
    rows = [{"participant_id": "sub-01", "age": 61.0, "volume": np.float32(12.3456), "site": None},
            {"participant_id": "sub-02", "age": 70, "volume": 1.0, "site": "Leeds"}]
    text = tsv_text(rows, ["participant_id", "age", "volume", "site"])
    assert text.splitlines()[1] == "sub-01\t61.00\t12.35\tn/a"
    (tmp_path / "t.tsv").write_text(text)
    back = read_tsv(tmp_path / "t.tsv")
    assert back == [{"participant_id": "sub-01", "age": "61.00", "volume": "12.35", "site": "n/a"},
                    {"participant_id": "sub-02", "age": "70", "volume": "1.00", "site": "Leeds"}]
