"""Uploads held in the server's memory, bounded: Streamlit's in-memory upload manager with three rules.

Streamlit keeps every file PUT to ``/_stcore/upload_file/<session>/<file id>`` in memory until that
session ends, for any file id, so one visitor could fill the server's memory with files no widget asks
for. :class:`BoundedUploadedFileManager` (a :class:`MemoryUploadedFileManager`, so Streamlit's routes
and widgets use it unchanged) adds:

1. Only ids the server issued: a PUT to a file id this session was not given (the browser asks for
   ids, through the session's WebSocket, right before it uploads) is refused with 403 and nothing is
   kept. An issued id not used within ``grace_s`` expires.
2. Unclaimed files are freed: a file that no widget of its session has read within ``grace_s`` of its
   upload (a widget reads its files on the script run the upload triggers) is dropped.
3. Budgets: a session holds at most ``session_bytes`` (two scans at the upload limit: Compare and
   Trajectories each take one) and the server at most ``total_bytes`` of uploads
   (``SYNTHBRAIN_UPLOAD_MEMORY_MB``, default 8 scans at the limit). An upload over its session's
   budget frees that session's unclaimed files, then its older uploads (a replaced file); over the
   server's, anyone's unclaimed files; it is refused with 507 if that is not enough.

What a PUT costs beyond that is transient: Streamlit reads one request's body (up to
``server.maxUploadSize``) before the manager sees it, and frees it when the request ends.

Installed two ways: ``app.py`` calls :func:`install` on every run (the first visitor's page load
converts the running server's manager in place), and ``synthbrain app`` starts the server through
``python -m app_support.serve``, which puts the class in before the server exists (bounded from the
first request, even for a client that never runs a page).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
from streamlit.runtime.uploaded_file_manager import UploadedFileRec, UploadFileUrlInfo

from synthbrain.errors import ConfigError

MEMORY_ENV = "SYNTHBRAIN_UPLOAD_MEMORY_MB"
GRACE_S = 60.0           # an issued id, or a file no widget has read, lives this long
SESSION_SCANS = 2        # uploads at the size limit one session may hold
TOTAL_SCANS = 8          # ... and the whole server (default of SYNTHBRAIN_UPLOAD_MEMORY_MB)
MAX_ISSUED = 32          # outstanding issued ids per session (a browser asks for one per chosen file)
MB = 1024 * 1024


def upload_limit_bytes() -> int:
    """``server.maxUploadSize`` (MB, from .streamlit/config.toml) in bytes."""
    from streamlit import config

    return int(config.get_option("server.maxUploadSize")) * MB


def total_bytes_from_env(limit: int) -> int:
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return TOTAL_SCANS * limit
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if mb < 1:
        raise ConfigError(f"{MEMORY_ENV} must be a whole number of MB >= 1, got {raw!r}")
    return mb * MB


def _refuse(status: int, detail: str):
    from starlette.exceptions import HTTPException

    return HTTPException(status_code=status, detail=detail)


class BoundedUploadedFileManager(MemoryUploadedFileManager):
    """Streamlit's memory upload manager that keeps only issued, claimed files, within budgets."""

    def __init__(self, upload_endpoint: str, session_bytes: int | None = None, total_bytes: int | None = None,
                 grace_s: float = GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(upload_endpoint)
        self._bound(session_bytes, total_bytes, grace_s, clock)

    def _bound(self, session_bytes: int | None, total_bytes: int | None, grace_s: float,
               clock: Callable[[], float]) -> None:
        """The manager's own state (also called by :func:`install` on a converted instance)."""
        limit = upload_limit_bytes() if session_bytes is None or total_bytes is None else 0
        self.session_bytes = session_bytes if session_bytes is not None else SESSION_SCANS * limit
        self.total_bytes = total_bytes if total_bytes is not None else total_bytes_from_env(limit)
        self.grace_s = grace_s
        self._clock = clock
        self._issued: dict[tuple[str, str], float] = {}     # (session, file id) -> when issued
        self._stored: dict[tuple[str, str], float] = {}     # ... -> when uploaded
        self._claimed: set[tuple[str, str]] = set()         # read by a widget at least once
        self.refused = 0                                    # PUTs refused (for benchmarks and tests)

    # -------------------------------------------------------------- what Streamlit calls

    def get_upload_urls(self, session_id: str, file_names: Sequence[str]) -> list[UploadFileUrlInfo]:
        infos = super().get_upload_urls(session_id, file_names)
        now = self._clock()
        with self._lock:
            self._sweep(now)
            for info in infos:
                self._issued[(session_id, info.file_id)] = now
            mine = sorted((t, k) for k, t in self._issued.items() if k[0] == session_id)
            for _, key in mine[:-MAX_ISSUED]:
                del self._issued[key]
        return infos

    def add_file(self, session_id: str, file: UploadedFileRec) -> None:
        key, size, now = (session_id, file.file_id), len(file.data), self._clock()
        with self._lock:
            self._sweep(now)
            replacing = key in self._stored
            if not replacing and self._issued.pop(key, None) is None:
                self.refused += 1
                raise _refuse(403, "upload id not issued to this session")
            if size > min(self.session_bytes, self.total_bytes):  # could never fit: free nothing for it
                self.refused += 1
                raise _refuse(507, "this upload is larger than the server keeps for one session")
            held = self._held(session_id) - (self._size(key) if replacing else 0)
            if held + size > self.session_bytes:  # its unclaimed files, then its older uploads
                self._evict(session_id, held + size - self.session_bytes, keep=key)
                self._evict(session_id, self._held(session_id) - (self._size(key) if replacing else 0) + size
                            - self.session_bytes, keep=key, claimed_too=True)
            if self._held(session_id) - (self._size(key) if replacing else 0) + size > self.session_bytes:
                self.refused += 1
                raise _refuse(507, "this session holds as many uploads as it may; remove one first")
            over = self._total_bytes - (self._size(key) if replacing else 0) + size - self.total_bytes
            if over > 0:
                self._evict(None, over, keep=key)
            if self._total_bytes - (self._size(key) if replacing else 0) + size > self.total_bytes:
                self.refused += 1
                raise _refuse(507, "the server holds as many uploads as it may; try again later")
            self._stored[key] = now
        super().add_file(session_id, file)

    def get_files(self, session_id: str, file_ids: Sequence[str]) -> list[UploadedFileRec]:
        with self._lock:
            self._sweep(self._clock())
            self._claimed.update((session_id, f) for f in file_ids if (session_id, f) in self._stored)
        return super().get_files(session_id, file_ids)

    def remove_file(self, session_id: str, file_id: str) -> None:
        with self._lock:
            self._forget((session_id, file_id))
        super().remove_file(session_id, file_id)

    def remove_session_files(self, session_id: str) -> None:
        with self._lock:
            for key in [k for k in (*self._stored, *self._issued) if k[0] == session_id]:
                self._forget(key)
        super().remove_session_files(session_id)

    # ------------------------------------------------------------------------ internals

    def held_bytes(self, session_id: str | None = None) -> int:
        """Bytes held for ``session_id`` (or for everyone)."""
        with self._lock:
            return self._total_bytes if session_id is None else self._held(session_id)

    def _size(self, key: tuple[str, str]) -> int:
        rec = self.file_storage.get(key[0], {}).get(key[1])
        return len(rec.data) if rec is not None else 0

    def _held(self, session_id: str) -> int:
        return sum(len(r.data) for r in self.file_storage.get(session_id, {}).values())

    def _forget(self, key: tuple[str, str]) -> None:
        self._issued.pop(key, None)
        self._stored.pop(key, None)
        self._claimed.discard(key)

    def _drop(self, key: tuple[str, str]) -> None:
        """Free a stored file (the caller holds the lock, so the parent's locked remove_file is inlined)."""
        files = self.file_storage.get(key[0])
        rec = files.pop(key[1], None) if files is not None else None
        if rec is not None:
            self._total_bytes -= len(rec.data)
            self._file_count -= 1
            if not files:
                del self.file_storage[key[0]]
        self._forget(key)

    def _evict(self, session_id: str | None, need: int, keep: tuple[str, str], claimed_too: bool = False) -> None:
        """Free unclaimed files (``claimed_too``: any), oldest first, of ``session_id`` (None: anyone's)
        until ``need`` bytes are free."""
        for _, key in sorted((t, k) for k, t in self._stored.items()):
            if need <= 0:
                return
            if key == keep or (key in self._claimed and not claimed_too) or (
                    session_id is not None and key[0] != session_id):
                continue
            need -= self._size(key)
            self._drop(key)

    def _sweep(self, now: float) -> None:
        """Expire issued ids and free files no widget has read, ``grace_s`` after they came."""
        for key, t in list(self._issued.items()):
            if now - t > self.grace_s:
                del self._issued[key]
        for key, t in list(self._stored.items()):
            if key not in self._claimed and now - t > self.grace_s:
                self._drop(key)


def install() -> BoundedUploadedFileManager | None:
    """Bound the running server's upload manager (idempotent; None outside a server, e.g. AppTest).

    Streamlit's upload routes hold the manager object they were built with, so it is converted in
    place (its class becomes the bounded subclass, and its files so far are kept as claimed)."""
    from streamlit import runtime

    if not runtime.exists():
        return None
    mgr = runtime.get_instance().uploaded_file_mgr
    if isinstance(mgr, BoundedUploadedFileManager):
        return mgr
    if type(mgr) is not MemoryUploadedFileManager:  # someone else's manager: not ours to change
        return None
    with mgr._lock:
        mgr.__class__ = BoundedUploadedFileManager
        mgr._bound(None, None, GRACE_S, time.monotonic)
        now = time.monotonic()
        for session_id, files in mgr.file_storage.items():
            for file_id in files:
                mgr._stored[(session_id, file_id)] = now
                mgr._claimed.add((session_id, file_id))
    return mgr
