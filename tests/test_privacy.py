"""Memorisation audit, membership inference and release: planted copies of training volumes are
flagged, unseen subjects are not, and a release is a valid, resumable BIDS derivative."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import PhantomCohort, _generate, subprocess_env
from scipy import ndimage as ndi

from synthbrain.bundle import load_bundle
from synthbrain.conditions import ConditionSchema
from synthbrain.data.bids import BIDSDataset
from synthbrain.errors import ConfigError
from synthbrain.privacy import AuditSettings, audit

TRAIN, CALIBRATE = 10, 6   # of the 20 subjects of the large phantom cohort; the other 4 are unseen test subjects


@pytest.fixture(scope="module")
def audit_cohort(tmp_path_factory) -> PhantomCohort:
    """Phantom subjects on the tiny grid, for the command-line test."""
    return _generate(tmp_path_factory, "audit_cohort", n=12, seed=8, grid="tiny")


@pytest.fixture(scope="module")
def splits(large_phantom_cohort):
    """The demo bundle (its trained encoder gives the embedding) and a train / calibrate / unseen split
    of 2 mm phantom subjects."""
    b = load_bundle(components=("autoencoder",))
    images = ConditionSchema(())  # the audit compares images only
    root = large_phantom_cohort.root
    labels = BIDSDataset(root, grid=b.grid, schema=images).labels

    def part(sel):
        return BIDSDataset(root, grid=b.grid, schema=images, subjects=sel)

    return b, part(labels[:TRAIN]), part(labels[TRAIN:TRAIN + CALIBRATE]), part(labels[TRAIN + CALIBRATE:])


def planted_copies(train, n: int = 3) -> list[tuple[str, np.ndarray]]:
    """Copies of training volumes: plain, with light noise, moved by 1-2 voxels, with a small
    intensity change and with a small affine jitter (2 degrees, a fraction of a voxel)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        v = train.volume(i)
        c = (np.array(v.shape) - 1) / 2
        a = np.deg2rad(2.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        jitter = ndi.affine_transform(v, rot, offset=c - rot @ c + np.array([0.4, -0.3, 0.2]), order=1)
        out += [(f"copy-{i}", v),
                (f"noise-{i}", np.clip(v + rng.normal(0, 0.02, v.shape), 0, 1)),
                (f"shift-{i}", np.roll(v, (1, -2, 1), axis=(0, 1, 2))),
                (f"intensity-{i}", np.clip(1.05 * v + 0.01, 0, 1)),
                (f"affine-{i}", jitter)]
    return [(k, x.astype(np.float32)) for k, x in out]


@pytest.mark.slow
def test_planted_copies_are_flagged_and_unseen_subjects_are_not(splits):
    bundle, train, calibrate, unseen = splits
    copies = planted_copies(train)
    held = [(f"held-out-{lab}", calibrate.volume(i)) for i, lab in enumerate(calibrate.labels)]
    others = [(f"unseen-{lab}", unseen.volume(i)) for i, lab in enumerate(unseen.labels)]
    report = audit(copies + held + others, train, calibrate, bundle, AuditSettings(jobs=1))
    rows = {r["id"]: r for r in report.samples}
    missed = [k for k, _ in copies if not rows[k]["flagged"]]
    assert not missed, f"copies not flagged: {missed}"
    for i in range(3):  # and each copy is matched to the subject it was copied from
        assert rows[f"copy-{i}"]["nearest_by_image"] == train.labels[i]
        assert rows[f"shift-{i}"]["shift_voxels"] == [1, -2, 1] and rows[f"shift-{i}"]["correlation"] > 0.999
    wrongly = [k for k, _ in held if rows[k]["flagged"]]
    assert not wrongly, f"held-out subjects flagged at the threshold calibrated on them: {wrongly}"
    # subjects the calibration never saw: every planted copy is closer to the training set than any of them
    # (on phantoms, two subjects of one age and sex can be near-twins, so that is the honest claim)
    closest_unseen = max(rows[k]["correlation"] for k, _ in others)
    assert min(rows[k]["correlation"] for k, _ in copies) > closest_unseen
    d = report.to_dict()
    assert d["flagged"] >= len(copies) and d["train_subjects"] == TRAIN
    assert d["calibration"]["holdout_subjects"] == CALIBRATE
    assert d["thresholds"]["correlation"] == pytest.approx(max(h["correlation"] for h in d["holdout"]))


def test_audit_settings_are_checked():
    with pytest.raises(ConfigError, match="max_shift"):
        AuditSettings(max_shift=9)
    with pytest.raises(ConfigError, match="quantile"):
        AuditSettings(quantile=0.1)


def test_audit_cli_writes_a_json_and_html_report(audit_cohort, tiny_bundle, tmp_path):
    """`synthbrain audit` on a folder of samples written by `synthbrain sample`."""
    env = subprocess_env()
    subprocess.run([sys.executable, "-m", "synthbrain", "sample", "--bundle", str(tiny_bundle), "--n", "2",
                    "--steps", "2", "--out", str(tmp_path / "synth"), "--no-measure"], check=True, env=env,
                   capture_output=True)
    r = subprocess.run([sys.executable, "-m", "synthbrain", "audit", "--bundle", str(tiny_bundle),
                        "--samples", str(tmp_path / "synth"), "--train", str(audit_cohort.root),
                        "--holdout-fraction", "0.3", "--out", str(tmp_path / "report")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "report" / "report.json").read_text())
    assert d["samples"] == 2 and {"thresholds", "per_sample", "holdout", "seconds"} <= set(d)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Memorisation audit" in html and "plotly" in html.lower() and "data:image/png;base64" in html
    assert "flagged" in r.stdout
