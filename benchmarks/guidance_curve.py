"""Guidance trade-off of a bundle's prior: adherence (requested vs measured volumes), diversity
(MS-SSIM among samples of one condition) and artefacts at each guidance scale, measured in one run by
the same function as `synthbrain evaluate guidance` (which also writes the good range to the bundle).

    python benchmarks/guidance_curve.py --bundle synthbrain/assets/demo --data data/phantom-demo-1000
    python benchmarks/guidance_curve.py --bundle synthbrain/assets/demo --from-metrics   # the sweep
        that `synthbrain evaluate guidance` wrote into the bundle's metrics.json (the same function)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import write_section

from synthbrain.bundle import demo_bundle_path
from synthbrain.evaluation import GUIDANCE_RULE, guidance_sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=demo_bundle_path())
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--from-metrics", action="store_true",
                    help="write the sweep the bundle's metrics.json holds instead of measuring it again")
    ap.add_argument("--values", default="0,1,1.5,2,3,5,7.5,10")
    ap.add_argument("--n-conditions", type=int, default=16)
    a = ap.parse_args()
    if a.from_metrics:
        r = json.loads((a.bundle / "metrics.json").read_text())["guidance_sweep"]
        command = f"synthbrain evaluate guidance --bundle {a.bundle} --data DATA --values {a.values}"
    elif a.data is None:
        ap.error("--data (the prior's training data) or --from-metrics")
    else:
        r = guidance_sweep(a.bundle, a.data, [float(v) for v in a.values.split(",")], n_conditions=a.n_conditions)
        command = f"python benchmarks/guidance_curve.py --bundle {a.bundle} --data {a.data}"
    rows = [f"| {p['guidance']:g} | {p['ventricular_volume']['r']:.3f} / {p['ventricular_volume']['mae']:.1f} | "
            f"{p['brain_volume']['r']:.3f} / {p['brain_volume']['mae']:.1f} | {p['ms_ssim_same_condition']:.3f} | "
            f"{100 * p['bright_outside_brain']:.3f} % | {'yes' if p['good'] else 'no'} |" for p in r["curve"]]
    body = (f"{r['conditions']} condition sets of held-out subjects, {r['steps']} solver steps, one seed each; "
            f"diversity over 6 seeds of the default condition. Good: {GUIDANCE_RULE}. Measured good range: "
            f"**{r['good_range']}** (written to the bundle's config.json; the CLI and the app warn outside it).\n\n"
            "| guidance | ventricles r / MAE (mL) | brain r / MAE (mL) | same-condition MS-SSIM | bright outside the "
            "brain (max) | good |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_section(f"Guidance trade-off ({Path(a.bundle).name} bundle)", command, body)


if __name__ == "__main__":
    main()
