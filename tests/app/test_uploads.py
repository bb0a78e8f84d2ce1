"""The bounded upload manager on its own (a fake clock, small budgets): only issued ids are kept, files
no widget reads are freed after the grace time, and the budgets free unclaimed files or refuse."""

from __future__ import annotations

import pytest
from starlette.exceptions import HTTPException
from streamlit.runtime.uploaded_file_manager import UploadedFileRec

from app_support.uploads import BoundedUploadedFileManager


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rec(file_id: str, size: int) -> UploadedFileRec:
    return UploadedFileRec(file_id, "scan.nii.gz", "application/gzip", b"x" * size)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def mgr(clock):
    return BoundedUploadedFileManager("/_stcore/upload_file", session_bytes=100, total_bytes=250, grace_s=10,
                                      clock=clock)


def issue(mgr, session: str = "s1", n: int = 1) -> list[str]:
    return [u.file_id for u in mgr.get_upload_urls(session, ["scan.nii.gz"] * n)]


def test_a_made_up_id_is_refused_and_nothing_is_kept(mgr):
    with pytest.raises(HTTPException) as e:
        mgr.add_file("s1", rec("made-up", 50))
    assert e.value.status_code == 403
    (fid,) = issue(mgr, "s2")
    with pytest.raises(HTTPException):  # another session's id
        mgr.add_file("s1", rec(fid, 50))
    assert mgr.held_bytes() == 0 and mgr.refused == 2
    mgr.add_file("s2", rec(fid, 50))
    assert mgr.held_bytes("s2") == 50
    assert [r.file_id for r in mgr.get_files("s2", [fid])] == [fid]


def test_an_issued_id_is_used_once_and_expires(mgr, clock):
    a, b = issue(mgr, n=2)
    mgr.add_file("s1", rec(a, 10))
    mgr.add_file("s1", rec(a, 20))  # the browser may PUT the same id again: a replacement, not a new file
    assert mgr.held_bytes("s1") == 20
    clock.now = 11
    with pytest.raises(HTTPException):
        mgr.add_file("s1", rec(b, 10))


def test_files_no_widget_reads_are_freed_after_the_grace_time(mgr, clock):
    claimed, unclaimed = issue(mgr, n=2)
    mgr.add_file("s1", rec(claimed, 30))
    mgr.add_file("s1", rec(unclaimed, 40))
    assert len(mgr.get_files("s1", [claimed])) == 1  # what a file_uploader does on its script run
    clock.now = 9
    assert mgr.held_bytes() == 70
    clock.now = 11
    assert mgr.get_files("s1", [unclaimed]) == []  # too late: freed
    assert mgr.held_bytes() == 30
    clock.now = 1000
    assert len(mgr.get_files("s1", [claimed])) == 1  # a claimed file lives as long as its session
    mgr.remove_session_files("s1")
    assert mgr.held_bytes() == 0


def test_the_session_budget_frees_its_own_older_files_first(mgr):
    old, new, third = issue(mgr, n=3)
    mgr.add_file("s1", rec(old, 60))
    mgr.get_files("s1", [old])
    mgr.add_file("s1", rec(new, 60))  # the user chose another scan: the older one makes room
    assert mgr.get_files("s1", [old]) == [] and mgr.held_bytes("s1") == 60
    with pytest.raises(HTTPException) as e:
        mgr.add_file("s1", rec(third, 101))  # more than a session may hold at all
    assert e.value.status_code == 507
    assert mgr.held_bytes("s1") == 60


def test_the_server_budget_frees_unclaimed_files_then_refuses(mgr):
    kept = {}
    for s in ("a", "b"):
        (fid,) = issue(mgr, s)
        mgr.add_file(s, rec(fid, 100))
        mgr.get_files(s, [fid])
        kept[s] = fid
    (loose,) = issue(mgr, "c")
    mgr.add_file("c", rec(loose, 40))  # never read by a widget
    (fid,) = issue(mgr, "d")
    mgr.add_file("d", rec(fid, 50))  # 290 > 250: the unclaimed 40 go
    mgr.get_files("d", [fid])
    assert mgr.get_files("c", [loose]) == [] and mgr.held_bytes() == 250
    (fid,) = issue(mgr, "e")
    with pytest.raises(HTTPException) as e:
        mgr.add_file("e", rec(fid, 10))  # only claimed files left: refused, theirs kept
    assert e.value.status_code == 507
    assert all(len(mgr.get_files(s, [f])) == 1 for s, f in kept.items())


def test_synthbrain_apps_server_is_built_with_the_bounded_manager(monkeypatch):
    """``synthbrain app`` execs ``python -m app_support.serve``: Streamlit's Server then builds its upload
    manager from the bounded class, before any request (app.py converts it too, on its first run)."""
    from streamlit.web import cli
    from streamlit.web.server import server

    from app_support import serve

    monkeypatch.setattr(server, "MemoryUploadedFileManager", server.MemoryUploadedFileManager)  # undone after
    called = []
    monkeypatch.setattr(cli, "main", lambda args, prog_name: called.append((args, prog_name)))
    serve.main(["app.py", "--server.port", "8599"])
    assert server.MemoryUploadedFileManager is BoundedUploadedFileManager
    assert called == [(["run", "app.py", "--server.port", "8599"], "streamlit")]


def test_config_keeps_uploads_to_a_scans_size_and_error_details_off():
    import tomllib

    from .app_helpers import ROOT

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == 50  # MB; the README says why
    assert "`server.maxUploadSize` is 50 MB" in (ROOT / "README.md").read_text()
    assert config["client"]["showErrorDetails"] == "none"  # no traceback reaches a browser


@pytest.mark.parametrize("page", ["generate", "compare", "trajectories", "audit", "model", "learn"])
def test_no_page_shows_a_traceback_for_a_broken_bundle(monkeypatch, tmp_path, page):
    import shutil

    from synthbrain.bundle import demo_bundle_path

    from .app_helpers import open_page, texts

    folder = shutil.copytree(demo_bundle_path(), tmp_path / "bundle")
    (folder / "prior.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page(page)
    assert not at.exception, at.exception
    said = texts(at)
    assert "prior.safetensors" in said and "Traceback" not in said and str(tmp_path) not in said
