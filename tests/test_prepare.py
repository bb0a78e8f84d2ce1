"""``synthbrain prepare`` and the prepared-volume check, on real files made from the MNI152 template:
copies moved as a scanner would see them (rotated up to 15 degrees, shifted up to 20 mm, stored LPS,
a 256 x 256 x 180 mm field of view, a bias field, a synthetic skull and scalp) are refused by every
door before ``prepare`` and land on the template after it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import subprocess_env
from nilearn.datasets import MNI152_FILE_PATH
from scipy import ndimage as ndi

from synthbrain.data import native as scanner
from synthbrain.data.bids import BIDSDataset, read_tsv
from synthbrain.data.prepare import (
    QC_COLUMNS,
    QC_TABLE,
    check_prepared,
    output_paths,
    prepare_dataset,
    to_subject_space,
)
from synthbrain.data.template import load_template
from synthbrain.errors import DatasetError, UnpreparedVolumeError
from synthbrain.grids import DEMO
from synthbrain.io import Volume, read_volume, sidecar_path

# ------------------------------------------------------------------------------ native-space copies


def native_copy(t1: Volume, data: np.ndarray, rot_deg, shift_mm, **kw) -> Volume:
    """``data`` rotated about the MNI brain's centre and shifted, on a scanner grid (``synthbrain.data.native``)."""
    return scanner.native_copy(t1, data, scanner.motion(rot_deg, shift_mm, load_template(DEMO).centroid_mm), **kw)


# label -> (rotation degrees, shift mm, options); all at 2 mm (the fast tests)
CASES = {
    "sub-rot": ((15, 0, 0), (12, -10, 12), {"bias": 0.3}),               # 15 degrees, 19.8 mm, bias field
    "sub-lps": ((0, 8, 10), (-15, 5, 10), {"lps": True}),                # stored LPS on disk
    "sub-skull": ((6, -5, 3), (0, 8, -6), {"shell": True, "shape": (128, 128, 90)}),  # 256 x 256 x 180 mm
}


@pytest.fixture(scope="module")
def mni() -> Volume:
    return read_volume(MNI152_FILE_PATH)


def _write_case(root, label, mni, rot, shift, opts) -> None:
    opts = dict(opts)
    data = scanner.head_with_shell(mni) if opts.pop("shell", False) else mni.data
    vol = native_copy(mni, data, rot, shift, **opts)
    path = root / label / "anat" / f"{label}_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(vol.data, vol.affine), path)


@pytest.fixture(scope="module")
def native(tmp_path_factory, mni):
    """A BIDS dataset of the native-space copies (participants.tsv with ages only)."""
    root = tmp_path_factory.mktemp("native")
    for label, (rot, shift, opts) in CASES.items():
        _write_case(root, label, mni, rot, shift, opts)
    (root / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"{k}\t70\n" for k in CASES))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, native):
    """The dataset after ``prepare`` (a copy, so that ``native`` stays unprepared): (root, summary, steps)."""
    root = shutil.copytree(native, tmp_path_factory.mktemp("prepared") / "bids")
    steps = []
    summary = prepare_dataset([root], grid="demo", on_step=lambda i, n, info: steps.append((i, n, dict(info))))
    return root, summary, steps


def _centroid_mm(data: np.ndarray) -> np.ndarray:
    return DEMO.voxel_to_world(np.array(ndi.center_of_mass(data > 0))[None])[0]


# ------------------------------------------------------------------------------------------ check


def test_shipped_data_passes_the_check(mni, phantom_cohort, tiny_cohort):
    vols = [mni, Volume(load_template(DEMO).t1 * 900.0, DEMO.affine)]
    vols += [read_volume(c.t1w(label)) for c in (phantom_cohort, tiny_cohort) for label in c.labels[:4]]
    for vol in vols:
        p = check_prepared(vol)
        assert p.ok, (vol.source, p.reasons)
        assert p.rotation_deg < 2.0 and p.shift_mm < 4.0 and p.outside_ml < 5.0


def test_each_native_copy_is_refused_with_its_reasons(native):
    for label in CASES:
        p = check_prepared(read_volume(native / label / "anat" / f"{label}_T1w.nii.gz"))
        assert not p.ok
        assert p.rotation_deg > 5.0 and p.shift_mm > 6.0  # every copy is moved beyond the limits
    skull = check_prepared(read_volume(native / "sub-skull" / "anat" / "sub-skull_T1w.nii.gz"))
    assert any("skull or scalp" in r for r in skull.reasons) and skull.outside_ml > 200


def test_a_scan_outside_mni_space_is_refused_by_its_field_of_view(mni):
    affine = mni.affine.copy()
    affine[:3, 3] = 0.0  # scanner coordinates: the array's corner at the origin
    p = check_prepared(Volume(mni.data, affine, source="scanner.nii.gz"))
    assert not p.ok and "field of view" in p.reasons[0]


def test_every_door_refuses_an_unprepared_scan(native, tmp_path):
    from synthbrain.bundle import load_bundle
    from synthbrain.reconstruction import reconstruct

    scan = read_volume(native / "sub-rot" / "anat" / "sub-rot_T1w.nii.gz")
    with pytest.raises(UnpreparedVolumeError, match=r"^sub-rot_T1w\.nii\.gz: not prepared: .*synthbrain prepare"):
        reconstruct(load_bundle(components=("autoencoder",)), scan)
    # training data: the dataset names the subject and says what to run
    data = shutil.copytree(native, tmp_path / "bids")
    from synthbrain.conditions import ConditionSchema

    ds = BIDSDataset(data, grid="demo", schema=ConditionSchema(()))
    with pytest.raises(DatasetError, match=r"^sub-lps: .*not prepared.*synthbrain prepare"):
        ds.volume(ds.labels.index("sub-lps"))
    assert not (data / "derivatives").exists() or not list((data / "derivatives").rglob("*.nii.gz"))


def test_cli_reconstruct_and_measure_refuse_in_one_line(native, tmp_path, monkeypatch, capsys):
    from synthbrain.cli import main

    scan = native / "sub-skull" / "anat" / "sub-skull_T1w.nii.gz"
    for args in (["reconstruct", str(scan), "--out", str(tmp_path / "rec.nii.gz")], ["measure", str(scan)]):
        monkeypatch.setattr(sys, "argv", ["synthbrain", *args])
        assert main() == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("synthbrain: error: sub-skull_T1w.nii.gz: not prepared:")
        assert "skull or scalp" in line and "synthbrain prepare" in line
    assert not (tmp_path / "rec.nii.gz").exists()


# ---------------------------------------------------------------------------------------- prepare


def test_prepared_copies_land_on_the_template(prepared, native):
    root, summary, steps = prepared
    assert summary.prepared == sorted(CASES) and not summary.failed and not summary.skipped
    assert steps[-1][:2] == (3, 3) and {s[2]["subject"] for s in steps} == set(CASES)
    tmpl = load_template(DEMO)
    far = ndi.distance_transform_edt(tmpl.brain <= 0.5) * DEMO.spacing > 10.0
    out = root / "derivatives" / "synthbrain"
    for label in CASES:
        paths = output_paths(out, label, DEMO)
        vol = read_volume(paths["t1w"])
        np.testing.assert_array_equal(vol.affine, DEMO.affine)
        inside = tmpl.brain > 0.5
        r = np.corrcoef(vol.data[inside], tmpl.t1[inside])[0, 1]
        assert r >= 0.95, (label, r)
        assert np.linalg.norm(_centroid_mm(vol.data) - _centroid_mm(tmpl.t1)) <= 2.0
        assert not np.any(vol.data[far] > 0)  # skull and scalp are gone
        assert vol.data.min() >= 0.0 and vol.data.max() == 1.0
        assert check_prepared(vol).ok
        side = json.loads(paths["t1w"].with_name(paths["t1w"].name.replace(".nii.gz", ".json")).read_text())
        qc = side["Prepare"]["QC"]
        assert qc["brain_extraction"] == "deepbet" and not qc["flags"]
        rot, shift, _ = CASES[label]
        assert qc["input_shift_mm"] == pytest.approx(np.linalg.norm(shift), abs=1.5)


def test_the_transform_maps_a_result_back_onto_the_scan(prepared, native, mni):
    root, _, _ = prepared
    label = "sub-lps"
    paths = output_paths(root / "derivatives" / "synthbrain", label, DEMO)
    scan = read_volume(native / label / "anat" / f"{label}_T1w.nii.gz")
    back = to_subject_space(read_volume(paths["mask"]), paths["transform"], scan, order=0)
    truth = scan.data > 0.05 * scan.data.max()  # the copy's brain in its own space
    dice = 2 * np.sum((back.data > 0) & truth) / (np.sum(back.data > 0) + truth.sum())
    assert dice > 0.9


def test_qc_table_and_pictures(prepared):
    from PIL import Image

    root, summary, _ = prepared
    rows = read_tsv(summary.qc_table)
    assert summary.qc_table == root / "derivatives" / "synthbrain" / QC_TABLE
    assert list(rows[0]) == QC_COLUMNS and [r["subject"] for r in rows] == sorted(CASES)
    for r in rows:
        assert r["status"] == "prepared" and r["flags"] == "none"
        assert float(r["correlation"]) >= 0.95 and 1500 < float(r["brain_volume_ml"]) < 2300
        assert float(r["registration_metric"]) > 0.5  # Mattes mutual information (nats)
        png = output_paths(root / "derivatives" / "synthbrain", r["subject"], DEMO)["qc"]
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width == 900 and im.height > 500  # three rows of planes


def test_a_prepared_dataset_trains_as_it_is(prepared):
    from synthbrain.conditions import ConditionSchema

    root, _, _ = prepared
    ds = BIDSDataset(root, grid="demo", schema=ConditionSchema(()))
    for i, label in enumerate(ds.labels):
        want = read_volume(output_paths(root / "derivatives" / "synthbrain", label, DEMO)["t1w"]).data
        np.testing.assert_array_equal(ds.volume(i), want)  # prepare's output, not a fresh (refused) preprocess


def test_cli_resumes_and_reports_failures_by_name(prepared, tmp_path):
    root, _, _ = prepared
    data = shutil.copytree(root, tmp_path / "bids")
    out = data / "derivatives" / "synthbrain"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != QC_TABLE}
    for label, content in (("sub-broken", b"\x1f\x8b not a scan"), ("sub-empty", None)):
        path = data / label / "anat" / f"{label}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        if content is None:
            nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.eye(4)), path)
        else:
            path.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "synthbrain", "prepare", str(data), "--grid", "demo", "--jobs", "2"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("synthbrain: error: ")]
    assert [e.split(":")[2].strip() for e in errors] == ["sub-broken", "sub-empty"]
    assert "Traceback" not in r.stderr
    assert "prepared 0 of 5 subjects (3 already complete, 2 failed)" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # complete subjects untouched
    rows = {row["subject"]: row for row in read_tsv(out / QC_TABLE)}
    assert rows["sub-broken"]["status"] == "failed" and "not gzip" in rows["sub-broken"]["flags"]
    assert rows["sub-rot"]["status"] == "skipped (complete)"


def test_template_mask_fallback_removes_the_skull(native, tmp_path):
    scan = native / "sub-skull" / "anat" / "sub-skull_T1w.nii.gz"
    s = prepare_dataset([scan], tmp_path / "out", "demo", brain_extraction="template")
    assert s.prepared == ["sub-skull"]
    vol = read_volume(output_paths(tmp_path / "out", "sub-skull", DEMO)["t1w"])
    tmpl = load_template(DEMO)
    inside = tmpl.brain > 0.5
    assert np.corrcoef(vol.data[inside], tmpl.t1[inside])[0, 1] >= 0.95
    assert not np.any(vol.data[~inside])  # exactly the template's brain
    assert check_prepared(vol).ok
    assert read_tsv(s.qc_table)[0]["brain_extraction"] == "template"


@pytest.mark.slow
def test_a_1mm_whole_head_scan_lands_on_the_template(mni, tmp_path):
    """256 x 256 x 180 at 1 mm, rotated 12 degrees and shifted 15 mm, with skull and scalp."""
    vol = native_copy(mni, scanner.head_with_shell(mni), (-7, 6, 8), (9, 12, 0), spacing=1.0, shape=(256, 256, 180),
                      bias=0.2)
    path = tmp_path / "sub-head_T1w.nii.gz"
    nib.save(nib.Nifti1Image(vol.data, vol.affine), path)
    assert not check_prepared(read_volume(path)).ok
    s = prepare_dataset([path], tmp_path / "out", "demo")
    assert s.prepared == ["sub-head"], s.failed
    out = read_volume(output_paths(tmp_path / "out", "sub-head", DEMO)["t1w"])
    tmpl = load_template(DEMO)
    inside = tmpl.brain > 0.5
    assert np.corrcoef(out.data[inside], tmpl.t1[inside])[0, 1] >= 0.95
    assert np.linalg.norm(_centroid_mm(out.data) - _centroid_mm(tmpl.t1)) <= 2.0
    assert check_prepared(out).ok


# ------------------------------------------------------- names, provenance, resuming, failures


NAMES = ("JaneDoe", "JohnSmith")  # loose files named after people, as scans often are


@pytest.fixture(scope="module")
def loose(tmp_path_factory, mni):
    """Two loose files named after people, prepared in one run (``--jobs 1``). JaneDoe's brain
    extraction raises a RuntimeError (as torch does on a CUDA fault); JohnSmith's falls back to the
    template mask. Returns (files, out, summary, every text drawn on a QC picture)."""
    from synthbrain.data import prepare
    from synthbrain.viz import slices

    src = tmp_path_factory.mktemp("loose")
    files = []
    for name, rot, shift in ((NAMES[0], (4, 0, 0), (5, 0, 0)), (NAMES[1], (0, 5, -4), (6, 3, -2))):
        vol = native_copy(mni, mni.data, rot, shift)
        files.append(src / f"{name}_T1.nii.gz")
        nib.save(nib.Nifti1Image(vol.data, vol.affine), files[-1])
    texts, calls = [], []
    rows_png = slices.rows_png

    def spy(rows, **kw):
        texts.extend([kw.get("title", ""), kw.get("footer", ""), *(label for label, _ in rows)])
        return rows_png(rows, **kw)

    def extract(data, affine, device):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return None  # as if deepbet were not installed: the template mask

    out = tmp_path_factory.mktemp("prepared") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slices, "rows_png", spy)
        mp.setattr(prepare, "_extract", extract)
        summary = prepare_dataset(files, out, "demo", brain_extraction="auto")
    return files, out, summary, texts


def _plain(path):
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def test_loose_files_leave_no_trace_of_their_names(loose):
    files, out, summary, texts = loose
    by_file = {v: k for k, v in summary.labelled.items()}
    jane, john = by_file[files[0]], by_file[files[1]]
    assert re.fullmatch(r"sub-[0-9a-f]{12}", jane) and re.fullmatch(r"sub-[0-9a-f]{12}", john)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} >= {".gz", ".json", ".tfm", ".png", ".tsv"}
    for p in written:
        text = _plain(p).lower()
        for name in NAMES:
            assert name.lower() not in str(p.relative_to(out)).lower(), p
            assert name.lower().encode() not in text, p
    assert texts and any(john in t for t in texts)
    assert not [t for t in texts for name in NAMES if name.lower() in t.lower()]
    assert not [m for m in summary.failed.values() for name in NAMES if name in m]
    side = json.loads(sidecar_path(output_paths(out, john, DEMO)["t1w"]).read_text())
    assert "Source" not in side and "Sources" not in side and side["SourceFingerprint"].startswith("sha256:")


def test_prepared_outputs_say_real(loose):
    from synthbrain.export import REAL, read_provenance

    _, out, summary, texts = loose
    (john,) = summary.prepared
    paths = output_paths(out, john, DEMO)
    for key in ("t1w", "mask"):
        assert b"REAL" in nib.load(paths[key]).header["descrip"].tobytes()
        assert read_provenance(paths[key]) == REAL
    side = json.loads(sidecar_path(paths["t1w"]).read_text())
    assert side["Provenance"] == REAL and side["Synthetic"] is False
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["Provenance"] == REAL and desc["Synthetic"] is False and desc["DatasetType"] == "derivative"
    assert any("real scan" in t for t in texts)  # the QC picture's title


def test_an_extractor_that_raises_fails_its_subject_by_name_and_the_rest_go_on(loose):
    files, out, summary, _ = loose
    by_file = {v: k for k, v in summary.labelled.items()}
    jane, john = by_file[files[0]], by_file[files[1]]
    assert list(summary.failed) == [jane] and summary.prepared == [john]
    assert "brain extraction with deepbet failed (CUDA error" in summary.failed[jane]
    rows = {r["subject"]: r for r in read_tsv(summary.qc_table)}
    assert list(rows) == [jane, john]
    assert rows[jane]["status"] == "failed" and "--brain-extraction template" in rows[jane]["flags"]
    assert rows[john]["status"] == "prepared" and rows[john]["brain_extraction"] == "template"


def test_resume_redoes_a_subject_when_the_brain_extraction_or_the_code_changes(loose, tmp_path, monkeypatch):
    from synthbrain.data import prepare

    files, out, summary, _ = loose
    out = shutil.copytree(out, tmp_path / "out")
    john = files[1]
    ran = []
    monkeypatch.setattr(prepare, "_run_job", lambda job, *a: ran.append((job.label, a[2])) or
                        {"status": "failed", "error": "stopped by the test"})
    assert prepare_dataset([john], out, "demo", brain_extraction="auto").skipped == summary.prepared
    assert not ran
    prepare_dataset([john], out, "demo", brain_extraction="template")
    assert ran == [(summary.prepared[0], "template")]
    monkeypatch.setattr(prepare, "code_hash", lambda *modules: "0" * 12)  # prepare.py edited since
    assert prepare_dataset([john], out, "demo", brain_extraction="auto").failed
    assert len(ran) == 2


def test_cli_says_which_file_each_label_stands_for(loose, tmp_path, monkeypatch, capsys):
    from synthbrain.cli import main

    files, out, summary, _ = loose
    out = shutil.copytree(out, tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["synthbrain", "prepare", str(files[1]), "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    stdout = capsys.readouterr().out
    assert f"{files[1].name} -> {summary.prepared[0]}" in stdout and "1 already complete" in stdout


def _pool_workers() -> set[int]:
    """This process's children that are multiprocessing spawn workers (not its resource tracker)."""
    pids = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in map(int, (task / "children").read_text().split()):
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        pids.add(pid)
    return pids


def test_a_worker_that_dies_fails_its_subjects_by_name(loose, tmp_path):
    """A worker killed at work (as the kernel's OOM killer does) breaks the process pool: its subject
    (and any not finished) fail by name, the QC table is still written."""
    files, _, summary, _ = loose
    killed, before = [], _pool_workers()

    def at_work(pid: int) -> bool:  # past start-up: its initializer has loaded torch
        with contextlib.suppress(OSError):
            return b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()
        return False

    def kill_a_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in _pool_workers() - before:
                if at_work(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.01)

    t = threading.Thread(target=kill_a_worker)
    t.start()
    s = prepare_dataset(files, tmp_path / "out", "demo", jobs=2, brain_extraction="template")
    t.join()
    assert killed and s.failed
    assert set(s.failed) | set(s.prepared) == set(summary.labelled)
    assert all("worker process died" in m for m in s.failed.values())
    assert {r["subject"]: r["status"] for r in read_tsv(s.qc_table)} == {
        label: "failed" if label in s.failed else "prepared" for label in summary.labelled}
