"""The app's model work, shared by every session: a bounded pool of worker threads, first come first
served, and the page side of waiting for it (the queue position, then a progress bar).

The generator is reentrant (``synthbrain.sampling``), so nothing needs one process-wide lock; what is
bounded is how many model jobs run at once, because on a CPU one job already uses every core (two
at once would each take twice as long) and on a GPU each job holds memory.

    SYNTHBRAIN_WORKERS  model jobs that run at once (default: 1 on the CPU, 2 on a GPU)
    SYNTHBRAIN_NICE     how much lower the CPU priority of model jobs and page scripts is than the
                        server's own thread (default 10; 0 keeps them equal; Linux)

The server's event loop (WebSockets, uploads, ``/_stcore/health``) is one thread of the process; model
jobs and page scripts run in threads of their own, niced (:func:`lower_priority`), so on a busy CPU the
loop is scheduled first whenever it has work and the server keeps answering while brains are made.

A job is a function ``fn(on_step)``; ``on_step(i, n, info)`` may be called from the worker thread (it
only records the step: Streamlit elements are drawn by the session's own script thread, which waits
here). A session that stops waiting (the user navigates away, presses something else) takes its job
out of the queue unless it has already started; a started job runs to its end and its result is
dropped.

The workers are daemon threads, so stopping the server (SIGTERM, Ctrl+C) never waits for model work:
at exit the queued jobs are cancelled, every waiter is told the server stopped (:class:`Stopped`),
and a job that is running is abandoned with the process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeVar

from synthbrain.errors import ConfigError, SynthBrainError

WORKERS_ENV = "SYNTHBRAIN_WORKERS"
NICE_ENV = "SYNTHBRAIN_NICE"
DEFAULT_NICE = 10
T = TypeVar("T")
OnStep = Callable[[int, int, dict], None]


def workers_from_env(device: str | None = None) -> int:
    """SYNTHBRAIN_WORKERS, else 1 on the CPU and 2 on a GPU (``device``: the app's torch device)."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        return 2 if (device or "cpu").startswith("cuda") else 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise ConfigError(f"{WORKERS_ENV} must be a whole number of model jobs from 1 to 64, got {raw!r}")
    return n


def nice_from_env() -> int:
    """SYNTHBRAIN_NICE (0..19), else 10."""
    raw = os.environ.get(NICE_ENV, "").strip()
    if not raw:
        return DEFAULT_NICE
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 <= n <= 19:
        raise ConfigError(f"{NICE_ENV} must be a whole number from 0 to 19 (how much lower model work's CPU "
                          f"priority is), got {raw!r}")
    return n


def lower_priority(by: int | None = None) -> int:
    """Lower the calling thread's CPU priority (its nice value) by ``by`` (default SYNTHBRAIN_NICE), at
    most to 19, and return the thread's nice value. Threads it starts later (torch's OpenMP workers)
    inherit it. Linux only (elsewhere a no-op): there a thread's id is a target of setpriority."""
    if not sys.platform.startswith("linux"):
        return 0
    tid = threading.get_native_id()
    now = os.getpriority(os.PRIO_PROCESS, tid)
    want = min(19, now + (nice_from_env() if by is None else by))
    if want > now:
        os.setpriority(os.PRIO_PROCESS, tid, want)
    return want


def lower_script_priority() -> None:
    """:func:`lower_priority` for a page script's thread (app.py, every run). A bad SYNTHBRAIN_NICE
    leaves it as it is: the job queue refuses it with its message on the first model job."""
    with contextlib.suppress(ConfigError):
        lower_priority()


class Stopped(SynthBrainError):
    """The server stopped before this job could finish (it was queued, or it was running)."""


@dataclass(frozen=True)
class Position:
    """Where a job stands: ``ahead`` jobs run or wait before it (0 once it runs)."""

    started: bool
    done: bool
    ahead: int
    step: tuple[int, int] | None     # (i, n) of its latest on_step
    stage: str | None = None         # its latest on_step's info["stage"] ("decode": the latent is being decoded)


class Job:
    """One submitted job; read its :meth:`position`, wait for :meth:`result`, or :meth:`cancel` it."""

    def __init__(self, queue: JobQueue, fn: Callable[[OnStep], Any]) -> None:
        self._queue = queue
        self._fn = fn
        self.future: Future = Future()
        self.started = False
        self.step: tuple[int, int] | None = None
        self.stage: str | None = None
        self.submitted = time.monotonic()
        self.start_time: float | None = None

    def on_step(self, i: int, n: int, info: dict | None = None) -> None:
        with self._queue.changed:
            self.step = (int(i), int(n))
            self.stage = (info or {}).get("stage")
            self._queue.bump()

    def position(self) -> Position:
        return self._queue.position(self)

    def cancel(self) -> bool:
        """Take the job out of the queue if it has not started; False if it runs or ran."""
        return self._queue.cancel(self)

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)

    @property
    def waited(self) -> float:
        """Seconds it spent in the queue before a worker took it (so far, if it still waits)."""
        return (self.start_time or time.monotonic()) - self.submitted


class JobQueue:
    """A pool of ``workers`` threads and the jobs waiting for them, in order of submission."""

    def __init__(self, workers: int = 1, nice: int = 0) -> None:
        if workers < 1:
            raise ConfigError(f"a job queue needs at least 1 worker, got {workers}")
        self.workers = workers
        self.nice = nice                       # each worker thread lowers its priority by this (lower_priority)
        self.changed = threading.Condition()   # notified whenever a job is queued, starts, steps or ends
        self._waiting: list[Job] = []
        self._running: set[Job] = set()
        self._closed = False
        self.version = 0                       # counts changes, so a waiter knows it has seen the latest
        self._todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # daemon threads: the interpreter does not join them at exit (a ThreadPoolExecutor's workers would
        # first run their job and every queued one, so a stopped server would outlive systemd's timeout)
        self._threads = [threading.Thread(target=self._work, name=f"synthbrain-model-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        _OPEN.add(self)

    def bump(self) -> None:
        """Record a change and wake every waiter (call holding ``changed``)."""
        self.version += 1
        self.changed.notify_all()

    def submit(self, fn: Callable[[OnStep], T]) -> Job:
        job = Job(self, fn)
        with self.changed:
            if self._closed:
                raise Stopped("the server is stopping: no new model jobs")
            self._waiting.append(job)
            self._todo.put(job)
            self.bump()
        return job

    def _work(self) -> None:
        if self.nice:
            lower_priority(self.nice)
        while (job := self._todo.get()) is not None:
            with self.changed:
                if self._closed or not job.future.set_running_or_notify_cancel():
                    continue                   # cancelled while it waited
                self._waiting.remove(job)
                self._running.add(job)
                job.started = True
                job.start_time = time.monotonic()
                self.bump()
            try:
                result, error = job._fn(job.on_step), None
            except BaseException as e:  # handed to the caller, as a Future would
                result, error = None, e
            # the future is settled and the waiters woken under one lock, so a woken waiter sees it done
            with self.changed:
                self._running.discard(job)
                try:
                    if error is None:
                        job.future.set_result(result)
                    else:
                        job.future.set_exception(error)
                except InvalidStateError:      # settled by close() while it ran
                    pass
                self.bump()

    def close(self) -> None:
        """Stop taking jobs: drop the queued ones and tell the waiters of queued and running ones that
        the server stopped (:class:`Stopped`; running threads die with the process). Called at exit."""
        with self.changed:
            if self._closed:
                return
            self._closed = True
            for job in [*self._waiting, *self._running]:
                # a waiter gets one of our errors (a page shows it) rather than a CancelledError
                with contextlib.suppress(InvalidStateError):
                    job.future.set_exception(Stopped("the server stopped before this model job finished"))
            self._waiting.clear()
            self._running.clear()
            self.bump()
        for _ in self._threads:
            self._todo.put(None)

    def cancel(self, job: Job) -> bool:
        with self.changed:
            if job not in self._waiting or not job.future.cancel():
                return False
            self._waiting.remove(job)
            self.bump()
            return True

    def position(self, job: Job) -> Position:
        """``ahead``: how many of the jobs running or queued before it must end before it can start
        (0 when a worker is free for it)."""
        with self.changed:
            done = job.future.done()
            waiting = not (job.started or done) and job in self._waiting
            ahead = max(0, len(self._running) + self._waiting.index(job) - self.workers + 1) if waiting else 0
            return Position(job.started, done, ahead, job.step, job.stage)

    @property
    def running(self) -> int:
        with self.changed:
            return len(self._running)

    @property
    def waiting(self) -> int:
        with self.changed:
            return len(self._waiting)

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until something changed since version ``seen`` (or ``timeout`` s); the new version."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def wait_until(self, predicate: Callable[[JobQueue], bool], timeout: float) -> bool:
        """Block until ``predicate(queue)`` holds (checked at every change) or ``timeout`` s pass."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)


_QUEUE: JobQueue | None = None
_QUEUE_LOCK = threading.Lock()
_OPEN: weakref.WeakSet[JobQueue] = weakref.WeakSet()


def _close_all() -> None:
    for q in list(_OPEN):
        q.close()


# threading's exit hooks run before the interpreter joins non-daemon threads (atexit runs after), so a
# non-daemon thread waiting for a job is released instead of holding the exit up
getattr(threading, "_register_atexit", atexit.register)(_close_all)


def job_queue() -> JobQueue:
    """The server process's one queue (a module global: Streamlit reruns pages, not imported modules)."""
    global _QUEUE
    with _QUEUE_LOCK:
        if _QUEUE is None:
            from app_support.common import device

            _QUEUE = JobQueue(workers_from_env(device()), nice=nice_from_env())
        return _QUEUE


# -------------------------------------------------------------------------------------- the page side


def jobs_text(n: int) -> str:
    return f"{n} job{'s' if n != 1 else ''}"


def progress_text(text: str, pos: Position) -> str:
    """The progress bar's words for a running job: ``text`` and the step it reported; a decode (a step
    of its own, the longest at 1 mm) is named as what it is."""
    if pos.step is None:
        return text
    i, n = pos.step
    if pos.stage == "decode":
        return f"{text} decoding the latent into a volume (step {i + 1} of {n})"
    return f"{text} step {i} of {n}"


def run(fn: Callable[[OnStep], T], text: str, *, show: bool = True) -> T:
    """Run ``fn(on_step)`` in the server's job queue and return its result (or raise its error) in
    this session's script thread. While it waits: "Waiting for the model: N jobs ahead of yours";
    while it runs: a progress bar led by ``text`` and moved by ``on_step``. ``show=False`` draws
    nothing (for calls inside ``st.cache_data`` functions, whose elements would be replayed)."""
    import streamlit as st

    queue = job_queue()
    job = queue.submit(fn)
    if not show:
        try:
            return job.result()
        finally:
            job.cancel()
    slot = st.empty()
    seen, drawn, most_ahead = -1, None, 0
    try:
        while not (pos := job.position()).done:
            if not pos.started:
                most_ahead = max(most_ahead, pos.ahead)
                now = ("wait", pos.ahead)
                if now != drawn:
                    slot.info(f"Waiting for the model: {jobs_text(pos.ahead)} ahead of yours "
                              f"(other sessions' work; {queue.workers} at a time).", icon=":material/hourglass:")
            else:
                i, n = pos.step or (0, 1)
                now = ("run", i, n, pos.stage)
                if now != drawn:
                    slot.progress(min(max(i / max(n, 1), 0.0), 1.0), text=progress_text(text, pos))
            version = queue.wait_for_change(seen, timeout=1.0)
            # nothing changed for a second: draw again anyway, because drawing is where Streamlit
            # stops a script whose user has moved on (and then ``finally`` takes the job out)
            drawn = now if version != seen else None
            seen = version
        result = job.result()
    finally:
        job.cancel()
        slot.empty()
    if most_ahead:
        st.caption(f"Waited {job.waited:.1f} s in the queue behind {jobs_text(most_ahead)} of other sessions.")
    return result
