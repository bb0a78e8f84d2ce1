"""Crash-safe training and stopping the server: each case, what the user is told, and how long it takes.

    python benchmarks/crash_safety.py [--repeats 3]

- A tiny run (the ``tiny`` grid, 6 steps, checkpoints at 2 and 4) stopped after 4 steps; its newest
  checkpoint is damaged in each way and ``synthbrain train autoencoder --resume`` is run (a real
  process): the warning it prints, its exit code and its wall time.
- A full disk (ENOSPC from the checkpoint writer, injected in the CLI's own process) while the second
  checkpoint is written: the error line, exit code, time, and whether the previous checkpoint resumes.
- Every command's ``--out`` pointing into /proc, into a missing folder or onto a file: message, exit
  code and time until the process ended (Python start-up included).
- `synthbrain app` stopped with SIGTERM: seconds from the signal until every process of its group
  is gone and the port is closed, idle and with a browser-like WebSocket session open.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from synthbrain.testing import CHECKPOINT_DAMAGE, TINY_AUTOENCODER  # noqa: E402  (shared with tests/)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = {**TINY_AUTOENCODER, "train": {**TINY_AUTOENCODER["train"], "steps": 6, "val_every": 0, "ckpt_every": 2}}

ENOSPC_RUN = """
import errno, sys
from synthbrain.training import checkpoint as ckpt
from synthbrain.cli import main
real, calls = ckpt.save_file, []
def full(tensors, path, *a, **k):
    calls.append(path)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return real(tensors, path, *a, **k)
ckpt.save_file = full
sys.argv = ["synthbrain", *sys.argv[1:]]
sys.exit(main())
"""


def cli(*args, cwd=None):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "synthbrain", *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=cwd)
    return r, time.perf_counter() - t


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def checkpoint_rows(base: Path) -> list[str]:
    from synthbrain.data.cohort import generate_cohort
    from synthbrain.training.checkpoint import list_checkpoints

    data = generate_cohort(base / "data", n=10, grid="tiny", seed=5)
    config = base / "c.json"
    config.write_text(json.dumps(TINY))
    train = ["train", "autoencoder", "--data", data, "--grid", "tiny", "--device", "cpu"]
    r, _ = cli(*train, "--out", base / "part", "--config", config, "--steps", 4)
    assert r.returncode == 0, r.stderr
    rows = []
    for how, damage in CHECKPOINT_DAMAGE.items():
        run = shutil.copytree(base / "part", base / f"run-{len(rows)}")
        damage(list_checkpoints(run)[-1])
        r, s = cli(*train, "--out", run, "--resume", "--steps", 6)
        warning = next((x for x in r.stderr.splitlines() if "warning" in x), last_line(r.stderr))
        rows.append(f"| newest checkpoint {how} | `{warning}` | {r.returncode} | {s:.1f} |")
    run = base / "enospc"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", ENOSPC_RUN, *map(str, train), "--out", str(run), "--config",
                        str(config)], capture_output=True, text=True, env=ENV)
    s = time.perf_counter() - t
    resumed, _ = cli(*train, "--out", run, "--resume")
    msg = last_line(r.stderr).replace(str(base), "$TMP")
    rows.append(f"| disk full while writing checkpoint 4 | `{msg}` ({len(r.stderr.splitlines())} "
                f"line) | {r.returncode} | {s:.1f} (then `--resume`: exit {resumed.returncode}) |")
    return rows


def output_rows(base: Path) -> list[str]:
    (base / "file").write_text("x")
    nx = "/nonexistent"
    cases = [
        ("measure", ["measure", f"{nx}.nii.gz"], "/proc/v.tsv"),
        ("measure", ["measure", f"{nx}.nii.gz"], f"{base}/absent/v.tsv"),
        ("reconstruct", ["reconstruct", f"{nx}.nii.gz", "--bundle", nx], "/proc/r.nii.gz"),
        ("sample", ["sample", "--bundle", nx], f"{base}/file"),
        ("train autoencoder", ["train", "autoencoder", "--data", nx], "/proc/run"),
        ("train prior", ["train", "prior", "--data", nx, "--bundle", nx], f"{base}/file/run"),
        ("audit", ["audit", "--bundle", nx, "--samples", nx, "--train", nx], "/proc/report"),
        ("release", ["release", "--bundle", nx, "--n", "2", "--train", nx], "/proc/release"),
    ]
    rows = []
    for name, args, out in cases:
        r, s = cli(*args, "--out", out, cwd=base)
        msg = last_line(r.stderr).replace(str(base), "$TMP")
        rows.append(f"| `{name} --out {out.replace(str(base), '$TMP')}` | `{msg}` | {r.returncode} | {s:.2f} |")
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_time(with_session: bool) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "synthbrain", "app", "--port", str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                break
        except OSError:
            time.sleep(0.2)
    ws = None
    if with_session:
        ws = socket.create_connection(("127.0.0.1", port))
        ws.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: streamlit\r\n\r\n").encode())
        assert b" 101 " in ws.recv(4096)
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    while True:  # the group (exec: the server itself) is gone once killpg finds nobody
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.01)
        except ProcessLookupError:
            break
    s = time.perf_counter() - t
    if ws is not None:
        ws.close()
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ck = checkpoint_rows(base / "ck")
        (base / "out").mkdir()
        outs = output_rows(base / "out")
    stops = {label: [stop_time(session) for _ in range(args.repeats)]
             for label, session in (("idle", False), ("one WebSocket session open", True))}
    body = ["Training (the `tiny` grid; a real `synthbrain train autoencoder --resume` process per case; the "
            "time includes Python and torch start-up and the 2 remaining steps):", "",
            "| case | what the user sees | exit | seconds |", "|---|---|---|---|", *ck, "",
            "Each resumed run ends with the weights of the uninterrupted run (tests/test_checkpoint.py checks it "
            "bit for bit).", "",
            "Output paths, checked before any work, while the command line is parsed (the time is the whole "
            "process, Python start-up included):", "",
            "| command | message | exit | seconds |", "|---|---|---|---|", *outs, "",
            "Stopping the server: `synthbrain app` (which execs `streamlit run`) sent SIGTERM, seconds until no "
            f"process of its group is left ({args.repeats} runs each):", "",
            "| state | median s | max s |", "|---|---|---|",
            *[f"| {k} | {statistics.median(v):.2f} | {max(v):.2f} |" for k, v in stops.items()]]
    write_section("Crash-safe training and stopping the server", "python benchmarks/crash_safety.py",
                  "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
