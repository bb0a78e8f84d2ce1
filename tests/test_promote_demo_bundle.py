"""benchmarks/promote_demo_bundle.py: a trained bundle replaces the demo bundle only if it follows the
requested volumes at least as well (its guidance sweep at its default guidance); tiny bundles stand in."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "promote_demo_bundle.py"


def _with_sweep(src: Path, dest: Path, guidance: float, vent_r: float, brain_r: float, vent_mae: float,
                brain_mae: float) -> Path:
    from synthbrain.bundle import update_metrics

    path = shutil.copytree(src, dest)
    update_metrics(path, "guidance_sweep", {"curve": [
        {"guidance": g, "ventricular_volume": {"r": vent_r - d, "mae": vent_mae + 10 * d},
         "brain_volume": {"r": brain_r - d, "mae": brain_mae + 10 * d}}
        for g, d in ((guidance - 1, 0.1), (guidance, 0.0), (guidance + 1, 0.05))]})
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _promote(capsys, monkeypatch, *args) -> SimpleNamespace:
    """The script's main() in this process (its own imports are the test's), as its command line runs it."""
    spec = importlib.util.spec_from_file_location("promote_demo_bundle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
    capsys.readouterr()
    code = module.main()
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture
def bundles(tiny_bundle, tmp_path):
    from synthbrain.bundle import read_config

    g = float(read_config(tiny_bundle)["prior"]["config"]["default_guidance"])
    shipped = _with_sweep(tiny_bundle, tmp_path / "shipped", g, 0.95, 0.96, 6.0, 40.0)
    notes = tmp_path / "CARD_NOTES.md"
    notes.write_text("## How this bundle was made\n\n```bash\nbash benchmarks/gpu_session.sh --budget-s 500\n```\n")
    return tmp_path, g, shipped, notes


def test_a_candidate_worse_in_any_figure_is_refused_and_nothing_changes(bundles, tiny_bundle, capsys, monkeypatch):
    tmp, g, shipped, notes = bundles
    before = _files(shipped)
    # as good in three figures, worse in one: brain MAE 41 mL against 40
    worse = _with_sweep(tiny_bundle, tmp / "worse", g, 0.99, 0.99, 1.0, 41.0)
    r = _promote(capsys, monkeypatch, worse, "--shipped", shipped, "--notes", notes, "--no-evaluate",
                 "--backups", tmp / "kept")
    assert r.returncode == 1, r.stderr
    assert "refused" in r.stderr and "brain MAE (mL): candidate 41.000, shipped 40.000" in r.stderr
    assert "ventricles r" not in r.stderr  # the figures it matches are not named
    assert _files(shipped) == before
    assert not (tmp / "kept").exists() and not list(tmp.glob(".shipped-staged*"))


def test_a_candidate_without_a_sweep_at_its_default_guidance_is_an_error(bundles, tiny_bundle, capsys,
                                                                         monkeypatch):
    tmp, g, shipped, notes = bundles
    other = _with_sweep(tiny_bundle, tmp / "other", g + 10, 0.99, 0.99, 1.0, 1.0)  # swept elsewhere only
    r = _promote(capsys, monkeypatch, other, "--shipped", shipped, "--notes", notes, "--no-evaluate")
    assert r.returncode == 2
    assert "no guidance sweep point at its default guidance" in r.stderr and "evaluate guidance" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_a_candidate_as_good_everywhere_replaces_the_shipped_bundle(bundles, tiny_bundle, capsys, monkeypatch):
    from synthbrain.bundle import load_bundle

    tmp, g, shipped, notes = bundles
    better = _with_sweep(tiny_bundle, tmp / "better", g, 0.95, 0.99, 5.0, 40.0)  # equal in two figures
    old = _files(shipped)
    r = _promote(capsys, monkeypatch, better, "--shipped", shipped, "--notes", notes, "--no-evaluate",
                 "--backups", tmp / "kept")
    assert r.returncode == 0, r.stderr
    (kept,) = (tmp / "kept").iterdir()
    assert _files(kept) == old  # the replaced bundle is kept whole
    assert (shipped / "CARD_NOTES.md").read_text() == notes.read_text()
    assert "gpu_session.sh" in (shipped / "MODEL_CARD.md").read_text()
    sweep = json.loads((shipped / "metrics.json").read_text())["guidance_sweep"]["curve"]
    assert [p["brain_volume"]["r"] for p in sweep if p["guidance"] == g] == [0.99]
    assert load_bundle(shipped).prior is not None  # loads, checksums and all


def test_after_a_change_of_truth_the_candidate_meets_floors_instead_of_the_old_figures(bundles, tiny_bundle, capsys,
                                                                                       monkeypatch):
    """--truth-changed: the shipped figures were measured against another definition of the volumes, so a
    candidate with larger MAEs passes when its r reach 0.95; one under the floor is refused, naming it."""
    tmp, g, shipped, notes = bundles
    args = ("--shipped", shipped, "--notes", notes, "--no-evaluate", "--backups", tmp / "kept",
            "--truth-changed", "the fissure is not ventricle")
    low = _with_sweep(tiny_bundle, tmp / "low", g, 0.94, 0.99, 9.0, 60.0)
    r = _promote(capsys, monkeypatch, low, *args)
    assert r.returncode == 1 and "ventricles r: candidate 0.940, floor 0.950" in r.stderr
    assert "brain" not in r.stderr.split("refused")[1]  # only the figure under its floor is named
    ok = _with_sweep(tiny_bundle, tmp / "ok", g, 0.96, 0.99, 9.0, 60.0)  # worse MAEs than the shipped 6 and 40
    r = _promote(capsys, monkeypatch, ok, *args)
    assert r.returncode == 0, r.stderr
    assert "ventricles 9.00 vs 6.00, brain 60.0 vs 40.0" in r.stdout and "the fissure is not ventricle" in r.stdout
    assert len(list((tmp / "kept").iterdir())) == 1
