"""--out is checked before any work: an output that could not be written (a read-only or pseudo file
system, a missing folder, a file where a folder goes) ends each command in one line naming it, exit
code 2 and no traceback. Every other argument names something that does not exist, so a command that
did any work before checking its output would fail on that instead, with another message."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import subprocess_env

NX = "/nonexistent-synthbrain-input"

# command -> its arguments before --out (inputs that do not exist)
COMMANDS = {
    "cohort": ["cohort", "--n", "1"],  # no input to name: only the eager check stands before its work
    "prepare": ["prepare", f"{NX}.nii.gz"],
    "measure": ["measure", f"{NX}.nii.gz"],
    "reconstruct": ["reconstruct", f"{NX}.nii.gz", "--bundle", NX],
    "sample": ["sample", "--bundle", NX, "--age", "70"],
    "train autoencoder": ["train", "autoencoder", "--data", NX],
    "train prior": ["train", "prior", "--data", NX, "--bundle", NX],
    "audit": ["audit", "--bundle", NX, "--samples", NX, "--train", NX],
    "release": ["release", "--bundle", NX, "--n", "2", "--train", NX],
    "tune autoencoder": ["tune", "autoencoder", "--data", NX],
    "tune prior": ["tune", "prior", "--bundle", NX, "--data", NX],
}
FILE_OUTPUTS = {"measure": "volumes.tsv", "reconstruct": "rec.nii.gz"}


def _cases():
    for command in COMMANDS:
        name = FILE_OUTPUTS.get(command, "out")
        yield command, "pseudo file system", f"/proc/{name}", "cannot write into /proc"
        if command in FILE_OUTPUTS:
            yield command, "missing folder", f"{{tmp}}/absent/{name}", "does not exist"
            yield command, "a folder in its place", "{tmp}", "is a folder"
        else:
            yield command, "a file in its place", "{tmp}/file", "is a file, not a folder"
            yield command, "under a file", "{tmp}/file/run", "is a file, not a folder"


CASES = list(_cases())


def _check(r_code: int, stderr: str, out: str, message: str, tmp_path, before) -> None:
    assert r_code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"synthbrain: error: {out}: ")
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made, no probe left
    assert (tmp_path / "file").read_text() == "not a folder\n"


@pytest.mark.parametrize("command, case, out, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_unwritable_output_is_refused_before_any_work(command, case, out, message, tmp_path, monkeypatch, capsys):
    """In this process (one torch import for all cases); the real command is run below."""
    from synthbrain.cli import main

    (tmp_path / "file").write_text("not a folder\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = out.format(tmp=tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["synthbrain", *COMMANDS[command], "--out", out])
    code = main()
    _check(code, capsys.readouterr().err, out, message, tmp_path, before)


@pytest.mark.parametrize("command", ["measure", "reconstruct"])
def test_the_real_command_refuses_in_one_line(command, tmp_path):
    (tmp_path / "file").write_text("not a folder\n")
    out = f"/proc/{FILE_OUTPUTS[command]}"
    r = subprocess.run([sys.executable, "-m", "synthbrain", *COMMANDS[command], "--out", out], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    _check(r.returncode, r.stderr, out, "cannot write into /proc", tmp_path, ["file"])
    assert "Traceback" not in r.stderr


def test_a_valid_output_passes_the_check_and_the_input_is_named(tmp_path):
    r = subprocess.run([sys.executable, "-m", "synthbrain", "measure", f"{NX}.nii.gz", "--out",
                        str(tmp_path / "v.tsv")], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nonexistent-synthbrain-input.nii.gz: file not found" in r.stderr
    assert not list(tmp_path.iterdir())
