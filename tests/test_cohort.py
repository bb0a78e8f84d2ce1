"""The phantom cohort: a valid BIDS dataset, true volumes that match its label maps, determinism by
seed, and the documented ageing (ventricles grow, brains shrink)."""

from __future__ import annotations

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest

from synthbrain.data.cohort import (
    DIAGNOSES,
    DSEG_LABELS,
    PARTICIPANT_COLUMNS,
    expected_brain_loss,
    expected_log_ventricle_ratio,
    generate_cohort,
    render_subject,
    sample_subject,
)
from synthbrain.errors import ConfigError
from synthbrain.grids import DEMO
from synthbrain.io import read_volume, sidecar_path

REQUIRED_COLUMNS = ["participant_id", "age", "sex", "diagnosis", "ventricular_volume", "brain_volume"]


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _label_volumes(path) -> np.ndarray:
    """mL per dseg label 0..4."""
    labels = read_volume(path).data.astype(int)
    return np.bincount(labels.ravel(), minlength=len(DSEG_LABELS)) * DEMO.voxel_volume_ml


# ---------------------------------------------------------------------------------------- layout


def test_dataset_description_and_participants(phantom_cohort):
    root = phantom_cohort.root
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"] and desc["Name"]
    assert f"--seed {phantom_cohort.seed}" in desc["GeneratedBy"][0]["Description"]

    header = (root / "participants.tsv").read_text().splitlines()[0].split("\t")
    assert header[0] == "participant_id"  # BIDS: the first column
    assert set(REQUIRED_COLUMNS) <= set(header)
    assert header == list(PARTICIPANT_COLUMNS)
    assert json.loads((root / "participants.json").read_text()) == PARTICIPANT_COLUMNS  # each one described

    rows = phantom_cohort.participants()
    assert [r["participant_id"] for r in rows] == phantom_cohort.labels
    for i, row in enumerate(rows):
        params = sample_subject(phantom_cohort.seed, i)
        assert (float(row["age"]), row["sex"], row["diagnosis"]) == (params.age, params.sex, params.diagnosis)
        assert row["sex"] in ("F", "M") and row["diagnosis"] in DIAGNOSES
        brain, vent, icv = (float(row[c]) for c in
                            ("brain_volume", "ventricular_volume", "intracranial_volume"))
        assert 0 < vent < icv - brain and brain < icv  # ventricles are part of the CSF


def test_every_subject_has_a_t1w_with_sidecar_and_a_label_map(phantom_cohort):
    for i, label in enumerate(phantom_cohort.labels):
        t1w = phantom_cohort.t1w(label)
        img = nib.load(t1w)
        assert img.shape == DEMO.shape
        np.testing.assert_allclose(img.affine, DEMO.affine)
        assert img.get_data_dtype() == np.int16
        vol = read_volume(t1w)
        assert vol.data.min() >= 0 and vol.data.max() > 500  # brain ~0..1000

        sidecar = json.loads(sidecar_path(t1w).read_text())
        assert sidecar["Grid"] == "demo" and sidecar["Space"] == "MNI152NLin2009aSym"
        # the parameters recorded are the ones that made the subject (JSON turns tuples into lists)
        params = dataclasses.asdict(sample_subject(phantom_cohort.seed, i))
        assert sidecar["Parameters"] == json.loads(json.dumps(params))

        dseg = phantom_cohort.dseg(label)
        assert nib.load(dseg).get_data_dtype() == np.uint8
        labels = read_volume(dseg).data
        assert set(np.unique(labels)) == set(DSEG_LABELS)
        # the labels follow the image's T1 contrast: background < CSF < GM < WM
        means = [vol.data[labels == k].mean() for k in (0, 1, 2, 3)]
        assert means == sorted(means)
        assert vol.data[labels == 4].mean() < means[2]  # ventricles are dark

    deriv = phantom_cohort.root / "derivatives" / "phantom"
    assert json.loads((deriv / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    lut = (deriv / "dseg.tsv").read_text().splitlines()
    assert lut[0] == "index\tname" and len(lut) == 1 + len(DSEG_LABELS)


def test_no_stray_files(phantom_cohort):
    names = set(_files(phantom_cohort.root))
    expected = {"dataset_description.json", "README", "participants.tsv", "participants.json",
                "derivatives/phantom/dataset_description.json", "derivatives/phantom/dseg.tsv"}
    for label in phantom_cohort.labels:
        expected |= {f"{label}/anat/{label}_T1w.nii.gz", f"{label}/anat/{label}_T1w.json",
                     phantom_cohort.dseg(label).relative_to(phantom_cohort.root).as_posix()}
    assert names == expected  # atomic writes leave no temporary files behind


@pytest.mark.parametrize("path", ["dataset_description.json", "README", "sub-0001/anat/sub-0001_T1w.json"])
def test_data_is_declared_a_phantom(phantom_cohort, path):
    text = (phantom_cohort.root / path).read_text()
    assert "Phantom" in text and "not a real person" in text


def test_nifti_headers_say_synthetic(phantom_cohort):
    label = phantom_cohort.labels[0]
    for path in (phantom_cohort.t1w(label), phantom_cohort.dseg(label)):
        assert b"synthetic" in nib.load(path).header["descrip"].item()


# --------------------------------------------------------------------------------- true volumes


def test_true_volumes_agree_with_the_label_maps(phantom_cohort):
    # participants.tsv sums the fractions, dseg takes the largest fraction per voxel: they differ by
    # partial volume, which matters most for small ventricles at 2 mm
    for row in phantom_cohort.participants():
        ml = _label_volumes(phantom_cohort.dseg(row["participant_id"]))
        assert ml[2] + ml[3] == pytest.approx(float(row["brain_volume"]), rel=0.10)
        assert ml[4] == pytest.approx(float(row["ventricular_volume"]), rel=0.25)
        assert ml[1:].sum() == pytest.approx(float(row["intracranial_volume"]), rel=0.05)


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tmp_path, phantom_cohort):
    steps = []
    a = generate_cohort(tmp_path / "a", n=2, seed=phantom_cohort.seed,
                        on_step=lambda i, n, info: steps.append((i, n)))
    b = generate_cohort(tmp_path / "b", n=2, seed=phantom_cohort.seed)
    assert steps == [(1, 2), (2, 2)]
    files_a, files_b = _files(a), _files(b)
    assert files_a == files_b
    # a subject does not depend on how many others were generated with it
    for label in phantom_cohort.labels[:2]:
        for path in (phantom_cohort.t1w(label), phantom_cohort.dseg(label)):
            assert files_a[path.relative_to(phantom_cohort.root).as_posix()] == path.read_bytes()


def test_jobs_render_in_worker_processes_and_write_the_same_files(tmp_path, tiny_cohort, pool_tasks):
    from synthbrain.data import cohort as cohort_module
    from synthbrain.data.bids import read_tsv

    pool_tasks.watch(cohort_module)
    steps = []
    only = ["sub-0002", "sub-0009"]
    out = generate_cohort(tmp_path / "par", n=tiny_cohort.n, grid="tiny", seed=tiny_cohort.seed, only=only, jobs=2,
                          on_step=lambda i, n, info: steps.append((i, n)))
    assert sorted(pool_tasks) == [(2, 1), (2, 8)]  # both subjects went to a pool of 2 workers
    assert steps == [(1, 2), (2, 2)]
    files = _files(out)
    for label in only:
        for path in (tiny_cohort.t1w(label), tiny_cohort.dseg(label), sidecar_path(tiny_cohort.t1w(label))):
            assert files[path.relative_to(tiny_cohort.root).as_posix()] == path.read_bytes()
    # rows in the cohort's order, equal to the serial cohort's rows, whatever order the workers finished in
    rows = {r["participant_id"]: r for r in tiny_cohort.participants()}
    assert read_tsv(out / "participants.tsv") == [rows[label] for label in only]
    with pytest.raises(ConfigError, match="--jobs"):
        generate_cohort(tmp_path / "bad", n=2, grid="tiny", jobs=0)


def test_preprocess_writes_the_derivatives_without_the_alignment_check(tmp_path, monkeypatch):
    """The cohort's own derivatives need no registration (SimpleITK, which the GPU machine lacks)."""
    from synthbrain.data import prepare
    from synthbrain.data.bids import derivative_path
    from synthbrain.data.cohort import PREPARED_NOTE
    from synthbrain.data.preprocess import preprocess
    from synthbrain.grids import get_grid

    def refuse(*args, **kwargs):
        raise AssertionError("the alignment check ran")

    monkeypatch.setattr(prepare, "require_prepared", refuse)
    steps = []
    out = generate_cohort(tmp_path / "c", n=1, grid="tiny", seed=2, preprocess=True,
                          on_step=lambda i, n, info: steps.append(info["subject"]))
    assert steps == ["sub-0001", "sub-0001"]  # rendered, then preprocessed
    # the derivative is what preprocessing makes of the T1w as written, marked as not checked
    derived = derivative_path(out, "sub-0001", get_grid("tiny"))
    expected, _ = preprocess(read_volume(out / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz"), "tiny")
    assert np.array_equal(read_volume(derived).data, expected.data)
    assert json.loads(sidecar_path(derived).read_text())["PreparedCheck"] == {"Skipped": PREPARED_NOTE}


def test_different_seed_gives_different_subjects(tmp_path, phantom_cohort):
    other = generate_cohort(tmp_path / "other", n=1, seed=phantom_cohort.seed + 1)
    label = phantom_cohort.labels[0]
    other_t1w = other / label / "anat" / f"{label}_T1w.nii.gz"
    assert other_t1w.read_bytes() != phantom_cohort.t1w(label).read_bytes()
    assert sample_subject(phantom_cohort.seed + 1, 0) != sample_subject(phantom_cohort.seed, 0)


def test_no_subjects_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="--n"):
        generate_cohort(tmp_path / "none", n=0)
    assert not (tmp_path / "none").exists()


# -------------------------------------------------------------------------------------- ageing


def test_population_model_follows_the_documented_rates():
    # atrophy 0.2 %/y at 40, ~0.4 %/y at 70, 0.5 %/y at 90; disease adds 3 % (MCI) or 6 % (AD)
    def rate(age):
        return (expected_brain_loss(age + 0.5, "CN") - expected_brain_loss(age - 0.5, "CN")) * 100

    assert expected_brain_loss(40, "CN") == 0.0
    assert rate(40.5) == pytest.approx(0.2, abs=0.01)
    assert rate(70) == pytest.approx(0.4, abs=0.03)
    assert rate(89.5) == pytest.approx(0.5, abs=0.01)
    assert expected_brain_loss(70, "MCI") - expected_brain_loss(70, "CN") == pytest.approx(0.03)
    assert expected_brain_loss(70, "AD") - expected_brain_loss(70, "CN") == pytest.approx(0.06)
    # ventricles about 2.5x between 40 and 80
    growth = math.exp(expected_log_ventricle_ratio(80, "CN") - expected_log_ventricle_ratio(40, "CN"))
    assert 2.0 < growth < 3.0
    assert expected_log_ventricle_ratio(70, "CN") < expected_log_ventricle_ratio(70, "MCI") < \
        expected_log_ventricle_ratio(70, "AD")


def test_sampled_population_has_the_documented_structure():
    subjects = [sample_subject(0, i) for i in range(400)]
    ages = np.array([s.age for s in subjects])
    assert ages.min() >= 40 and ages.max() <= 90
    sexes = np.array([s.sex for s in subjects])
    assert 0.4 < np.mean(sexes == "F") < 0.6
    head = np.array([s.head_scale for s in subjects])
    assert head[sexes == "M"].mean() > head[sexes == "F"].mean()
    ad = np.array([s.diagnosis == "AD" for s in subjects])
    assert ad[ages >= 75].mean() > ad[ages < 55].mean()  # dementia is commoner with age
    assert sample_subject(0, 7) == subjects[7]


def test_older_render_has_larger_ventricles_and_a_smaller_brain():
    base = sample_subject(3, 0)
    rendered = {}
    for age in (45.0, 85.0):
        params = dataclasses.replace(
            base, age=age, brain_loss=expected_brain_loss(age, base.diagnosis),
            ventricle_ratio=math.exp(expected_log_ventricle_ratio(age, base.diagnosis)))
        rendered[age] = (params, render_subject(params, "demo"))
    (young_p, young), (old_p, old) = rendered[45.0], rendered[85.0]
    assert old.ventricular_volume_ml > young.ventricular_volume_ml
    assert old.brain_volume_ml < young.brain_volume_ml
    # by the amounts asked for (same head, so the ratios carry over)
    assert old.ventricular_volume_ml / young.ventricular_volume_ml == pytest.approx(
        old_p.ventricle_ratio / young_p.ventricle_ratio, rel=0.1)
    assert old.brain_volume_ml / young.brain_volume_ml == pytest.approx(
        (1 - old_p.brain_loss) / (1 - young_p.brain_loss), abs=0.03)
    assert old.intracranial_volume_ml == pytest.approx(young.intracranial_volume_ml, rel=0.02)  # same skull
    # the image follows the label maps: more dark (CSF) voxels inside the head
    dark = [np.mean(s.t1[s.dseg > 0] < 0.5 * np.percentile(s.t1[s.dseg > 0], 99)) for s in (young, old)]
    assert dark[1] > dark[0]


@pytest.mark.slow
def test_older_subjects_of_a_cohort_have_larger_ventricles(large_phantom_cohort):
    rows = large_phantom_cohort.participants()
    age = np.array([float(r["age"]) for r in rows])
    vent = np.array([float(r["ventricular_volume"]) for r in rows])
    brain_fraction = np.array([float(r["brain_volume"]) / float(r["intracranial_volume"]) for r in rows])
    old, young = age >= 80, age < 50
    assert old.sum() >= 3 and young.sum() >= 3
    assert vent[old].mean() > vent[young].mean()
    assert brain_fraction[old].mean() < brain_fraction[young].mean()


def test_only_writes_the_named_subjects_identical_to_the_full_cohort(phantom_cohort, tmp_path):
    from synthbrain.data.cohort import generate_cohort

    out = generate_cohort(tmp_path / "part", n=phantom_cohort.n, grid=phantom_cohort.grid, seed=phantom_cohort.seed,
                          only=["sub-0004"])
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-0004"]
    name = "sub-0004/anat/sub-0004_T1w.nii.gz"
    assert (out / name).read_bytes() == (phantom_cohort.root / name).read_bytes()
    from synthbrain.data.bids import read_tsv

    rows = read_tsv(out / "participants.tsv")
    assert [r["participant_id"] for r in rows] == ["sub-0004"]
    with pytest.raises(ConfigError, match="sub-0099"):
        generate_cohort(tmp_path / "bad", n=phantom_cohort.n, seed=phantom_cohort.seed, only=["sub-0099"])
