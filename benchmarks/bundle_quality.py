"""Copy a bundle's measured quality (metrics.json, written by `synthbrain evaluate`) into results.md.

    synthbrain evaluate autoencoder --bundle B --data D      # measures, writes B/metrics.json
    synthbrain evaluate prior --bundle B --data D
    python benchmarks/bundle_quality.py [--bundle B]           # default: the shipped demo bundle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=None)
    args = ap.parse_args()
    from synthbrain.bundle import load_bundle

    b = load_bundle(args.bundle, components=())
    m, cfg = b.metrics, b.config
    if "autoencoder" in m:
        a = m["autoencoder"]
        body = (f"{a['subjects']} {'held-out' if a['held_out'] else ''} subjects of `{a['data']}`, "
                f"autoencoder trained {cfg['autoencoder']['steps_trained']} steps.\n\n"
                "| metric | value | goal |\n|---|---|---|\n"
                f"| PSNR (whole volume) | {a['psnr']:.2f} dB (sd {a['psnr_sd']:.2f}) | >= 32 dB |\n"
                f"| SSIM | {a['ssim']:.4f} (sd {a['ssim_sd']:.4f}) | >= 0.97 |\n"
                f"| MS-SSIM | {a['ms_ssim']:.4f} | |\n| MAE | {a['mae']:.4f} (intensity 0..1) | |\n"
                f"| PSNR (brain voxels only) | {a['psnr_brain']:.2f} dB | |\n"
                f"| latent values / voxels | {100 * a['latent_values_per_voxel']:.3f} % "
                f"({a['latent_shape']}) | <= 1 % |\n"
                f"| code bits / 16-bit voxel bits | {100 * a['latent_bits_per_volume_bits']:.3f} % | |\n"
                f"| codebook usage / perplexity | {100 * a['codebook_usage']:.1f} % / {a['perplexity']:.0f} | |\n"
                f"| encode + decode, 1 volume | {a['seconds_per_volume_encode_decode']:.3f} s ({a['device']}) | |\n")
        write_section("VQ-VAE fidelity (demo bundle, held-out phantom subjects)",
                      "synthbrain evaluate autoencoder --bundle synthbrain/assets/demo --data <phantom-demo>", body)
        print(body)
    if "prior" in m:
        p = m["prior"]
        v, br, age = p["ventricular_volume_adherence"], p["brain_volume_adherence"], p["ageing"]
        d, r = p["diversity"], p["realism"]
        body = (f"{p['subjects']} requested condition sets (real subjects' combinations from `{p['data']}`), "
                f"{p['steps']} steps of {p.get('sampler', 'DDIM')}, guidance {p['guidance']}, "
                f"{p.get('precision', 'fp32')}, prior trained "
                f"{cfg['prior']['steps_trained']} steps; {p.get('unmeasurable_samples', 0)} samples unmeasurable.\n\n"
                "| metric | value | goal |\n|---|---|---|\n"
                f"| ventricular volume: r / MAE / bias | "
                f"{v['r']:.3f} / {v['mae']:.1f} mL / {v['bias']:+.1f} mL | r >= 0.95 |\n"
                f"| brain volume: r / MAE / bias | "
                f"{br['r']:.3f} / {br['mae']:.1f} mL / {br['bias']:+.1f} mL | r >= 0.90 |\n"
                f"| ageing: same seed, ventricles larger at {age['ages'][1]:g} than {age['ages'][0]:g} | "
                f"{100 * age['share_larger_ventricles_when_older']:.0f} % of {age['seeds']} seeds "
                f"(mean +{age['mean_ventricle_increase_mL']:.1f} mL) | >= 95 % |\n"
                f"| diversity: MS-SSIM among samples of one condition / among real subjects | "
                f"{d['ms_ssim_synthetic_same_condition']:.3f} / {d['ms_ssim_real_subjects']:.3f} "
                "| lower = more diverse |\n"
                f"| realism: MMD on VQ-VAE features, synthetic vs real / real vs real | "
                f"{r['mmd_vqvae_features_synthetic_vs_real']:.4g} / "
                f"{r['mmd_vqvae_features_real_vs_real_halves']:.4g} | |\n"
                f"| sampling time | {p['seconds_per_sample']:.2f} s per brain ({p['device']}) | |\n")
        write_section("Conditional prior (demo bundle)",
                      "synthbrain evaluate prior --bundle synthbrain/assets/demo --data <phantom-demo-1000>", body)
        print(body)


if __name__ == "__main__":
    main()
