"""VQ-VAE speed and memory on the demo grid: training step, encode, decode, peak memory.

    python benchmarks/autoencoder_speed.py [--bundle BUNDLE] [--threads 2] [--repeats 5]

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own.
The networks are the bundle's (default: the shipped demo bundle); training uses the default losses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from synthbrain.bundle import load_bundle
from synthbrain.models.autoencoder import Autoencoder
from synthbrain.training.autoencoder import AutoencoderStage, AutoencoderTraining
from synthbrain.training.distributed import DistContext
what, bundle, repeats = sys.argv[1], sys.argv[2] or None, int(sys.argv[4])
b = load_bundle(bundle, components=("autoencoder",))
shape = b.grid.shape
times = []
if what.startswith("train"):
    batch = int(what[-1])
    cfg = AutoencoderTraining()
    model = Autoencoder(b.autoencoder.config)
    stage = AutoencoderStage(model, cfg, torch.device("cpu"), DistContext())
    opt = stage.optimizers["autoencoder"]
    x = torch.rand(batch, 1, *shape)
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        stage.train_step(x, 10_000, lambda loss, name: loss.backward())
        opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t0)
else:
    ae = b.autoencoder
    x = torch.rand(1, 1, *shape)
    with torch.inference_mode():
        z = ae.encode(x); q = ae.quantize_eval(z)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            if what == "encode":
                ae.quantize_eval(ae.encode(x))
            else:
                ae.decode(q)
            times.append(time.perf_counter() - t0)
times = sorted(times[1:])
print(json.dumps({"median_s": times[len(times) // 2], "min_s": times[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from synthbrain.bundle import load_bundle

    b = load_bundle(args.bundle or None, components=("autoencoder",))
    rows = []
    for what, label in (("train1", "training step, batch 1 (forward + backward + AdamW)"),
                        ("train2", "training step, batch 2"), ("encode", "encode + quantise, 1 volume"),
                        ("decode", "decode, 1 volume")):
        out = subprocess.run([sys.executable, "-c", CHILD, what, args.bundle, str(args.threads), str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(f"| {label} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['peak_rss_mb']:.0f} |")
        print(rows[-1])
    cfg = b.autoencoder.config
    comp = cfg.compression(b.grid.shape)
    body = (f"Grid {b.grid.name} {'x'.join(map(str, b.grid.shape))}; VQ-VAE channels {list(cfg.channels)}, "
            f"{cfg.num_res_layers} residual layer(s) per level, {cfg.num_embeddings} codes x {cfg.embedding_dim} dims, "
            f"{sum(p.numel() for p in b.autoencoder.parameters()) / 1e6:.1f} M parameters; "
            f"latent {comp['latent_shape']} "
            f"= {100 * comp['latent_values_per_voxel']:.2f} % of the voxels. {args.threads} threads, "
            f"median of {args.repeats} after a warm-up.\n\n"
            "| what | median (s) | best (s) | peak RSS (MB) |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_section("VQ-VAE speed and memory (CPU)",
                  f"python benchmarks/autoencoder_speed.py --threads {args.threads} --repeats {args.repeats}", body)


if __name__ == "__main__":
    main()
