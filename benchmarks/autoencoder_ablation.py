"""Stage-1 ablation at an equal size budget: designs trained for the same steps on the same data,
their held-out figures at each validation, the code bits, the parameters and the time per step.

Each design is a run of the project's own command, e.g.::

    synthbrain cohort --n 240 --grid demo --seed 2026 --out data/phantom-demo
    OMP_NUM_THREADS=1 synthbrain train autoencoder --data data/phantom-demo --grid demo \\
        --out runs/abl-a --config benchmarks/configs/ae-ablation-a.json

then ``python benchmarks/autoencoder_ablation.py --runs runs/abl-a runs/abl-b ... [--baseline CSV]``
reads their run.json and metrics.csv (validation on 8 held-out subjects during training) and writes
the table to results.md. ``--baseline`` adds a bundle's training log (the old 8x design) as a row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import write_section

from synthbrain.grids import get_grid
from synthbrain.models.autoencoder import Autoencoder, AutoencoderConfig
from synthbrain.training.run import read_metrics


def row(name: str, cfg: AutoencoderConfig, rows: list[dict], grid, at: int) -> str:
    import torch

    with torch.device("meta"):
        params = sum(p.numel() for p in Autoencoder(cfg).parameters())
    comp = cfg.compression(grid.shape)
    val = {r["name"]: r["value"] for r in rows if r["split"] == "val" and r["step"] == at}
    speed = [r["value"] for r in rows if r["name"] == "steps_per_s" and r["step"] <= at]
    lat = "x".join(map(str, comp["latent_shape"]))
    return (f"| {name} | {list(cfg.channels)} / strides {list(cfg.strides)} | {lat} | {cfg.num_embeddings} | "
            f"{100 * comp['latent_bits_per_volume_bits']:.2f} % | {params / 1e6:.2f} M | "
            f"{val.get('psnr_brain', float('nan')):.2f} | {val.get('psnr', float('nan')):.2f} | "
            f"{val.get('ssim', float('nan')):.3f} | {val.get('codebook_usage', float('nan')):.2f} | "
            f"{(1 / max(speed)) if speed else float('nan'):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, help="a bundle folder whose autoencoder_training.csv is the baseline")
    ap.add_argument("--at", type=int, nargs="+", default=[250, 500], help="steps whose validation is compared")
    a = ap.parse_args()
    designs = []
    if a.baseline:
        cfg = json.loads((a.baseline / "config.json").read_text())
        designs.append((f"baseline ({cfg['name']}, the start of its log)",
                        AutoencoderConfig.from_dict(cfg["autoencoder"]["config"]),
                        read_metrics(a.baseline / "autoencoder_training.csv"), get_grid(cfg["grid"]["name"])))
    for run in a.runs:
        info = json.loads((run / "run.json").read_text())
        cfg = AutoencoderConfig.from_dict(info["config"]["model"])
        designs.append((run.name, cfg, read_metrics(run / "metrics.csv"), get_grid(info["grid"])))
    lines = [f"| {at} " + row(name, cfg, rows, grid, at) for at in a.at for name, cfg, rows, grid in designs
             if any(r["split"] == "val" and r["step"] == at for r in rows)]
    body = (f"Held-out validation (8 subjects) after {' and '.join(map(str, a.at))} optimiser steps of batch 1, "
            "lr 3e-4 with a 200-step "
            "warm-up, L1 + 0.1 spectral loss, the same data and seed. Size budget: code bits / bits of the volume as "
            "16-bit integers (at most 1 %). s/step: fastest logged rate, one thread (the runs shared the 2 cores "
            "with each other, so times are upper bounds; the baseline's comes from its own run with 2 threads). "
            "abl-d was stopped after 250 steps: its codebook usage (14 %) was already far behind.\n\n"
            "| step | design | channels | latent (C x X x Y x Z) | codes | code bits | parameters | PSNR brain (dB) | "
            "PSNR (dB) | SSIM | codebook usage | s/step |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")
    write_section("Stage-1 ablation at an equal size budget",
                  "python benchmarks/autoencoder_ablation.py --runs " + " ".join(str(r) for r in a.runs)
                  + (f" --baseline {a.baseline}" if a.baseline else ""), body)


if __name__ == "__main__":
    main()
