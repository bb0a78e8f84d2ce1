"""Stage-1 bundles side by side: each autoencoder evaluated by `synthbrain evaluate autoencoder` (on a
copy of its bundle, so nothing shipped changes) on the same held-out subjects, in one run.

    python benchmarks/autoencoder_compare.py --bundles synthbrain/assets/demo runs/ae-demo-v2/bundle \\
        --data data/phantom-demo
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _results import write_section

from synthbrain.bundle import copy_bundle
from synthbrain.evaluation import evaluate_autoencoder

ROWS = (("PSNR in the brain (dB)", "psnr_brain", ".2f", ">= 30"), ("SSIM in the brain", "ssim_brain", ".4f", ""),
        ("PSNR whole volume (dB)", "psnr", ".2f", ">= 33"), ("SSIM whole volume", "ssim", ".4f", ">= 0.97"),
        ("MNI152 template: PSNR in the brain (dB)", "mni152_template.psnr_brain", ".2f", ">= 27"),
        ("MNI152 template: SSIM in the brain", "mni152_template.ssim_brain", ".4f", ""),
        ("MS-SSIM", "ms_ssim", ".4f", ""), ("MAE (intensity 0..1)", "mae", ".4f", ""),
        ("codebook usage", "codebook_usage", ".2f", ""),
        ("code bits / 16-bit volume bits", "latent_bits_per_volume_bits", ".2%", "<= 1 %"),
        ("latent values / voxels", "latent_values_per_voxel", ".2%", ""),
        ("encode + decode (s, 1 thread)", "seconds_per_volume_encode_decode", ".3f", ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", nargs="+", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, b in enumerate(a.bundles):
            copy = copy_bundle(b, Path(tmp) / f"b{i}")
            results.append(evaluate_autoencoder(copy, a.data))
    head = "| figure | " + " | ".join(str(b) for b in a.bundles) + " | goal |\n|---|" + "---|" * (len(a.bundles) + 1)
    def value(r: dict, key: str):
        for part in key.split("."):
            r = r[part]
        return r

    lines = [f"| {label} | " + " | ".join(format(value(r, key), fmt) for r in results) + f" | {goal} |"
             for label, key, fmt, goal in ROWS]
    shapes = " vs ".join("x".join(map(str, r["latent_shape"])) for r in results)
    same = "the same for all" if all(r["held_out"] for r in results) else "not held out for every bundle"
    body = (f"{results[0]['subjects']} held-out subjects ({same}) of `{results[0]['data']}`; latents {shapes}. "
            "Times are wall clock on a shared machine (upper bounds).\n\n" + head + "\n" + "\n".join(lines) + "\n")
    write_section("Stage 1 side by side (held-out phantom subjects)",
                  "python benchmarks/autoencoder_compare.py --bundles " + " ".join(map(str, a.bundles))
                  + f" --data {a.data}", body)


if __name__ == "__main__":
    main()
