"""Memorisation audit, membership inference and release: planted copies of training volumes are
flagged, unseen subjects are not, and a release is a valid, resumable BIDS derivative."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PhantomCohort, _generate, subprocess_env
from scipy import ndimage as ndi

from synthbrain.bundle import load_bundle
from synthbrain.conditions import ConditionSchema
from synthbrain.data.bids import BIDSDataset
from synthbrain.errors import ConfigError
from synthbrain.privacy import AuditSettings, audit

TRAIN, CALIBRATE, UNSEEN = 8, 6, 4  # of the 20 subjects of the large phantom cohort


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

    unseen = labels[TRAIN + CALIBRATE:TRAIN + CALIBRATE + UNSEEN]
    return b, part(labels[:TRAIN]), part(labels[TRAIN:TRAIN + CALIBRATE]), part(unseen)


def planted_copies(train) -> list[tuple[str, np.ndarray]]:
    """Copies of training volumes: plain copies of subjects 0 and 1, and of subject 1 with light noise,
    moved by 1-2 voxels, with a small intensity change and with a small affine jitter (2 degrees, a
    fraction of a voxel)."""
    rng = np.random.default_rng(0)
    v = train.volume(1)
    c = (np.array(v.shape) - 1) / 2
    a = np.deg2rad(2.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    jitter = ndi.affine_transform(v, rot, offset=c - rot @ c + np.array([0.4, -0.3, 0.2]), order=1)
    out = [("copy-0", train.volume(0)), ("copy-1", v),
           ("noise-1", np.clip(v + rng.normal(0, 0.02, v.shape), 0, 1)),
           ("shift-1", np.roll(v, (1, -2, 1), axis=(0, 1, 2))),
           ("intensity-1", np.clip(1.05 * v + 0.01, 0, 1)),
           ("affine-1", jitter)]
    return [(k, x.astype(np.float32)) for k, x in out]


@pytest.mark.slow
def test_planted_copies_are_flagged_and_unseen_subjects_are_not(splits):
    bundle, train, calibrate, unseen = splits
    copies = planted_copies(train)
    # two of the calibration subjects audited again: the threshold is their maximum, so none may pass it
    held = [(f"held-out-{lab}", calibrate.volume(i)) for i, lab in enumerate(calibrate.labels[:2])]
    others = [(f"unseen-{lab}", unseen.volume(i)) for i, lab in enumerate(unseen.labels)]
    # a shortlist of 3 of the 8 training subjects (by the encoder's features) is searched over shifts and turns
    report = audit(copies + held + others, train, calibrate, bundle, AuditSettings(jobs=2, shortlist=3))
    rows = {r["id"]: r for r in report.samples}
    missed = [k for k, _ in copies if not rows[k]["flagged"]]
    assert not missed, f"copies not flagged: {missed}"
    # and each copy is matched to the subject it was copied from
    assert [rows[k]["nearest_by_image"] for k, _ in copies] == [train.labels[0]] + [train.labels[1]] * 5
    assert rows["shift-1"]["shift_voxels"] == [1, -2, 1] and rows["shift-1"]["correlation"] > 0.999
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


def _release_cmd(bundle, train, holdout, out, n=5):
    return [sys.executable, "-m", "synthbrain", "release", "--bundle", str(bundle), "--n", str(n), "--conditions",
            "grid", "--train", str(train), "--holdout", str(holdout), "--out", str(out), "--steps", "2", "--seed", "3"]


def _tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def released(tiny_bundle, tiny_cohort, audit_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "cohort"
    r = subprocess.run(_release_cmd(tiny_bundle, tiny_cohort.root, audit_cohort.root, out), env=subprocess_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "released" in r.stdout
    return out


def test_a_release_is_a_valid_bids_derivative_of_audited_synthetic_subjects(released, tiny_bundle):
    from bids import BIDSLayout

    from synthbrain.data.bids import read_tsv
    from synthbrain.export import SYNTHETIC, read_provenance

    desc = json.loads((released / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["Provenance"] == SYNTHETIC and desc["BIDSVersion"]
    (gen,) = desc["GeneratedBy"]
    cfg = json.loads((tiny_bundle / "config.json").read_text())
    assert gen["Name"] == "synthbrain" and gen["Version"] and gen["Checksums"]["prior"] == cfg["prior"]["sha256"]
    layout = BIDSLayout(released, is_derivative=True, validate=False)
    files = layout.get(suffix="T1w", desc="synthetic", extension=".nii.gz", return_type="filename")
    rows = read_tsv(released / "participants.tsv")
    assert len(files) == len(rows) == 5
    assert sorted(f"sub-{s}" for s in layout.get_subjects()) == sorted(r["participant_id"] for r in rows)
    for col in ("age", "sex", "seed", "measured_brain_volume", "nearest_training_correlation", "audit_attempts"):
        assert col in rows[0], col
    units = json.loads((released / "participants.json").read_text())
    assert units["measured_brain_volume"]["Units"] == "mL"
    for f in files:
        assert read_provenance(f) == SYNTHETIC
        side = json.loads(Path(f.replace(".nii.gz", ".json")).read_text())
        assert side["Audit"]["flagged"] is False and side["Audit"]["correlation"] <= side["Audit"]["thresholds"][
            "correlation"]
    report = json.loads((released / "audit" / "report.json").read_text())
    assert report["release"]["released"] == 5 and report["samples"] == 5
    assert "is not" in (released / "README.md").read_text()


def test_a_release_names_no_training_or_held_out_subject(released, tiny_cohort, audit_cohort):
    """What is shared carries similarities, never which real subject a sample was compared with."""
    labels = {p.name for root in (tiny_cohort.root, audit_cohort.root) for p in root.glob("sub-*")}
    assert labels
    for f in released.rglob("*"):
        if f.is_file() and not f.name.endswith(".nii.gz"):
            text = f.read_text()
            found = [lab for lab in labels if lab in text]
            assert not found, f"{f.relative_to(released)} names {found}"


def test_a_release_refuses_a_folder_it_did_not_create(tiny_bundle, tiny_cohort, audit_cohort, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = subprocess.run(_release_cmd(tiny_bundle, tiny_cohort.root, audit_cohort.root, out), env=subprocess_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a SynthBrain release" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_release_killed_midway_resumes_to_the_same_dataset(released, tiny_bundle, tiny_cohort, audit_cohort,
                                                            tmp_path):
    import signal
    import time

    out = tmp_path / "cohort"
    cmd = _release_cmd(tiny_bundle, tiny_cohort.root, audit_cohort.root, out)
    proc = subprocess.Popen(cmd, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / ".release" / "sub-synth0002.json").exists():
        time.sleep(0.02)
    assert proc.poll() is None, "the release finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "participants.tsv").exists()
    subprocess.run(cmd, check=True, env=subprocess_env(), capture_output=True)
    a, b = _tree(released), _tree(out)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert not [k for k in b if ".tmp" in k]


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_release_one_process_writes(released, tiny_bundle, tiny_cohort, audit_cohort,
                                                                 tmp_path):
    """Rank r samples and audits subjects r, r + 2, ...; rank 0 writes the tables and the report from
    every rank's records: byte for byte the release of one process."""
    out = tmp_path / "cohort"
    cmd = _release_cmd(tiny_bundle, tiny_cohort.root, audit_cohort.root, out)
    assert cmd[1:3] == ["-m", "synthbrain"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        *("-n" if a == "--n" else a for a in cmd[1:])],  # torchrun reads --n as its own option
                       env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("released ") == 1  # rank 0 alone speaks
    a, b = _tree(released), _tree(out)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_the_attack_metrics_read_lower_scores_as_members():
    from synthbrain.privacy import attack_metrics

    members, others = np.linspace(0.0, 1.0, 50), np.linspace(2.0, 3.0, 50)
    m = attack_metrics(members, others)
    assert m["auc"] == 1.0 and m["tpr_at_1pct_fpr"] == 1.0 and (m["members"], m["non_members"]) == (50, 50)
    assert attack_metrics(others, members)["auc"] == 0.0
    same = attack_metrics(np.r_[members, others], np.r_[members, others])
    assert same["auc"] == pytest.approx(0.5) and same["tpr_at_1pct_fpr"] <= 0.05


@pytest.mark.slow
def test_evaluate_privacy_writes_the_audit_and_membership_figures(private_bundle, tmp_path):
    """On a prior trained with 3 of its 10 subjects held out: the share of fresh samples flagged and both
    attacks' AUC land in metrics.json and the model card; the members are the training subjects."""
    import shutil

    from synthbrain.bundle import copy_bundle

    bundle = copy_bundle(private_bundle, tmp_path / "bundle")
    data = shutil.copytree(private_bundle.parents[1] / "datasets" / "cohort", tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "synthbrain", "evaluate", "privacy", "--bundle", str(bundle), "--data",
                        str(data), "--n-samples", "3"], env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((bundle / "metrics.json").read_text())["privacy"]
    held = json.loads((bundle / "config.json").read_text())["prior"]["val_subjects"]
    assert m["audit"]["samples"] == 3 and m["audit"]["holdout_subjects"] == len(held) >= 3
    assert m["audit"]["train_subjects"] == 10 - len(held)
    assert 0.0 <= m["audit"]["share_flagged"] <= 1.0
    assert m["membership_prior"]["non_members"] == len(held) and m["membership_prior"]["members"] >= len(held)
    assert 0.0 <= m["membership_prior"]["auc"] <= 1.0 and 0.0 <= m["membership_autoencoder"]["auc"] <= 1.0
    assert "### privacy" in (bundle / "MODEL_CARD.md").read_text() and "flagged" in r.stdout
