"""The real ``synthbrain`` command in a subprocess: help, cohort, measure, preprocess, and bad input
that must end in one error line naming the file, exit code 2 and no output file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import subprocess_env

from synthbrain.data.bids import read_tsv
from synthbrain.data.cohort import sample_subject
from synthbrain.io import read_volume
from synthbrain.measure import measure_volume

HEAVY = ("torch", "monai", "nibabel", "numpy", "scipy", "nilearn", "sklearn", "streamlit", "pyvista")


def synthbrain(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "synthbrain", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_help_lists_the_commands_without_heavy_imports(tmp_path):
    # "--help is instant" means: nothing heavy is imported (its time is in benchmarks/, not here)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "synthbrain", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for command in ("cohort", "measure", "preprocess"):
        assert command in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported  # the import log was read
    assert not imported & set(HEAVY)  # heavy imports wait for a command that needs them


@pytest.mark.slow
def test_cohort_writes_a_phantom_dataset(tmp_path):
    out = tmp_path / "cohort"
    result = synthbrain("cohort", "--n", 2, "--grid", "demo", "--seed", 5, "--out", out, cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert f"wrote 2 phantom subjects to {out}" in result.stdout
    rows = read_tsv(out / "participants.tsv")
    assert [r["participant_id"] for r in rows] == ["sub-0001", "sub-0002"]
    for i, row in enumerate(rows):
        t1w = out / row["participant_id"] / "anat" / f"{row['participant_id']}_T1w.nii.gz"
        assert read_volume(t1w).shape == (80, 112, 80)  # the demo grid
        sidecar = json.loads(t1w.with_name(t1w.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Parameters"]["age"] == sample_subject(5, i).age  # the seed was passed on
    assert not any((tmp_path / "cwd").iterdir())


def test_measure_writes_a_tsv(tmp_path, phantom_cohort):
    t1w = phantom_cohort.t1w(phantom_cohort.labels[0])
    result = synthbrain("measure", t1w, "--out", tmp_path / "volumes.tsv", cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    rows = read_tsv(tmp_path / "volumes.tsv")
    assert len(rows) == 1 and rows[0]["file"] == str(t1w)
    expected = measure_volume(read_volume(t1w))
    assert float(rows[0]["brain_volume"]) == pytest.approx(expected.brain_volume, abs=0.01)
    assert float(rows[0]["ventricular_volume"]) == pytest.approx(expected.ventricular_volume, abs=0.01)
    assert not any((tmp_path / "cwd").iterdir())


def test_measure_a_folder_to_stdout_skips_derivatives(tmp_path, phantom_cohort):
    result = synthbrain("measure", phantom_cohort.root, cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# volumes in mL"
    assert lines[1].split("\t") == ["file", "brain_volume", "ventricular_volume", "intracranial_volume"]
    files = [line.split("\t")[0] for line in lines[2:]]
    assert files == [str(phantom_cohort.t1w(label)) for label in phantom_cohort.labels]  # no label maps


def test_preprocess_fills_the_derivative_cache(cohort_copy, tmp_path):
    result = synthbrain("preprocess", cohort_copy.root, "--grid", "demo", cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    assert f"preprocessed {cohort_copy.n} subjects" in result.stdout
    cached = sorted((cohort_copy.root / "derivatives" / "synthbrain").rglob("*_desc-preproc_T1w.nii.gz"))
    assert len(cached) == cohort_copy.n


# ------------------------------------------------------------------------------------ bad input

MALFORMED = ["truncated .nii.gz", "4D with 5 volumes", "NaN voxels", "1024^3 declared, tiny file",
             "zero-size file", "singular affine", "text named .nii.gz"]


# runs a command and reports its exit code and peak RSS (KiB) on stdout, its stderr as its own
PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr)")


def _measure_bad(bad_nifti, tmp_path):
    """`synthbrain measure BAD --out ...`: (result with the command's exit code, its peak RSS in MiB, out)."""
    out = tmp_path / "volumes.tsv"
    (tmp_path / "cwd").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "synthbrain", "measure",
                        str(bad_nifti.path), "--out", str(out)], cwd=tmp_path / "cwd", capture_output=True,
                       text=True, timeout=120, env=subprocess_env())
    code, peak_kib = (int(x) for x in r.stdout.split())
    return subprocess.CompletedProcess(r.args, code, "", r.stderr), peak_kib / 1024, out


@pytest.mark.parametrize("bad_nifti", MALFORMED, indirect=True)
def test_malformed_file_gives_one_error_line_exit_2_and_no_output(bad_nifti, tmp_path):
    result, peak_mib, out = _measure_bad(bad_nifti, tmp_path)
    assert result.returncode == 2
    # refused from its header and a bounded read, never by allocating what it declares (4 GiB for
    # 1024^3); how long that takes is in benchmarks/results.md
    assert peak_mib < 512, f"peak RSS {peak_mib:.0f} MiB"
    errors = [line for line in result.stderr.splitlines() if line.startswith("synthbrain: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"synthbrain: error: {bad_nifti.path.name}: ")
    assert bad_nifti.expected in errors[0]
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]  # the last word
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert [p.name for p in bad_nifti.path.parent.iterdir()] == [bad_nifti.path.name]
    assert not any((tmp_path / "cwd").iterdir())


@pytest.mark.parametrize("bad_nifti", MALFORMED[:1], indirect=True)
def test_malformed_file_leaves_nothing_on_stderr_but_the_error(bad_nifti, tmp_path):
    result, _, _ = _measure_bad(bad_nifti, tmp_path)
    assert result.stderr.splitlines() == [result.stderr.splitlines()[-1]]


def test_missing_file_is_named(tmp_path):
    out = tmp_path / "v.tsv"
    result = synthbrain("measure", tmp_path / "absent.nii.gz", "--out", out, cwd=tmp_path / "cwd")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "synthbrain: error: absent.nii.gz: file not found"
    assert not out.exists()


def test_broken_dataset_is_named(cohort_copy, tmp_path):
    (cohort_copy.root / "participants.tsv").unlink()
    result = synthbrain("preprocess", cohort_copy.root, cwd=tmp_path / "cwd")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("synthbrain: error: ")
    assert "participants.tsv: file not found" in result.stderr
    assert not (cohort_copy.root / "derivatives" / "synthbrain").exists()
