"""Make a trained bundle the shipped demo bundle, only if it follows the requested volumes at least as well.

    python benchmarks/promote_demo_bundle.py runs/gpu-import/bundle/bundle --data data/phantom-demo-1000 \
        --notes runs/gpu-import/CARD_NOTES.md

The comparison is the guidance sweep in each bundle's metrics.json (`synthbrain evaluate guidance`), at
each bundle's own default guidance (what a user gets): ventricles r and brain r must be at least the
shipped bundle's, and both mean absolute errors (mL) at most the shipped bundle's. A candidate that falls
short is refused (exit 1, one line per figure) and nothing changes.

``--truth-changed WHY``: the volumes' definition changed since the shipped bundle was made (WHY says how,
e.g. the phantom truth no longer counts the fissure's CSF as ventricle), so its figures, measured against
requests in the old definition, say nothing about the candidate's; the candidate must then meet floors of
its own instead: ventricles r and brain r at least ``TRUTH_CHANGED_MIN_R`` (the measurement's own
agreement with the phantom truth, r >= 0.95), its MAEs printed beside the shipped ones.

A candidate that passes is staged beside the shipped bundle with ``--notes`` as its CARD_NOTES.md (how it
was made: the commands of the session that trained it), and its metrics, card and pictures are made again
here with the commands the card gives (`synthbrain evaluate autoencoder`, `guidance`, `prior`,
`privacy` on ``--data``, in the staged folder); the comparison is repeated on the new sweep, and only
then does the staged folder replace the shipped one (the old one is kept in runs/demo-replaced-<time>/).
``--no-evaluate`` skips the regeneration (the candidate's metrics stay as they came).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIGURES = (("ventricular_volume", "r", "ventricles r", 1), ("brain_volume", "r", "brain r", 1),
           ("ventricular_volume", "mae", "ventricles MAE (mL)", -1), ("brain_volume", "mae", "brain MAE (mL)", -1))


TRUTH_CHANGED_MIN_R = 0.95


class Refused(Exception):
    """The candidate is not promoted (exit code 1)."""


def adherence(bundle: Path) -> tuple[float, dict]:
    """(default guidance, the sweep's point at it) of a bundle; SynthBrainError when it has none."""
    from synthbrain.bundle import read_config
    from synthbrain.errors import SynthBrainError

    config = read_config(bundle)
    guidance = float(((config.get("prior") or {}).get("config") or {}).get("default_guidance", float("nan")))
    path = bundle / "metrics.json"
    sweep = (json.loads(path.read_text()) if path.is_file() else {}).get("guidance_sweep") or {}
    for point in sweep.get("curve", []):
        if abs(float(point["guidance"]) - guidance) < 1e-6:
            return guidance, point
    raise SynthBrainError(f"{bundle}: its metrics.json has no guidance sweep point at its default guidance "
                          f"{guidance:g}; run `synthbrain evaluate guidance --bundle {bundle} --data DATA` "
                          f"with {guidance:g} among --values")


def shortfalls(candidate: dict, shipped: dict, against: str = "shipped") -> list[str]:
    """The figures in which the candidate's sweep point is worse than the shipped bundle's."""
    out = []
    for volume, key, label, sign in FIGURES:
        c, s = float(candidate[volume][key]), float(shipped[volume][key])
        if not sign * c >= sign * s:  # NaN (an unmeasurable sweep) falls short too
            out.append(f"{label}: candidate {c:.3f}, {against} {s:.3f}")
    return out


def compare(candidate: Path, shipped: Path, truth_changed: str | None = None) -> list[str]:
    (gc, c), (gs, s) = adherence(candidate), adherence(shipped)
    if truth_changed:
        floor = {v: {"r": TRUTH_CHANGED_MIN_R, "mae": float("inf")} for v in ("ventricular_volume", "brain_volume")}
        print(f"promote: the volumes' definition changed ({truth_changed}); floors r >= {TRUTH_CHANGED_MIN_R} instead "
              "of the shipped figures. MAE (mL), candidate vs shipped (other definitions): ventricles "
              f"{float(c['ventricular_volume']['mae']):.2f} vs {float(s['ventricular_volume']['mae']):.2f}, brain "
              f"{float(c['brain_volume']['mae']):.1f} vs {float(s['brain_volume']['mae']):.1f}", flush=True)
        return [f"{f} (guidance {gc:g}; the truth changed)" for f in shortfalls(c, floor, "floor")]
    return [f"{f} (guidance {gc:g} vs {gs:g})" for f in shortfalls(c, s)]


def regenerate(bundle: Path, data: Path, guidance_values: str) -> None:
    """metrics.json, MODEL_CARD.md and the pictures of ``bundle``, made again with the card's commands."""
    base = [sys.executable, "-m", "synthbrain", "evaluate"]
    for what, extra in (("autoencoder", []), ("guidance", ["--values", guidance_values]), ("prior", []),
                        ("privacy", [])):
        cmd = [*base, what, "--bundle", str(bundle), "--data", str(data), *extra]
        print("promote:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def promote(candidate: Path, shipped: Path, data: Path | None, notes: Path | None, evaluate: bool,
            guidance_values: str, backups: Path, truth_changed: str | None = None) -> Path:
    from synthbrain.bundle import load_bundle
    from synthbrain.errors import SynthBrainError

    new, old = load_bundle(candidate), load_bundle(shipped)  # both whole and checksummed, or a one-line error
    if new.grid.name != old.grid.name:
        raise SynthBrainError(f"{candidate}: grid {new.grid.name}, but the shipped bundle's is {old.grid.name}")
    if new.prior is None:
        raise SynthBrainError(f"{candidate}: has no prior; the demo bundle needs both stages")
    short = compare(candidate, shipped, truth_changed)
    if short:
        raise Refused("; ".join(short))
    if notes is None or not notes.is_file():
        raise SynthBrainError("--notes: the file that says how the candidate was made (its CARD_NOTES.md) is needed")
    if evaluate and data is None:
        raise SynthBrainError("--data: the cohort to evaluate the candidate on (or --no-evaluate)")
    stage = shipped.with_name(f".{shipped.name}-staged")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(candidate, stage)
    try:
        shutil.copy2(notes, stage / "CARD_NOTES.md")
        if evaluate:
            regenerate(stage, data, guidance_values)
            short = compare(stage, shipped, truth_changed)
            if short:
                raise Refused("after measuring again: " + "; ".join(short))
        else:
            from synthbrain.model_card import write_model_card

            write_model_card(stage)  # the card with the new notes
        backups.mkdir(parents=True, exist_ok=True)
        kept = backups / f"demo-replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(shipped), str(kept))
        stage.rename(shipped)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return kept


def main() -> int:
    from synthbrain.bundle import demo_bundle_path
    from synthbrain.errors import SynthBrainError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("candidate", type=Path, help="the trained bundle (both stages, metrics.json with a sweep)")
    ap.add_argument("--data", type=Path, default=None, help="the cohort it was trained on (for the evaluations)")
    ap.add_argument("--notes", type=Path, default=None, help="its CARD_NOTES.md: how it was made, commands included")
    ap.add_argument("--shipped", type=Path, default=demo_bundle_path(), help="the bundle to replace (default: the "
                    "package's demo bundle)")
    ap.add_argument("--guidance-values", default="0,1,1.5,2,3,5,7.5,10", help="the sweep's guidance scales")
    ap.add_argument("--no-evaluate", action="store_true", help="keep the candidate's metrics; only the card is made")
    ap.add_argument("--backups", type=Path, default=ROOT / "runs", help="where the replaced bundle is kept")
    ap.add_argument("--truth-changed", metavar="WHY", default=None,
                    help="the volumes' definition changed since the shipped bundle (say how): floors of r >= "
                         f"{TRUTH_CHANGED_MIN_R} replace the comparison with its figures")
    args = ap.parse_args()
    try:
        kept = promote(args.candidate, args.shipped, args.data, args.notes, not args.no_evaluate,
                       args.guidance_values, args.backups, args.truth_changed)
    except Refused as e:
        print(f"promote: refused, {args.candidate} follows the requested volumes less well than {args.shipped}: {e}",
              file=sys.stderr)
        return 1
    except (SynthBrainError, subprocess.CalledProcessError) as e:
        print(f"promote: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"promote: {args.candidate} is now {args.shipped} (the old bundle is in {kept}); commit the folder, "
          "its pictures and benchmarks/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
