"""Training throughput on the CPU with 1 and 2 processes (torchrun, gloo), both stages, demo grid.

    python benchmarks/ddp_throughput.py [--steps 12] [--subjects 8]

Every run is the real command (``synthbrain train autoencoder|prior``; under ``torchrun --standalone
--nproc-per-node 2`` for two processes) with the same global batch: one process of batch 2B with 2
threads, two processes of batch B with 1 thread each (the machine's 2 cores either way), and one
process of batch 2B on 1 thread for reference. Throughput is the median of metrics.csv's steps_per_s
after the first 2 steps (start-up, first allocations), times the global batch. The autoencoder is the
demo bundle's (benchmarks/configs/ae-demo-v2.json), the prior benchmarks/configs/prior-demo-v2.json on
the shipped demo bundle's autoencoder; data: a phantom cohort on the demo grid. The load average
(other users of the machine) is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
WARMUP = 2  # steps left out of the median


def _config(name: str, steps: int, batch: int, out: Path) -> Path:
    c = json.loads((CONFIGS / name).read_text())
    c["train"].update(steps=steps, batch_size=batch, warmup_steps=0, val_every=0, ckpt_every=steps, log_every=1)
    path = out / f"{name[:-5]}-b{batch}.json"
    path.write_text(json.dumps(c))
    return path


def _run(args: list[str], procs: int, threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs > 1 else [sys.executable])
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([*launcher, "-m", "synthbrain", *args, "--out", str(out), "--device", "cpu"], env=env, check=True,
                   capture_output=True)
    wall = time.perf_counter() - t0
    rows = [r for r in _metrics(out / "metrics.csv") if r["name"] == "steps_per_s" and r["step"] > WARMUP]
    return {"steps_per_s": statistics.median(r["value"] for r in rows), "wall_s": wall,
            "load": (load + os.getloadavg()[0]) / 2}


def _metrics(path: Path) -> list[dict]:
    from synthbrain.training.run import read_metrics

    return read_metrics(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--subjects", type=int, default=8)
    args = ap.parse_args()

    from synthbrain.bundle import demo_bundle_path
    from synthbrain.data.cohort import generate_cohort

    base = Path(tempfile.mkdtemp(prefix="ddp-throughput-"))
    data = generate_cohort(base / "data", n=args.subjects, grid="demo", seed=0)
    subprocess.run([sys.executable, "-m", "synthbrain", "preprocess", str(data), "--grid", "demo"], check=True,
                   capture_output=True)  # before the runs: none of them times it
    demo = str(demo_bundle_path())
    stages = {  # (command, config, per-process batch of the 2-process runs)
        "autoencoder": (["train", "autoencoder", "--data", str(data), "--grid", "demo"], "ae-demo-v2.json", 1),
        "prior": (["train", "prior", "--bundle", demo, "--data", str(data)], "prior-demo-v2.json", 4),
    }
    layouts = [("1 process, 2 threads", 1, 2, 2), ("2 processes (torchrun, gloo), 1 thread each", 2, 1, 1),
               ("1 process, 1 thread", 1, 1, 2)]  # (what, processes, threads, per-process batch multiplier)
    rows = []
    for stage, (cmd, config, b) in stages.items():
        if stage == "prior":  # encode the cohort once (the runs then share the cached latents)
            first = base / "prior-encode"
            subprocess.run([sys.executable, "-m", "synthbrain", *cmd, "--out", str(first), "--device", "cpu",
                            "--config", str(_config(config, 1, 2 * b, base))], check=True, capture_output=True)
        for what, procs, threads, mult in layouts:
            out = base / f"{stage}-{procs}x{threads}"
            if stage == "prior":
                out.mkdir()
                os.link(first / "latents.safetensors", out / "latents.safetensors")
            r = _run([*cmd, "--config", str(_config(config, args.steps, b * mult, base))], procs, threads, out)
            global_batch = b * mult * procs
            rows.append((stage, what, global_batch, r))

    lines = ["| stage | layout | global batch | steps/s | subjects/s | vs 1 process, 2 threads | wall (s) | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    ref = {}
    for stage, what, gb, r in rows:
        ref.setdefault(stage, r["steps_per_s"])
        lines.append(f"| {stage} | {what} | {gb} | {r['steps_per_s']:.3f} | {r['steps_per_s'] * gb:.2f} | "
                     f"{r['steps_per_s'] / ref[stage]:.2f}x | {r['wall_s']:.0f} | {r['load']:.1f} |")
    body = (f"Demo grid (80x112x80), {args.subjects} phantom subjects, {args.steps} steps a run, median steps/s "
            f"after step {WARMUP} from metrics.csv (subjects/s = steps/s x global batch). Autoencoder: "
            "ae-demo-v2.json (the demo bundle's VQ-VAE); prior: prior-demo-v2.json on the demo bundle's latents. "
            "Wall time includes start-up (imports, process group, data loading). 'load avg' is the machine's "
            "1-minute load average during the run: the machine (2 cores) was shared with other jobs, so the "
            "figures are a lower bound and vary from run to run. Under such load one process with 2 OpenMP "
            "threads can be far slower than with 1 (its threads wait for each other whenever one is descheduled), "
            "so read the 2-process row against both 1-process rows.\n\n" + "\n".join(lines))
    shutil.rmtree(base)
    write_section("Training throughput: 1 vs 2 processes (CPU, gloo)",
                  f"python benchmarks/ddp_throughput.py --steps {args.steps} --subjects {args.subjects}", body)
    print(body)


if __name__ == "__main__":
    main()
