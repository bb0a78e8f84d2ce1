"""One device session for issue 9 (sharp brains): the GPU check, the demo models trained, evaluated, and
everything that must outlive the machine packed into $OUT.

    bash benchmarks/gpu_session.sh [--budget-s 500] [--phase all]     # on the device (step 0: wheels)
    bash benchmarks/gpu_session.sh --dry-run --out /tmp/gpu-dry       # here: the same steps, tiny, on the CPU
    python benchmarks/gpu_session.py --import DIR                       # here, after the call: unpack what came back

The exact `run` call, and what to do with what comes back, are in DEVELOPERS.md ("A GPU session").

Budget (device time, one session = 15 min, machine start-up counted). Nothing of this was measured on a GPU
yet: the figures are plans, and the script measures and logs each step (session.json) so that the next
session can size its own.

minutes  what
  1.5    machine start (counted by the device tool)
  0.3    step 0: the carried wheels into /tmp/site (pip --no-index), PYTHONPATH (gpu_session.sh)
  3.3    step 1: benchmarks/gpu_check.py on the GPU (its work folder kept: its steps/s size step 2), while
         the phantom cohort (1000 subjects, demo grid, seed 2026) is rendered and preprocessed on the
         other CPU cores (`synthbrain cohort --jobs N --preprocess`: no registration, so no SimpleITK)
  2.5    step 2a: `synthbrain train autoencoder` (configs/ae-demo-v2-gpu.json, its steps fitted to the
         slot from the check's steps/s; killed at the slot's end, its newest checkpoint is exported)
  2.2    step 2b: `synthbrain train prior` on its latents (configs/prior-demo-v2-gpu.json, likewise)
  0.5    step 3: `synthbrain evaluate autoencoder` (held-out subjects, MNI152 template), then
         `evaluate guidance` while time remains
  0.2    packing $OUT (reserved)
  = 9    call 1: `--budget-s 500` (run's timeout_s 560)
  3      call 2, at once while the machine is warm (30 s): `--phase evaluate --budget-s 150` (guidance,
         prior, privacy of what call 1 trained); or, when call 1 failed in its first minute, the same
         call 1 again after the fix (1.5 + 1 + 1.5 + 9.3 = 13.3 min)
  = 13.5 of the session's 15

The script keeps to `--budget-s` itself: every step gets a deadline, a command that outruns its slot is
killed (training: its newest checkpoint is exported instead), and $OUT is always written before the end.

$OUT (at most 8 files, 16 MiB each, 64 MiB together, flat): session.log (every command's output),
session.json (plan, timings, steps/s, figures, results.md sections, what was packed and what was not),
logs.tar.gz (run.json, metrics.csv and configs of each run; the check's metrics), bundle.tar.part-NN (the
trained bundle: both stages, metrics.json, card, pictures) and ae-checkpoint.tar.part-NN (the newest
autoencoder checkpoint, to resume it in a later session), parts of at most 15 MiB, by that priority.
The prior's checkpoint (4 copies of its 8 M parameters) does not fit and stays behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PART_BYTES = 15 * 2**20                 # each file back <= 16 MiB
MAX_FILES, MAX_BYTES = 8, 62 * 2**20    # of 8 and 64 MiB: a margin for the log written last
SECTION = "GPU session (issue 9)"
# packages the device lacks (KINDS.md): the dry run lets them come from the carried wheels only
DEVICE_LACKS = ("monai", "nibabel", "nilearn", "diffusers", "SimpleITK", "streamlit", "plotly", "pyvista", "vtk",
                "optuna", "optuna_integration", "deepbet", "trame", "playwright", "bids")


@dataclass
class Plan:
    dry: bool
    device: str
    grid: str
    subjects: int
    seed: int
    jobs: int
    ae_config: dict
    prior_config: dict
    slots: dict                          # seconds per step
    guesses: dict                        # steps/s assumed when the check measured none
    min_steps: int
    max_steps: dict
    overestimate: dict = field(default_factory=dict)  # dry run only: factors on the assumed steps/s
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def make_plan(args) -> Plan:
    budget = args.budget_s
    if args.dry_run:
        from synthbrain.testing import TINY_AUTOENCODER, TINY_PRIOR

        ae = json.loads(json.dumps(TINY_AUTOENCODER))
        ae["loss"] = {"adversarial": 0.01, "adversarial_start": 2}
        ae["train"].update(ckpt_every=2, log_every=1, val_every=3)
        prior = json.loads(json.dumps(TINY_PRIOR))
        prior["train"].update(ckpt_every=2, log_every=1, val_every=3)
        # slots for 2 busy CPU cores; the autoencoder's rate is overestimated 20-fold on purpose, so that its
        # slot cuts it and the fallback (its newest checkpoint exported) runs as well
        slots = {"setup": 20, "check": 420, "autoencoder": 90, "prior": 100, "pack": 12}
        return Plan(True, "cpu", "tiny", args.subjects or 12, 2026, args.jobs or 2, ae, prior, slots=slots,
                    guesses={"autoencoder": 2.0, "prior": 5.0}, min_steps=4,
                    max_steps={"autoencoder": 100000, "prior": 8}, overestimate={"autoencoder": 20.0})
    ae = json.loads((ROOT / "benchmarks/configs/ae-demo-v2-gpu.json").read_text())
    prior = json.loads((ROOT / "benchmarks/configs/prior-demo-v2-gpu.json").read_text())
    jobs = args.jobs or max(1, (os.cpu_count() or 4) - 3)  # leaves cores to the check that runs alongside
    return Plan(False, "cuda", "demo", args.subjects or 1000, 2026, jobs, ae, prior, slots=_slots(budget),
                guesses={"autoencoder": 4.0, "prior": 15.0}, min_steps=200,
                max_steps={"autoencoder": 40000, "prior": 40000})


def _slots(budget: float) -> dict:
    """Seconds per step for a budget (the header's table is this at 500 s)."""
    s = budget / 500.0
    return {"setup": 20 * s, "check": 200 * s, "autoencoder": 150 * s, "prior": 130 * s, "pack": 12 * s}


class Session:
    def __init__(self, plan: Plan, out: Path, work: Path, budget: float) -> None:
        self.plan, self.out, self.work = plan, out, work
        self.t0 = time.monotonic()
        self.end = self.t0 + budget
        self.log_path = out / "session.log"
        self.log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed at the end of the session)
        self.data = work / "data" / f"phantom-{plan.grid}-{plan.subjects}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.end - time.monotonic() - self.plan.slots["pack"]

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        self.say(f"start {name}: {' '.join(cmd)}")
        # its own process group, so that a command cut at its limit is killed with its worker processes
        return subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True)

    def wait(self, name: str, proc: subprocess.Popen, limit: float, t_start: float) -> str:
        """'ok', 'failed (rc N)' or 'killed at its limit'; the time goes to plan.timings."""
        try:
            rc = proc.wait(timeout=max(0.01, limit))
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "killed at its limit"
        self.plan.timings[name] = {"seconds": round(time.monotonic() - t_start, 1), "status": status}
        self.say(f"{name}: {status} after {time.monotonic() - t_start:.1f} s")
        return status

    def run(self, name: str, cmd: list[str], limit: float) -> str:
        if limit < 5:
            self.plan.timings[name] = {"seconds": 0, "status": "skipped: no time left"}
            self.say(f"{name}: skipped (no time left)")
            return "skipped"
        t = time.monotonic()
        return self.wait(name, self.start(name, cmd), limit, t)


def synthbrain(*args) -> list[str]:
    """A CLI command; paths inside the checkout are given relative to it (the commands run there), so the
    commands a bundle records read the same on any machine."""
    def arg(a) -> str:
        if isinstance(a, Path):
            a = a.resolve()
            return str(a.relative_to(ROOT)) if a.is_relative_to(ROOT) else str(a)
        return str(a)

    return [sys.executable, "-m", "synthbrain", *map(arg, args)]


# --------------------------------------------------------------------------------------- step 1

def step_check_and_cohort(s: Session, phase: str) -> None:
    p = s.plan
    procs = []  # (name, process, deadline)
    t = time.monotonic()
    if phase in ("all", "check"):
        check = [sys.executable, "benchmarks/gpu_check.py", "--out", str(s.work / "gpu-check")]
        if p.dry:
            check.append("--cpu-dry-run")
        # the check's CPU side (its cohorts) gets 2 threads; the cohort's workers take the other cores
        procs.append(("gpu_check", s.start("gpu_check", check, dict(s.env, OMP_NUM_THREADS="2")),
                      t + p.slots["check"]))
    if phase in ("all", "train") and not (s.data / "participants.tsv").is_file():
        if s.data.exists():
            shutil.rmtree(s.data)  # a cohort killed half-way: made again (same seed, same files)
        s.data.parent.mkdir(parents=True, exist_ok=True)
        cmd = synthbrain("cohort", "--n", str(p.subjects), "--grid", p.grid, "--seed", str(p.seed), "--jobs",
                         str(p.jobs), "--preprocess", "--out", s.data)
        procs.append(("cohort", s.start("cohort", cmd, dict(s.env, OMP_NUM_THREADS="1")), t + s.left()))
    while procs:  # each is timed when it ends, and killed with its workers at its deadline
        for item in list(procs):
            name, proc, deadline = item
            now = time.monotonic()
            if proc.poll() is not None or now >= min(deadline, now + s.left()):
                s.wait(name, proc, 0.0, t)
                procs.remove(item)
        time.sleep(0.5)
    if "cohort" in p.timings and p.timings["cohort"]["status"] == "ok":
        p.timings["cohort"]["seconds_per_subject_per_job"] = round(
            p.timings["cohort"]["seconds"] * p.jobs / p.subjects, 2)


# --------------------------------------------------------------------------------------- step 2

def last_rate(metrics_csv: Path) -> float | None:
    """The newest steps/s a run logged (its first rows include start-up)."""
    import csv

    if not metrics_csv.is_file():
        return None
    with open(metrics_csv, newline="") as f:
        rates = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "steps_per_s" and r["split"] == "train"]
    return rates[-1] if rates else None


def newest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (``checkpoints/step-N``), or None."""
    found = [d for d in (run / "checkpoints").glob("step-*")
             if (d / "state.json").is_file() and (d / "tensors.safetensors").is_file()]
    return max(found, key=lambda d: int(d.name.split("-")[1])) if found else None


def newest_checkpoint_step(run: Path) -> int | None:
    d = newest_checkpoint(run)
    return int(d.name.split("-")[1]) if d else None


def read_volume_seconds(s: Session, n: int = 16) -> float:
    """Seconds to read one preprocessed volume here (training reads every one at its start)."""
    files = sorted((s.data / "derivatives" / "synthbrain").rglob("*_desc-preproc_T1w.nii.gz"))[:n]
    if not files:
        return 0.05
    code = ("import sys, time; from synthbrain.io import read_volume; t = time.perf_counter()\n"
            "for f in sys.argv[1:]: read_volume(f)\nprint((time.perf_counter() - t) / len(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, cwd=ROOT,
                       env=s.env)
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0.05


def fit_steps(s: Session, stage: str, rate: float, slot: float, overhead: float) -> int:
    p = s.plan
    ckpt = p.ae_config["train"]["ckpt_every"] if stage == "autoencoder" else p.prior_config["train"]["ckpt_every"]
    n = int(rate * max(slot - overhead, 0.0) * 0.85)
    n = min(max(n, p.min_steps), p.max_steps[stage])
    return max(ckpt, n // ckpt * ckpt) if n >= ckpt else n


def train_stage(s: Session, stage: str, rate_check: float | None, check_batch: int, overhead: float) -> Path | None:
    """Train one stage within its slot; returns its bundle, or None."""
    p = s.plan
    cfg = json.loads(json.dumps(p.ae_config if stage == "autoencoder" else p.prior_config))
    run = s.work / "runs" / stage
    slot = min(p.slots[stage], s.left())
    if rate_check is not None:
        rate = rate_check * check_batch / cfg["train"]["batch_size"]  # the check ran a smaller batch: rate per volume
        source = f"from the check ({rate_check:.2f} steps/s at batch {check_batch})"
    else:
        rate, source = p.guesses[stage], "a guess (the check measured none)"
    rate *= p.overestimate.get(stage, 1.0)
    steps = fit_steps(s, stage, rate, slot, overhead)
    cfg["train"]["steps"] = steps
    if stage == "autoencoder" and cfg.get("loss", {}).get("adversarial", 0) > 0:
        cfg["loss"]["adversarial_start"] = steps // 3  # the reconstruction first, then the patch GAN
    cfg_file = s.work / f"{stage}-config.json"
    cfg_file.write_text(json.dumps(cfg, indent=1) + "\n")
    p.timings[f"{stage}_plan"] = {"steps": steps, "assumed_steps_per_s": round(rate, 2), "rate_source": source,
                                  "slot_s": round(slot, 1), "overhead_s": round(overhead, 1)}
    s.say(f"{stage}: {steps} steps planned ({rate:.2f} steps/s, {source}; slot {slot:.0f} s, "
          f"overhead {overhead:.0f} s)")
    if stage == "autoencoder":
        cmd = synthbrain("train", "autoencoder", "--data", s.data, "--grid", p.grid, "--config", cfg_file,
                         "--out", run, "--device", p.device)
    else:
        cmd = synthbrain("train", "prior", "--bundle", s.work / "runs" / "autoencoder" / "bundle", "--data",
                         s.data, "--config", cfg_file, "--out", run, "--device", p.device)
    export_reserve = overhead * 0.6 + 10
    status = s.run(f"train {stage}", cmd, slot - export_reserve)
    p.timings[f"train {stage}"]["steps_per_s"] = last_rate(run / "metrics.csv")
    if status == "ok":
        return run / "bundle"
    last = newest_checkpoint_step(run)
    if status == "killed at its limit" and last:
        # export what the newest checkpoint holds: --resume --steps at that step trains nothing more
        again = [*cmd[: cmd.index("--config")], "--resume", "--steps", str(last), *cmd[cmd.index("--out"):]]
        s.notes.append(f"{stage}: cut at its slot; exported its checkpoint at step {last} of {steps}")
        if s.run(f"export {stage} at step {last}", again, s.left()) == "ok":
            return run / "bundle"
    return None


# --------------------------------------------------------------------------------------- step 3

def evaluate(s: Session, bundle: Path, which: list[str]) -> None:
    p = s.plan
    guidance_values = "1,2,3" if p.dry else "1,1.5,2,3,5"
    commands = {
        "autoencoder": synthbrain("evaluate", "autoencoder", "--bundle", bundle, "--data", s.data,
                                  "--device", p.device),
        "guidance": synthbrain("evaluate", "guidance", "--bundle", bundle, "--data", s.data, "--values",
                               guidance_values, "--n-conditions", "4" if p.dry else "16", "--device", p.device),
        "prior": synthbrain("evaluate", "prior", "--bundle", bundle, "--data", s.data, "--device", p.device,
                            *(["--n-conditions", "4", "--n-ageing", "2"] if p.dry else [])),
        "privacy": synthbrain("evaluate", "privacy", "--bundle", bundle, "--data", s.data, "--n-samples",
                              "4" if p.dry else "50", "--device", p.device),
    }
    for name in which:
        if name == "autoencoder" or (bundle / "prior.safetensors").is_file():
            s.run(f"evaluate {name}", commands[name], s.left())


# ------------------------------------------------------------------------------------------ pack

def tar_parts(s: Session, name: str, members: list[tuple[Path, str]], gz: bool = False) -> list[Path]:
    """``members`` (path, name in the archive) as one tar in the work folder, split into <= 15 MiB parts
    (1 MiB in a dry run, so that its small bundle is split and joined too)."""
    part_bytes = 2**20 if s.plan.dry else PART_BYTES
    missing = [a for m, a in members if not m.exists()]
    if missing and name != "logs":  # the logs of steps that did not run are missing by design
        s.notes.append(f"{name}: not found, so not packed: {', '.join(missing)}")
    members = [(m, a) for m, a in members if m.exists()]
    if not members:
        return []
    path = s.work / "pack" / (name + (".tar.gz" if gz else ".tar"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for m, arcname in members:
            tar.add(m, arcname=arcname)
    if path.stat().st_size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        for i in range(math.ceil(path.stat().st_size / part_bytes)):
            part = path.with_name(f"{path.name}.part-{i:02d}")
            part.write_bytes(f.read(part_bytes))
            parts.append(part)
    path.unlink()
    return parts


def results_sections(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"<!-- ([^/][^>]*?) -->\n.*?<!-- /\1 -->\n", text, re.S)}


def pack(s: Session, bundle: Path | None) -> dict:
    """Copy into $OUT, by priority, what fits its limits; returns what was packed and what was left."""
    runs = s.work / "runs"
    logs = [(s.work / f"{st}-config.json", f"{st}-config.json") for st in ("autoencoder", "prior")]
    for st in ("autoencoder", "prior"):
        logs += [(runs / st / f, f"{st}/{f}") for f in ("run.json", "metrics.csv")]
    logs += [(s.work / "gpu-check" / st / "metrics.csv", f"gpu-check/{st}-metrics.csv") for st in ("ae", "prior")]
    items = [("logs", logs, True)]
    if bundle is not None:
        items.append(("bundle", [(bundle, "bundle")], False))
    ck = newest_checkpoint(runs / "autoencoder")
    if ck is not None:
        items.append(("ae-checkpoint", [(ck, f"autoencoder/checkpoints/{ck.name}"),
                                        (runs / "autoencoder" / "run.json", "autoencoder/run.json"),
                                        (runs / "autoencoder" / "metrics.csv", "autoencoder/metrics.csv")], False))
    packed, left_out = {}, []
    files = 2  # session.log and session.json
    used = s.log_path.stat().st_size + 256 * 1024
    for name, members, gz in items:
        parts = tar_parts(s, name, members, gz)
        size = sum(p.stat().st_size for p in parts)
        if not parts:
            continue
        if files + len(parts) > MAX_FILES or used + size > MAX_BYTES:
            left_out.append(f"{name} ({len(parts)} files, {size / 2**20:.1f} MiB: over the limits of what comes back)")
            continue
        for part in parts:
            shutil.copy2(part, s.out / part.name)
        files += len(parts)
        used += size
        packed[name] = {"files": [p.name for p in parts], "mib": round(size / 2**20, 2)}
    return {"packed": packed, "left_out": left_out}


def check_out_limits(out: Path) -> list[str]:
    """What the device tool would not bring back from ``out``."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > 8:
        problems.append(f"{len(files)} files (at most 8)")
    for p in files:
        if p.stat().st_size > 16 * 2**20:
            problems.append(f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB (at most 16)")
        if len(p.relative_to(out).parts) > 3 or not re.fullmatch(r"[A-Za-z0-9._-]+", p.name):
            problems.append(f"{p}: too deep or an odd name")
    total = sum(p.stat().st_size for p in files)
    if total > 64 * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB together (at most 64)")
    return problems


# ------------------------------------------------------------------------------------------ main

def session(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or "")
    if not str(out):
        print("gpu_session: --out or $OUT names the folder whose files come back", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args)
    work = Path(args.work) if args.work else (Path(tempfile.mkdtemp(prefix="gpu-session-")) if plan.dry
                                               else ROOT / "runs" / "gpu-session")
    work.mkdir(parents=True, exist_ok=True)
    s = Session(plan, out, work, args.budget_s)
    s.notes = plan.notes
    import torch

    if not plan.dry and not torch.cuda.is_available():
        print("gpu_session: no CUDA device here (--dry-run runs the same steps on the CPU)", file=sys.stderr)
        return 2
    s.say(f"plan: phase {args.phase}, budget {args.budget_s:.0f} s, slots {json.dumps(plan.slots)}, "
          f"{plan.subjects} subjects on the {plan.grid} grid, {plan.jobs} jobs, work folder {work}")
    bundle, rc = None, 0
    try:
        if args.phase in ("all", "check", "train"):
            step_check_and_cohort(s, args.phase)
        if args.phase in ("all", "train") and (s.data / "participants.tsv").is_file():
            per_volume = read_volume_seconds(s)
            plan.timings["read_one_volume_s"] = round(per_volume, 4)
            check_ae, check_prior = (last_rate(work / "gpu-check" / d / "metrics.csv") for d in ("ae", "prior"))
            ae_bundle = train_stage(s, "autoencoder", check_ae, 2, 20 + 1.2 * per_volume * plan.subjects)
            if ae_bundle is not None:
                bundle = train_stage(s, "prior", check_prior, 8, 25 + 1.5 * per_volume * plan.subjects) or ae_bundle
        elif args.phase == "evaluate":
            for cand in (work / "runs" / "prior" / "bundle", work / "runs" / "autoencoder" / "bundle"):
                if (cand / "config.json").is_file():
                    bundle = cand
                    break
        if bundle is not None:
            which = ["autoencoder", "guidance"] if args.phase == "all" else ["guidance", "prior", "privacy"]
            if args.phase == "evaluate" and "evaluate autoencoder" not in plan.timings:
                which = ["autoencoder", *which] if not (bundle / "reconstruction.png").is_file() else which
            evaluate(s, bundle, which)
    finally:
        summary = {"plan": asdict(plan), "phase": args.phase, "budget_s": args.budget_s,
                   "elapsed_s": round(s.elapsed(), 1), "bundle": bundle if bundle else None}
        if bundle is not None and (bundle / "metrics.json").is_file():
            summary["metrics"] = json.loads((bundle / "metrics.json").read_text())
        body = section_body(summary)
        summary["section"] = body
        if not plan.dry:
            from _results import RESULTS, write_section

            write_section(SECTION, "bash benchmarks/gpu_session.sh --budget-s " + f"{args.budget_s:g}", body)
            summary["results_sections"] = {k: v for k, v in results_sections(RESULTS.read_text()).items()
                                           if k in ("GPU check", SECTION)}
        summary.update(pack(s, bundle))
        s.say(f"packed {json.dumps(summary['packed'])}; left out {summary['left_out']}")
        (out / "session.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        s.log.close()
        problems = check_out_limits(out)
        if problems:
            print(f"gpu_session: $OUT is over the limits: {problems}", file=sys.stderr)
            rc = 1
    print(f"gpu_session: done in {s.elapsed():.0f} s; $OUT: " + ", ".join(
        f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in sorted(out.iterdir())))
    return rc


def section_body(summary: dict) -> str:
    t = summary["plan"]["timings"]
    lines = ["| step | seconds | status | note |", "|---|---|---|---|"]
    for name, row in t.items():
        if not isinstance(row, dict) or "status" not in row:
            continue
        note = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("seconds", "status") and v is not None)
        lines.append(f"| {name} | {row['seconds']} | {row['status']} | {note} |")
    for stage in ("autoencoder", "prior"):
        if f"{stage}_plan" in t:
            pl = t[f"{stage}_plan"]
            lines.append(f"\n{stage}: {pl['steps']} steps planned at {pl['assumed_steps_per_s']} steps/s "
                         f"({pl['rate_source']}), slot {pl['slot_s']} s.")
    m = summary.get("metrics", {})
    ae = m.get("autoencoder", m)
    if isinstance(ae, dict) and "psnr_brain" in ae:
        lines.append(f"\nHeld-out autoencoder: PSNR {ae['psnr_brain']:.2f} dB in the brain, {ae['psnr']:.2f} dB whole "
                     f"volume, SSIM {ae['ssim']:.4f} (`synthbrain evaluate autoencoder`).")
    lines.append(f"\nWhole call {summary['elapsed_s']} s of a {summary['budget_s']:g} s budget "
                 f"(phase {summary['phase']}). " + " ".join(summary["plan"]["notes"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- import

def import_results(src: Path, dest: Path) -> int:
    """Here, after the call: join the parts, unpack bundle and checkpoint under ``dest``, and copy the
    device's results.md sections into benchmarks/results.md."""
    summary = json.loads((src / "session.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("logs.tar.gz", "bundle.tar", "ae-checkpoint.tar"):
        parts = sorted(src.glob(f"{name}.part-*")) or ([src / name] if (src / name).is_file() else [])
        if not parts:
            continue
        joined = dest / name
        with open(joined, "wb") as f:
            for part in parts:
                f.write(part.read_bytes())
        with tarfile.open(joined) as tar:
            tar.extractall(dest / name.split(".")[0], filter="data")
        joined.unlink()
        print(f"unpacked {name} ({len(parts)} part(s)) -> {dest / name.split('.')[0]}")
    config = dest / "bundle" / "bundle" / "config.json"
    if config.is_file():
        notes = dest / "CARD_NOTES.md"
        notes.write_text(card_notes(json.loads(config.read_text()), summary))
        print(f"a draft of the bundle's CARD_NOTES.md (for promote_demo_bundle.py --notes): {notes}")
    from _results import import_section

    for name, text in summary.get("results_sections", {}).items():
        import_section(name, text)
        print(f"results.md: section '{name}' from the device")
    return 0


def card_notes(config: dict, summary: dict) -> str:
    """How a session's bundle was made: the commands the bundle recorded, in the order they ran."""
    p = summary["plan"]
    lines = ["## How this bundle was made", "",
             f"In one device session (one NVIDIA H200; `bash benchmarks/gpu_session.sh --budget-s "
             f"{summary['budget_s']:g}`, see DEVELOPERS.md), with the project's own commands:", "", "```bash",
             f"synthbrain cohort --n {p['subjects']} --grid {p['grid']} --seed {p['seed']} --jobs {p['jobs']} "
             f"--preprocess --out runs/gpu-session/data/phantom-{p['grid']}-{p['subjects']}"]
    for stage in ("autoencoder", "prior"):
        lines += (config.get(stage) or {}).get("commands") or []
    lines += ["```", "", "Then, on 2 CPU cores, the same cohort made again and the figures measured with "
              "`benchmarks/promote_demo_bundle.py` (`synthbrain evaluate autoencoder`, `guidance`, `prior`, "
              "`privacy` on it).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="where the files that come back go (default: $OUT)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: runs/gpu-session; dry: a temp one)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="seconds this call may take, packing included")
    ap.add_argument("--phase", choices=("all", "check", "train", "evaluate"), default="all")
    ap.add_argument("--subjects", type=int, default=None, help="phantom subjects (default 1000; dry 12)")
    ap.add_argument("--jobs", type=int, default=None, help="cohort processes (default: cores - 3; dry 2)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU: tiny networks, the 5 mm grid")
    ap.add_argument("--import", dest="import_dir", type=Path, default=None,
                    help="unpack a session's returned files (the run tool's files_at) here")
    ap.add_argument("--into", type=Path, default=ROOT / "runs" / "gpu-import", help="with --import: where to")
    args = ap.parse_args()
    if args.import_dir is not None:
        return import_results(args.import_dir, args.into)
    return session(args)


if __name__ == "__main__":
    sys.exit(main())
