"""Memorisation audit on the demo bundle: planted copies of training subjects (5 kinds) must all be
flagged; the bundle's own figures (fresh samples flagged, membership inference) come from its
metrics.json, written by `synthbrain evaluate privacy`.

    synthbrain cohort --n 1000 --grid demo --seed 2026 --out data/phantom-demo-1000   # the prior's data
    synthbrain evaluate privacy --bundle synthbrain/assets/demo --data data/phantom-demo-1000 --n-samples 100
    python benchmarks/privacy_audit.py --data data/phantom-demo-1000 --copies 10
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
from _results import write_section
from scipy import ndimage as ndi

from synthbrain.bundle import demo_bundle_path, load_bundle
from synthbrain.privacy import Auditor, holdout_split

KINDS = ("copy", "noise", "shift", "intensity", "affine")


def planted(v: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of a training volume: plain, with light noise (sd 0.02), moved by (1, -2, 1) voxels,
    rescaled (x 1.05 + 0.01), or rotated 2 degrees with a sub-voxel translation."""
    if kind == "copy":
        return v
    if kind == "noise":
        return np.clip(v + rng.normal(0, 0.02, v.shape), 0, 1).astype(np.float32)
    if kind == "shift":
        return np.roll(v, (1, -2, 1), axis=(0, 1, 2))
    if kind == "intensity":
        return np.clip(1.05 * v + 0.01, 0, 1)
    c = (np.array(v.shape) - 1) / 2
    a = np.deg2rad(2.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return ndi.affine_transform(v, rot, offset=c - rot @ c + np.array([0.4, -0.3, 0.2]), order=1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=demo_bundle_path())
    ap.add_argument("--data", type=Path, required=True, help="the prior's training data")
    ap.add_argument("--copies", type=int, default=10, help="training subjects copied (each in every kind)")
    a = ap.parse_args()
    b = load_bundle(a.bundle, components=("autoencoder",))
    train, held = holdout_split(b, a.data)
    t0 = time.perf_counter()
    auditor = Auditor(b, train, held)
    t_build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train), a.copies, replace=False)
    samples = [(f"{k}-{train.labels[i]}", planted(train.volume(int(i)), k, rng)) for i in picks for k in KINDS]
    report = auditor.audit(samples).to_dict()
    held_report = auditor.audit([(lab, held.volume(i)) for i, lab in enumerate(held.labels)]).to_dict()
    rows = []
    for k in KINDS:
        mine = [r for r in report["per_sample"] if r["id"].startswith(k + "-")]
        right = sum(r["nearest_by_image"] == r["id"].split("-", 1)[1] for r in mine)
        rows.append(f"| {k} | {sum(r['flagged'] for r in mine)} / {len(mine)} | {right} / {len(mine)} | "
                    f"{min(r['correlation'] for r in mine):.3f} | {min(r['cosine'] for r in mine):.3f} |")
    m = json.loads((Path(a.bundle) / "metrics.json").read_text()).get("privacy", {})
    au, mp, ma = m.get("audit", {}), m.get("membership_prior", {}), m.get("membership_autoencoder", {})
    thr = report["thresholds"]
    body = (
        f"Training set: {report['train_subjects']} subjects of the prior; thresholds calibrated on "
        f"{report['calibration']['holdout_subjects']} held-out subjects (their maximum): image r "
        f"{thr['correlation']:.4f}, embedding cosine {thr['cosine']:.4f}. Building the search set took "
        f"{t_build:.0f} s (1 thread); the search {1000 * report['seconds']['per_sample_x_training_subject']:.2f} ms "
        f"per sample x training subject; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
        "MiB.\n\n**Planted copies** of randomly chosen training subjects:\n\n"
        "| kind | flagged | matched to its source | lowest image r | lowest cosine |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        f"Held-out subjects audited as samples: {held_report['flagged']} of {held_report['samples']} flagged.\n\n"
        "**The demo bundle** (`synthbrain evaluate privacy --bundle synthbrain/assets/demo --data "
        "data/phantom-demo-1000 --n-samples 100`, from its metrics.json):\n\n"
        "| figure | value |\n|---|---|\n"
        f"| fresh samples flagged | {au.get('flagged')} of {au.get('samples')} "
        f"({100 * au.get('share_flagged', float('nan')):.1f} %) |\n"
        f"| highest image r / cosine of a fresh sample | {au.get('max_correlation', float('nan')):.4f} / "
        f"{au.get('max_cosine', float('nan')):.4f} |\n"
        f"| membership AUC, prior denoising loss ({mp.get('members')} members vs {mp.get('non_members')}) | "
        f"{mp.get('auc', float('nan')):.3f} (TPR at 1 % FPR {mp.get('tpr_at_1pct_fpr', float('nan')):.3f}) |\n"
        f"| membership AUC, autoencoder reconstruction error ({ma.get('members')} vs {ma.get('non_members')}) | "
        f"{ma.get('auc', float('nan')):.3f} (TPR at 1 % FPR {ma.get('tpr_at_1pct_fpr', float('nan')):.3f}) |\n")
    write_section("Memorisation audit and membership inference (demo bundle)",
                  f"python benchmarks/privacy_audit.py --data {a.data} --copies {a.copies}", body)


if __name__ == "__main__":
    main()
