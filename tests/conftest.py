"""Shared fixtures. Sections: NIfTI files written to a temp dir (good and bad), phantom cohorts.

Session-scoped fixtures are shared by every test that asks for them, so they must be treated as
read-only: a test that changes a dataset (or constructs a ``BIDSDataset``, which writes its cache
into the dataset) takes ``cohort_copy`` instead.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

# ------------------------------------------------------------------------------------ NIfTI files

SHAPE = (12, 10, 9)
AFFINE = np.array([[2.0, 0, 0, -12], [0, 2, 0, -10], [0, 0, 2.5, -9], [0, 0, 0, 1]])


def random_data(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """A NIfTI file as any other tool would write it (nibabel, no checks of ours)."""
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def crafted_nifti(path: Path, shape, *, dtype=np.float32, payload: bytes | None = None,
                  affine: np.ndarray = AFFINE, slope=None, inter=0.0) -> Path:
    """A single-file NIfTI-1 built byte by byte (header, extension flag, then ``payload``), for
    defects nibabel would refuse to write."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(affine, code=4)  # sform only: no qform decomposition, so any matrix goes in
    hdr["vox_offset"] = 352
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    raw = hdr.binaryblock + b"\0" * 4 + (payload if payload is not None else b"")
    path.write_bytes(gzip.compress(raw, compresslevel=1) if str(path).endswith(".gz") else raw)
    return path


def _raw(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _truncated_gz(p: Path) -> Path:
    full = save_nifti(p / "cut.nii.gz", random_data())
    raw = full.read_bytes()
    full.write_bytes(raw[: len(raw) // 2])
    return full


def _truncated_nii(p: Path) -> Path:
    full = save_nifti(p / "cut.nii", random_data())
    full.write_bytes(full.read_bytes()[:-100])
    return full


def _gzip_bomb(p: Path, forged_trailer: bool = False) -> Path:
    # A header declaring 8 x 8 x 8 uint8 (864 bytes) followed by 50 MB of zeros.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 8, 8))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    packed = bytearray(gzip.compress(hdr.binaryblock + bytes(4 + 50_000_000), compresslevel=1))
    if forged_trailer:  # the trailer agrees with the header, so only the capped stream can tell
        packed[-4:] = (352 + 512).to_bytes(4, "little")
    path = p / "bomb.nii.gz"
    path.write_bytes(bytes(packed))
    return path


# case -> (builder(folder) -> path, a fragment the error message must contain)
BAD_NIFTI = {
    "truncated .nii.gz": (_truncated_gz, "truncated"),
    "truncated .nii": (_truncated_nii, "truncated"),
    "4D with 5 volumes": (lambda p: save_nifti(p / "dwi.nii.gz", np.zeros((*SHAPE, 5), np.float32)),
                          "5 volumes"),
    "2D": (lambda p: save_nifti(p / "slice.nii.gz", np.zeros((16, 16), np.float32)), "2D"),
    "NaN voxels": (lambda p: save_nifti(p / "nan.nii.gz", np.where(
        np.arange(np.prod(SHAPE)).reshape(SHAPE) < 3, np.nan, 1.0).astype(np.float32)), "3 of"),
    "1024^3 declared, tiny file": (lambda p: crafted_nifti(p / "huge.nii.gz", (1024, 1024, 1024)), "GiB"),
    "1024^3 declared, tiny .nii": (lambda p: crafted_nifti(p / "huge.nii", (1024, 1024, 1024)), "GiB"),
    # Under the size limit, so only the gzip trailer / file size shows the data are missing.
    "512^3 declared, tiny file": (lambda p: crafted_nifti(p / "big.nii.gz", (512, 512, 512)), "gzip trailer"),
    "512^3 declared, tiny .nii": (lambda p: crafted_nifti(p / "big.nii", (512, 512, 512)), "truncated"),
    "dimension 2000": (lambda p: crafted_nifti(p / "wide.nii.gz", (2000, 16, 16)), "8..1024"),
    "dimension 4": (lambda p: crafted_nifti(p / "small.nii.gz", (4, 16, 16)), "8..1024"),
    "zero-size file": (lambda p: _raw(p / "empty.nii.gz", b""), "empty"),
    "singular affine": (lambda p: crafted_nifti(p / "singular.nii.gz", SHAPE, affine=np.array(
        [[1.0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])), "singular"),
    "sheared affine": (lambda p: crafted_nifti(p / "shear.nii.gz", SHAPE, affine=np.array(
        [[1.0, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), "sheared"),
    "voxel size 0": (lambda p: crafted_nifti(p / "flat.nii.gz", SHAPE, affine=np.diag([0.0, 1, 1, 1])),
                     "voxel size"),
    "voxel size 20 mm": (lambda p: crafted_nifti(p / "coarse.nii.gz", SHAPE, affine=np.diag([20.0, 1, 1, 1])),
                         "voxel size"),
    "NaN affine": (lambda p: crafted_nifti(p / "nanaff.nii.gz", SHAPE, affine=np.diag([np.nan, 1, 1, 1])),
                   "NaN or infinite"),
    "text named .nii.gz": (lambda p: _raw(p / "notes.nii.gz", b"hello\n" * 100), "not gzip"),
    "text named .nii": (lambda p: _raw(p / "notes.nii", b"hello\n" * 100), "not a NIfTI"),
    "gzipped text": (lambda p: _raw(p / "zipped.nii.gz", gzip.compress(b"hello\n" * 100)), "not a NIfTI"),
    "complex data": (lambda p: save_nifti(p / "complex.nii.gz", np.zeros(SHAPE, np.complex64)),
                     "unsupported data"),
    "gzip bomb": (_gzip_bomb, "gzip trailer"),
    "gzip bomb, forged trailer": (lambda p: _gzip_bomb(p, forged_trailer=True), "more than"),
    "wrong extension": (lambda p: save_nifti(p / "brain.img", random_data()), ".nii or .nii.gz"),
}


@dataclass(frozen=True)
class BadNifti:
    case: str
    path: Path
    expected: str  # a fragment of the error message


@pytest.fixture(params=list(BAD_NIFTI), ids=list(BAD_NIFTI))
def bad_nifti(request, tmp_path) -> BadNifti:
    """One malformed file per case of ``BAD_NIFTI``, written into a fresh folder of its own.

    Restrict it to some cases with ``@pytest.mark.parametrize("bad_nifti", [...], indirect=True)``.
    """
    folder = tmp_path / "bad"
    folder.mkdir()
    build, expected = BAD_NIFTI[request.param]
    return BadNifti(request.param, build(folder), expected)


@pytest.fixture
def nifti() -> SimpleNamespace:
    """The file helpers above, for tests that write their own small NIfTI files."""
    return SimpleNamespace(random=random_data, save=save_nifti, crafted=crafted_nifti)


# ----------------------------------------------------------------------------------- phantom cohorts


@dataclass(frozen=True)
class PhantomCohort:
    """A BIDS phantom cohort written by ``generate_cohort(root, n, grid, seed)``."""

    root: Path
    n: int
    seed: int
    grid: str

    @property
    def labels(self) -> list[str]:
        return [f"sub-{i + 1:04d}" for i in range(self.n)]

    def t1w(self, label: str) -> Path:
        return self.root / label / "anat" / f"{label}_T1w.nii.gz"

    def dseg(self, label: str) -> Path:
        from synthbrain.grids import SPACE, get_grid

        res = get_grid(self.grid).res_label
        name = f"{label}_space-{SPACE}_res-{res}_dseg.nii.gz"
        return self.root / "derivatives" / "phantom" / label / "anat" / name

    def participants(self) -> list[dict[str, str]]:
        from synthbrain.data.bids import read_tsv

        return read_tsv(self.root / "participants.tsv")


def _generate(tmp_path_factory, name: str, n: int, seed: int, grid: str = "demo", jobs: int = 1) -> PhantomCohort:
    from synthbrain.data.cohort import generate_cohort

    root = generate_cohort(tmp_path_factory.mktemp(name), n=n, grid=grid, seed=seed, jobs=jobs)
    return PhantomCohort(root, n, seed, grid)


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> PhantomCohort:
    """6 phantom subjects on the demo grid (seed 3): about 25 s once per session. Read-only."""
    return _generate(tmp_path_factory, "phantom_cohort", n=6, seed=3)


@pytest.fixture(scope="session")
def large_phantom_cohort(tmp_path_factory) -> PhantomCohort:
    """20 phantom subjects on the demo grid (seed 11), ages spread over 40..90, rendered in 2 worker
    processes: about 30 s more. For ``slow`` tests only. Read-only."""
    return _generate(tmp_path_factory, "large_phantom_cohort", n=20, seed=11, jobs=2)


@pytest.fixture
def cohort_copy(phantom_cohort, tmp_path) -> PhantomCohort:
    """A private copy of ``phantom_cohort`` that a test may change (file times are kept)."""
    root = shutil.copytree(phantom_cohort.root, tmp_path / "cohort")
    return PhantomCohort(root, phantom_cohort.n, phantom_cohort.seed, phantom_cohort.grid)


# ------------------------------------------------------------------------------------ tiny models

# defined in the package, so that benchmarks/ use the same ones without importing this file
from synthbrain.testing import TINY_AUTOENCODER, TINY_PRIOR  # noqa: E402


def subprocess_env() -> dict:
    """Environment for CLI subprocesses: one thread each (two cores; no oversubscription)."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli_in_process(*args):
    """``synthbrain ARGS`` run in this process (click's CliRunner), one torch thread, as a subprocess of
    :func:`subprocess_env` would run it: the same commands and options, without importing torch and
    MONAI again (4-6 s a process on 2 cores). For tests about what a command does; tests about the
    process itself (exit codes, one-line errors, signals, memory limits) run ``python -m synthbrain``.
    Fails the test with the command's output when it exits non-zero."""
    import torch
    from typer.testing import CliRunner

    from synthbrain.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, f"synthbrain {' '.join(map(str, args))}:\n{result.output}"
    return result


def write_json(path: Path, obj) -> Path:
    import json

    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> PhantomCohort:
    """10 phantom subjects on the 5 mm ``tiny`` grid (32 x 48 x 32), for training tests. Read-only."""
    return _generate(tmp_path_factory, "tiny_cohort", n=10, seed=5, grid="tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_cohort) -> Path:
    """A bundle with a tiny autoencoder and prior trained a few steps on ``tiny_cohort``. Read-only."""
    from synthbrain.training.autoencoder import train_autoencoder
    from synthbrain.training.prior import train_prior

    base = tmp_path_factory.mktemp("tiny_bundle")
    data = shutil.copytree(tiny_cohort.root, base / "data")
    ae = train_autoencoder(data, base / "ae", grid="tiny",
                           config_file=write_json(base / "ae.json", TINY_AUTOENCODER))
    return train_prior(ae, data, base / "prior", config_file=write_json(base / "prior.json", TINY_PRIOR))


@pytest.fixture(scope="session")
def private_bundle(tmp_path_factory, tiny_bundle, tiny_cohort) -> Path:
    """The tiny autoencoder with a tiny prior trained with 3 of the 10 subjects held out (enough to
    calibrate an audit); its training data is ``bundle.parents[1] / "datasets" / "cohort"``. Read-only."""
    from synthbrain.training.prior import train_prior

    base = tmp_path_factory.mktemp("private_bundle")
    data = shutil.copytree(tiny_cohort.root, base / "datasets" / "cohort")
    cfg = json.loads(json.dumps(TINY_PRIOR))
    cfg["train"].update(val_fraction=0.4, val_every=0)
    return train_prior(tiny_bundle, data, base / "prior", config_file=write_json(base / "p.json", cfg))


# a cohort's own conditions, as a schema file declares them (no volumes: a real cohort's participants.tsv
# rarely has them); sex is coded 1/2 in the table, as in many spreadsheets
DIAGNOSIS_SCHEMA = {"conditions": [
    {"name": "age", "kind": "continuous", "unit": "years", "range": [18, 100], "description": "age at scan"},
    {"name": "sex", "kind": "binary", "levels": ["F", "M"], "codes": {"1": "M", "2": "F"}},
    {"name": "diagnosis", "kind": "categorical", "levels": ["CN", "MCI", "AD"], "label": "Diagnosis",
     "description": "clinical group"},
]}
DIAGNOSES = ("CN", "MCI", "AD")


def write_tsv(path: Path, rows: list[dict]) -> Path:
    cols = list(rows[0])
    path.write_text("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def diagnosis_bundle(tmp_path_factory, tiny_bundle) -> SimpleNamespace:
    """A tiny prior trained by the real command line (``synthbrain train prior --schema``) on the tiny
    cohort with a diagnosis column, on ``tiny_bundle``'s autoencoder. The phantom's own diagnoses are all
    CN at this size, so the table assigns CN, MCI, AD in turn (the images do not follow them: this
    checks the plumbing, not the anatomy). Read-only."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("diagnosis_bundle")
    data = shutil.copytree(tiny_bundle.parents[1] / "data", base / "data")  # with its preprocessed cache
    from synthbrain.data.bids import read_tsv

    rows = [{"participant_id": r["participant_id"], "age": r["age"], "sex": "1" if r["sex"] == "M" else "2",
             "diagnosis": DIAGNOSES[i % 3], "site": "A"} for i, r in enumerate(read_tsv(data / "participants.tsv"))]
    write_tsv(data / "participants.tsv", rows)
    schema = write_json(base / "schema.json", DIAGNOSIS_SCHEMA)
    cmd = [sys.executable, "-m", "synthbrain", "train", "prior", "--bundle", str(tiny_bundle), "--data", str(data),
           "--schema", str(schema), "--config", str(write_json(base / "prior.json", TINY_PRIOR)),
           "--device", "cpu", "--out", str(base / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(bundle=base / "run" / "bundle", data=data, schema=schema, rows=rows)


# ------------------------------------------------------------------------------- worker processes


class _PoolTasks(list):
    """(max_workers, last argument) of every task submitted to a module's ``ProcessPoolExecutor``."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self._monkeypatch = monkeypatch

    def watch(self, module) -> None:
        real, tasks = module.ProcessPoolExecutor, self

        def pool(*args, **kwargs):
            p = real(*args, **kwargs)
            submit = p.submit

            def counted(fn, *a, **k):
                tasks.append((kwargs["max_workers"], a[-1]))
                return submit(fn, *a, **k)

            p.submit = counted
            return p

        self._monkeypatch.setattr(module, "ProcessPoolExecutor", pool)


@pytest.fixture
def pool_tasks(monkeypatch) -> _PoolTasks:
    """``pool_tasks.watch(module)``, then the tasks that ``module`` handed to worker processes."""
    return _PoolTasks(monkeypatch)
