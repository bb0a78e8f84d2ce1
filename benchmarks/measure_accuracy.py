"""Phantom cohort generation time and measurement accuracy (measured vs true volumes).

    python benchmarks/measure_accuracy.py [--n 20] [--seed 1] [--grid demo]

Generates a phantom cohort with the CLI (timed), measures every T1 with ``synthbrain measure`` and
compares with the true volumes in participants.tsv: Pearson r, mean absolute error and bias (mL).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grid", default="demo")
    args = ap.parse_args()
    from synthbrain.data.bids import read_tsv
    from synthbrain.metrics import agreement

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cohort"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "synthbrain", "cohort", "--n", str(args.n), "--grid", args.grid,
                        "--seed", str(args.seed), "--out", str(out)], check=True)
        t_cohort = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "synthbrain", "measure", str(out), "--out", str(Path(tmp) / "m.tsv")],
                       check=True)
        t_measure = time.perf_counter() - t0
        truth = {r["participant_id"]: r for r in read_tsv(out / "participants.tsv")}
        measured = {Path(r["file"]).name.split("_")[0]: r for r in read_tsv(Path(tmp) / "m.tsv")}
        ids = sorted(truth)
        rows = []
        for col in ("brain_volume", "ventricular_volume"):
            a = agreement([float(truth[i][col]) for i in ids], [float(measured[i][col]) for i in ids])
            rows.append(f"| {col} | {a['r']:.3f} | {a['mae']:.1f} | {a['bias']:+.1f} | "
                        f"{np.mean([float(truth[i][col]) for i in ids]):.1f} |")
        old = [float(truth[i]["ventricular_volume"]) for i in ids if float(truth[i]["age"]) >= 80]
        young = [float(truth[i]["ventricular_volume"]) for i in ids if float(truth[i]["age"]) < 50]
    body = (f"Cohort of {args.n} on the {args.grid} grid (seed {args.seed}): generated in {t_cohort:.1f} s "
            f"(wall, including start-up); measured in {t_measure:.1f} s.\n\n"
            "| volume | Pearson r | MAE (mL) | bias (mL) | mean true (mL) |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nTrue ventricles: mean {np.mean(old):.1f} mL at 80+ (n={len(old)}) vs {np.mean(young):.1f} mL "
            f"under 50 (n={len(young)}).\n")
    print(body)
    write_section("Measurement accuracy on a phantom cohort",
                  f"python benchmarks/measure_accuracy.py --n {args.n} --seed {args.seed} --grid {args.grid}", body)


if __name__ == "__main__":
    main()
