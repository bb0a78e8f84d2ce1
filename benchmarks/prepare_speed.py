"""``synthbrain prepare``: time per subject (2 mm and 1 mm input) and registration error on native-space
copies of the MNI152 template whose true motion is known.

    python benchmarks/prepare_speed.py [--n2 6] [--n1 2] [--seed 0] [--threads 1]

Each copy is the template (half of them with a synthetic skull and scalp) rotated by up to 15 degrees
about random axes and shifted by up to 20 mm, with a bias field, on a scanner grid (2 mm: 98 x 116 x 94,
alternately RAS and LPS; 1 mm: 256 x 256 x 180). Per subject: wall time of ``prepare_volume`` (one
process; the template caches warm), the registration error (mean and largest distance between where
the recovered and the true transform put the template's brain voxels, mm), the prepared brain's
centroid error and its brain-masked correlation with the template on the demo grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n2", type=int, default=6, help="2 mm subjects")
    ap.add_argument("--n1", type=int, default=2, help="1 mm subjects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import SimpleITK as sitk
    import torch
    from nilearn.datasets import MNI152_FILE_PATH
    from scipy import ndimage as ndi

    from synthbrain.data import native
    from synthbrain.data.prepare import check_prepared, prepare_volume
    from synthbrain.data.template import load_template
    from synthbrain.grids import DEMO
    from synthbrain.io import read_volume

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    rng = np.random.default_rng(args.seed)
    mni = read_volume(MNI152_FILE_PATH)
    head = native.head_with_shell(mni)
    tmpl = load_template(DEMO)
    inside = tmpl.brain > 0.5
    brain_pts = DEMO.voxel_to_world(np.argwhere(inside))          # (N, 3) RAS mm
    lps = np.diag([-1.0, -1.0, 1.0])
    centroid = DEMO.voxel_to_world(np.array(ndi.center_of_mass(inside))[None])[0]

    def case(i: int, spacing: float) -> dict:
        axis = rng.normal(size=3)
        angles = axis / np.linalg.norm(axis) * rng.uniform(8.0, 15.0)
        direction = rng.normal(size=3)
        shift = direction / np.linalg.norm(direction) * rng.uniform(8.0, 20.0)
        motion = native.motion(angles, shift, tmpl.centroid_mm)
        skull = i % 2 == 0
        kw = {"spacing": spacing, "bias": 0.2}
        if spacing == 1.0:
            kw["shape"] = (256, 256, 180)
        else:
            kw["lps"] = i % 2 == 1
        vol = native.native_copy(mni, head if skull else mni.data, motion, **kw)
        refused = not check_prepared(vol).ok
        t0 = time.perf_counter()
        res = prepare_volume(vol, DEMO)
        seconds = time.perf_counter() - t0
        # recovered (MNI -> subject, ITK LPS) against the truth (the motion, RAS)
        got = np.array([res.transform.TransformPoint(tuple(lps @ p)) for p in brain_pts]) @ lps
        want = brain_pts @ motion[:3, :3].T + motion[:3, 3]
        err = np.linalg.norm(got - want, axis=1)
        com = DEMO.voxel_to_world(np.array(ndi.center_of_mass(res.volume.data > 0))[None])[0]
        r = float(np.corrcoef(res.volume.data[inside], tmpl.t1[inside])[0, 1])
        return {"spacing": spacing, "shape": vol.shape, "skull": skull, "lps": kw.get("lps", False),
                "rotation": float(np.linalg.norm(angles)), "shift": float(np.linalg.norm(shift)), "seconds": seconds,
                "err_mean": float(err.mean()), "err_max": float(err.max()),
                "centroid": float(np.linalg.norm(com - centroid)), "r": r, "refused_before": refused,
                "ok_after": check_prepared(res.volume).ok, "extractor": res.qc["brain_extraction"]}

    prepare_volume(native.native_copy(mni, mni.data, np.eye(4)), DEMO)  # warm: caches, deepbet's networks
    rows = [case(i, 2.0) for i in range(args.n2)] + [case(i, 1.0) for i in range(args.n1)]

    lines = ["| input | voxels | skull | rotation (deg) | shift (mm) | time (s) | registration error mean / max (mm) "
             "| centroid error (mm) | r with template | refused before / passes after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['spacing']:g} mm{' LPS' if row['lps'] else ''} | {'x'.join(map(str, row['shape']))} | "
                     f"{'yes' if row['skull'] else 'no'} | {row['rotation']:.1f} | {row['shift']:.1f} | "
                     f"{row['seconds']:.1f} | {row['err_mean']:.2f} / {row['err_max']:.2f} | {row['centroid']:.2f} | "
                     f"{row['r']:.3f} | {'yes' if row['refused_before'] else 'NO'} / "
                     f"{'yes' if row['ok_after'] else 'NO'} |")
    summary = []
    for spacing in (2.0, 1.0):
        sel = [r for r in rows if r["spacing"] == spacing]
        if sel:
            t = np.array([r["seconds"] for r in sel])
            summary.append(f"- {spacing:g} mm input: {t.mean():.1f} s per subject (min {t.min():.1f}, max "
                           f"{t.max():.1f}; n = {len(sel)}); registration error at most "
                           f"{max(r['err_max'] for r in sel):.2f} mm, correlation at least "
                           f"{min(r['r'] for r in sel):.3f}.")
    body = (f"Native-space copies of the MNI152 template (seed {args.seed}), prepared onto the demo grid in one "
            f"process with {args.threads} thread(s) for torch and ITK (brain extraction: "
            f"{', '.join(sorted({r['extractor'] for r in rows}))}).\n\n" + "\n".join(summary) + "\n\n"
            + "\n".join(lines) + "\n\nRegistration error: distance between where the recovered transform and the "
            "true motion put each template brain voxel. Wall time covers N4, brain extraction, registration, "
            "resampling and normalisation (not reading or writing files, not the QC picture).")
    write_section("Prepare: time per subject and registration error",
                  f"python benchmarks/prepare_speed.py --n2 {args.n2} --n1 {args.n1} --seed {args.seed} "
                  f"--threads {args.threads}", body)
    print(body)


if __name__ == "__main__":
    main()
