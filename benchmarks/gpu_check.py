"""GPU check: every CUDA path of SynthBrain once, in one short run (under 5 minutes on one GPU).

    python benchmarks/gpu_check.py [--out DIR] [--no-write]     # on a machine with a GPU
    python benchmarks/gpu_check.py --cpu-dry-run                 # the same steps, tiny, on the CPU

What it runs, on ``cuda:0`` (each step timed, with the peak GPU memory it allocated):
1. a phantom cohort (demo grid) and one on the full grid (1 mm), preprocessed;
2. the autoencoder, bf16 autocast, dead-code restarts (their first restart is step 0) and the
   adversarial loss on, checkpointed; then ``--resume --steps +N`` (the resume path);
3. the prior on that autoencoder, bf16, checkpointed and resumed;
4. ``torchrun --nproc-per-node 2`` (nccl) training of the autoencoder, when there are 2 GPUs (else noted);
5. sampling: seconds per brain at the demo grid (the shipped demo bundle, and the bundle trained here)
   and at the full grid (a bundle trained a few steps on the 1 mm cohort: speed, not quality);
6. ``--device cuda:N`` with N > 0 lands on GPU N, when there is more than one GPU.

The figures go to the "GPU check" section of ``benchmarks/results.md`` (``--no-write``: printed only).
Without CUDA it stops with one line (exit 2); ``--cpu-dry-run`` runs the same plan on the CPU with tiny
networks and the 5 mm grid, to check the script itself, and writes nothing to results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))


@dataclass
class Plan:
    device: str
    grid: str                   # the "demo" grid of the check
    full_grid: str              # the "full" grid of the check
    subjects: int
    full_subjects: int
    ae: dict
    prior: dict
    ae_steps: int
    prior_steps: int
    resume_steps: int           # steps added by each resume
    full_steps: int
    samples: int
    dry: bool = False
    rows: list[dict] = field(default_factory=list)


def gpu_plan() -> Plan:
    ae = {"train": {"batch_size": 2, "lr": 3e-4, "warmup_steps": 5, "val_every": 15, "ckpt_every": 10,
                    "log_every": 5, "val_fraction": 0.25, "seed": 0, "amp": "bf16"},
          "model": {"channels": [32, 64], "num_res_channels": [32, 64], "strides": [2, 2], "num_embeddings": 512,
                    "embedding_dim": 4},
          "loss": {"adversarial": 0.01, "adversarial_start": 10}}
    prior = {"train": {"batch_size": 8, "lr": 2e-4, "warmup_steps": 5, "val_every": 15, "ckpt_every": 10,
                       "log_every": 5, "val_fraction": 0.25, "seed": 0, "amp": "bf16"},
             "model": {"channels": [32, 64, 128], "attention_levels": [False, False, True], "num_head_channels": 32}}
    return Plan("cuda:0", "demo", "full", subjects=8, full_subjects=3, ae=ae, prior=prior, ae_steps=30,
                prior_steps=30, resume_steps=10, full_steps=2, samples=4)


def dry_plan() -> Plan:
    from synthbrain.testing import TINY_AUTOENCODER, TINY_PRIOR

    ae = json.loads(json.dumps(TINY_AUTOENCODER))
    ae["loss"] = {"adversarial": 0.01, "adversarial_start": 2}
    return Plan("cpu", "tiny", "tiny", subjects=6, full_subjects=4, ae=ae, prior=json.loads(json.dumps(TINY_PRIOR)),
                ae_steps=4, prior_steps=4, resume_steps=2, full_steps=2, samples=2, dry=True)


class Meter:
    """Times a step and reads the peak GPU memory it allocated."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, what: str, fn, **extra):
        import torch

        cuda = self.plan.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        row = {"step": what, "seconds": time.perf_counter() - t0,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, **extra}
        if callable(row.get("note")):
            row["note"] = row["note"](result)
        self.plan.rows.append(row)
        print(f"  {what}: {row['seconds']:.1f} s" + (f", peak {row['peak_gib']:.2f} GiB" if cuda else "")
              + (f" ({row['note']})" if row.get("note") else ""), flush=True)
        return result


def steps_per_s(run: Path) -> str:
    from synthbrain.training.run import read_metrics

    rates = [r["value"] for r in read_metrics(run / "metrics.csv") if r["name"] == "steps_per_s"]
    return f"{rates[-1]:.2f} steps/s" if rates else ""


def trained_steps(bundle: Path, stage: str) -> int:
    return json.loads((bundle / "config.json").read_text())[stage]["steps_trained"]


def check(plan: Plan, work: Path) -> None:
    import torch

    from synthbrain.data.cohort import generate_cohort
    from synthbrain.training.autoencoder import train_autoencoder
    from synthbrain.training.prior import train_prior

    m = Meter(plan)
    dev = plan.device
    cfg = {name: work / f"{name}.json" for name in ("ae", "prior")}
    for name, c in (("ae", plan.ae), ("prior", plan.prior)):
        cfg[name].write_text(json.dumps(c))

    def cohort(grid: str, n: int) -> Path:
        # preprocessed by the cohort itself: no registration check, so no SimpleITK (the device lacks it)
        return generate_cohort(work / f"cohort-{grid}-{n}", n=n, grid=grid, seed=1, preprocess=True)

    data = m(f"phantom cohort, {plan.subjects} subjects, {plan.grid} grid (CPU)", lambda: cohort(plan.grid,
                                                                                               plan.subjects))
    ae_run = work / "ae"
    m(f"autoencoder {plan.ae_steps} steps (bf16, dead-code restarts, adversarial)",
      lambda: train_autoencoder(data, ae_run, grid=plan.grid, steps=plan.ae_steps, config_file=cfg["ae"], device=dev),
      note=lambda _: steps_per_s(ae_run))
    ae_bundle = m(f"autoencoder resume +{plan.resume_steps} steps",
                  lambda: train_autoencoder(data, ae_run, grid=plan.grid, steps=plan.ae_steps + plan.resume_steps,
                                            resume=True, device=dev),
                  note=lambda b: f"steps_trained {trained_steps(b, 'autoencoder')}")
    prior_run = work / "prior"
    m(f"prior {plan.prior_steps} steps (bf16)",
      lambda: train_prior(ae_bundle, data, prior_run, steps=plan.prior_steps, config_file=cfg["prior"], device=dev),
      note=lambda _: steps_per_s(prior_run))
    bundle = m(f"prior resume +{plan.resume_steps} steps",
               lambda: train_prior(ae_bundle, data, prior_run, steps=plan.prior_steps + plan.resume_steps,
                                   resume=True, device=dev),
               note=lambda b: f"steps_trained {trained_steps(b, 'prior')}")

    gpus = torch.cuda.device_count() if dev.startswith("cuda") else 0
    if gpus >= 2:
        ddp_run = work / "ddp"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "synthbrain", "train", "autoencoder", "--data", str(data), "--grid", plan.grid, "--config",
               str(cfg["ae"]), "--steps", str(plan.resume_steps), "--out", str(ddp_run), "--device", "cuda"]
        m("2-process DDP (nccl), autoencoder", lambda: subprocess.run(cmd, check=True, capture_output=True),
          note=lambda _: f"world_size {json.loads((ddp_run / 'run.json').read_text())['world_size']}, "
                         + steps_per_s(ddp_run))
        m("--device cuda:1", lambda: train_autoencoder(data, work / "gpu1", grid=plan.grid, steps=2,
                                                         config_file=cfg["ae"], device="cuda:1"),
          note=lambda _: f"{torch.cuda.max_memory_allocated(1) / 2**30:.2f} GiB peak on cuda:1, "
                         f"{torch.cuda.max_memory_allocated(0) / 2**30:.2f} GiB on cuda:0")
    else:
        plan.rows.append({"step": "2-process DDP (nccl)", "seconds": None, "peak_gib": None,
                          "note": f"not run: {gpus} GPU(s) on this machine"})

    sample_rows(plan, m, bundle, f"{plan.grid} grid, bundle trained here")
    if not plan.dry:
        from synthbrain.bundle import demo_bundle_path

        sample_rows(plan, m, demo_bundle_path(), "demo grid, shipped demo bundle")
    full = m(f"phantom cohort, {plan.full_subjects} subjects, {plan.full_grid} grid (CPU)",
             lambda: cohort(plan.full_grid, plan.full_subjects))
    fa = m(f"autoencoder {plan.full_steps} steps on the {plan.full_grid} grid",
           lambda: train_autoencoder(full, work / "full-ae", grid=plan.full_grid, steps=plan.full_steps,
                                     config_file=cfg["ae"], device=dev))
    fb = m(f"prior {plan.full_steps} steps on the {plan.full_grid} grid",
           lambda: train_prior(fa, full, work / "full-prior", steps=plan.full_steps, config_file=cfg["prior"],
                               device=dev))
    sample_rows(plan, m, fb, f"{plan.full_grid} grid, {plan.full_steps}-step bundle (speed only)")


def sample_rows(plan: Plan, m: Meter, bundle_path: Path, what: str) -> None:
    from synthbrain.bundle import load_bundle
    from synthbrain.sampling import Generator

    gen = Generator(load_bundle(bundle_path), device=plan.device, precision="auto")
    gen.sample({}, n=1, seed=0)  # warm-up: kernels, cuDNN autotuning
    out = m(f"sample {plan.samples} brains, {what}", lambda: gen.sample({}, n=plan.samples, seed=1),
            note=lambda s: f"{s[0].seconds:.3f} s per brain, {gen.precision}, {s[0].steps} steps")
    assert all(s.volume.data.shape == gen.grid.shape for s in out)


def table(plan: Plan) -> str:
    lines = ["| step | seconds | peak GPU memory (GiB) | note |", "|---|---|---|---|"]
    for r in plan.rows:
        sec = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['step']} | {sec} | {peak} | {r.get('note') or ''} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--no-write", action="store_true", help="print the figures; leave results.md as it is")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the same plan on the CPU with tiny networks (checks the script; writes nothing)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.cpu_dry_run else str(os.cpu_count() or 1))
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing measured (--cpu-dry-run checks the script on the CPU)", file=sys.stderr)
        return 2
    plan = dry_plan() if args.cpu_dry_run else gpu_plan()
    work = args.out or Path(tempfile.mkdtemp(prefix="synthbrain-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        check(plan, work)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    body = (table(plan) + f"\n\nWhole check: {total:.0f} s. bf16 autocast in training (`train.amp`), "
            "`--precision auto` in sampling; peak memory is `torch.cuda.max_memory_allocated` per step.")
    if torch.cuda.is_available():
        body += (f" {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
                 f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}.")
    print(body)
    if not (args.no_write or plan.dry):
        from _results import write_section

        write_section("GPU check", "python benchmarks/gpu_check.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
