"""The app's job queue (app_support/jobs.py): first come first served over a bounded pool, queue
positions, jobs taken out when their session stops waiting, errors handed back; and a session's
Generate waiting behind another session's job, then saying how long it waited."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from app_support import jobs
from synthbrain.errors import ConfigError

from .app_helpers import open_page, texts


def blocking_job(release: threading.Event, result=None):
    def job(on_step):
        on_step(1, 2, {})
        assert release.wait(60), "the test never released the job"
        return result
    return job


def test_jobs_run_in_order_with_their_positions():
    q = jobs.JobQueue(workers=1)
    release = threading.Event()
    first = q.submit(blocking_job(release, "a"))
    assert q.wait_until(lambda q: q.running == 1, 10)
    second, third = q.submit(lambda on_step: "b"), q.submit(lambda on_step: "c")
    assert first.position().started and first.position().ahead == 0
    assert q.wait_until(lambda q: first.step == (1, 2), 10)  # its on_step, seen by waiters
    assert (second.position().ahead, third.position().ahead) == (1, 2)
    assert second.cancel()                      # its session stopped waiting: out of the queue
    assert third.position().ahead == 1 and second.future.cancelled()
    assert not first.cancel()                   # a started job runs to its end
    release.set()
    assert (first.result(10), third.result(10)) == ("a", "c")
    assert third.position().done and q.running == 0 and q.waiting == 0


def test_a_free_worker_means_nothing_ahead():
    q = jobs.JobQueue(workers=2)
    release = threading.Event()
    first = q.submit(blocking_job(release))
    assert q.wait_until(lambda q: q.running == 1, 10)
    # a job queued while a worker is free waits for nobody (it is about to start, or has started)
    assert q.submit(blocking_job(release)).position().ahead == 0
    assert q.wait_until(lambda q: q.running == 2, 10)
    third, fourth = q.submit(lambda s: 3), q.submit(lambda s: 4)
    assert (third.position().ahead, fourth.position().ahead) == (1, 2)
    release.set()
    assert (first.result(10), third.result(10), fourth.result(10)) == (None, 3, 4)


def test_a_waiter_woken_by_the_end_of_a_job_sees_it_done():
    """The last change a job makes is its end, with its result already set: a waiter that checks at each
    change sees ``done`` then, instead of sleeping until some later change (or its timeout)."""
    q = jobs.JobQueue(workers=1)
    release = threading.Event()
    job = q.submit(blocking_job(release, "a"))
    assert q.wait_until(lambda q: job.step == (1, 2), 10)
    done_at_change, bump = [], q.bump
    q.bump = lambda: (done_at_change.append(job.future.done()), bump())  # what a waiter woken now sees
    release.set()
    assert q.wait_until(lambda q: job.position().done, 30)
    assert job.result(0) == "a"
    assert done_at_change == [True], "waiters were woken before the job's result was set"


# the server's process in small: a job that would run for ever, three queued behind it, a thread waiting
# for each kind (not daemon, so the interpreter waits for them), and SIGTERM ending the process as
# Streamlit's handler does (the main thread returns and the interpreter exits)
SERVER = """
import signal, sys, threading
from app_support import jobs

q = jobs.JobQueue(workers=1)
never = threading.Event()

def busy(on_step):
    on_step(1, 2, {})
    never.wait()

running = q.submit(busy)
queued = [q.submit(lambda s: print("a queued job ran", flush=True)) for _ in range(3)]
assert q.wait_until(lambda q: running.step == (1, 2) and q.waiting == 3, 60)

def wait_for(job, name):
    try:
        job.result()
    except jobs.Stopped as e:
        print(f"{name} waiter: {e}", flush=True)

for job, name in ((running, "running"), (queued[0], "queued")):
    threading.Thread(target=wait_for, args=(job, name)).start()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("ready", flush=True)
signal.pause()
"""


def test_sigterm_ends_the_server_with_a_job_running_and_jobs_queued():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=60)[0]
        proc.send_signal(signal.SIGTERM)
        # a hang guard: with workers the interpreter joins, the process would wait for a job that never ends
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "a queued job ran" not in out
    assert "running waiter: the server stopped" in out and "queued waiter: the server stopped" in out, out


def test_a_job_error_is_raised_to_its_caller_and_the_queue_goes_on():
    q = jobs.JobQueue(workers=1)

    def broken(on_step):
        raise ConfigError("steps must be in 1..1000, got 0")

    with pytest.raises(ConfigError, match="steps must be"):
        q.submit(broken).result(10)
    assert q.submit(lambda on_step: 42).result(10) == 42


def test_two_workers_run_two_jobs_at_once():
    q = jobs.JobQueue(workers=2)
    both = threading.Barrier(2, timeout=20)  # each job waits for the other to be running too
    a, b = q.submit(lambda s: both.wait() + 10), q.submit(lambda s: both.wait() + 10)
    assert sorted([a.result(30), b.result(30)]) == [10, 11]


@pytest.mark.parametrize("env, device, want", [("", "cpu", 1), ("", "cuda", 2), ("", "cuda:1", 2), ("3", "cpu", 3)])
def test_workers_come_from_the_environment(monkeypatch, env, device, want):
    monkeypatch.setenv(jobs.WORKERS_ENV, env)
    assert jobs.workers_from_env(device) == want


@pytest.mark.parametrize("env", ["0", "many", "1.5", "100"])
def test_a_bad_worker_count_is_refused(monkeypatch, env):
    monkeypatch.setenv(jobs.WORKERS_ENV, env)
    with pytest.raises(ConfigError, match="SYNTHBRAIN_WORKERS must be a whole number"):
        jobs.workers_from_env("cpu")


def test_generate_waits_its_turn_behind_another_session():
    """Another session's job holds the one CPU worker; this session's Generate queues behind it,
    runs when it ends, and tells the user it waited (no process-wide lock: the queue decides)."""
    q = jobs.job_queue()  # the server's queue (1 worker on the CPU unless SYNTHBRAIN_WORKERS says more)
    release = threading.Event()
    others = [q.submit(blocking_job(release)) for _ in range(q.workers)]
    assert q.wait_until(lambda q: q.running == q.workers, 30)

    def let_go_once_queued():
        if q.wait_until(lambda q: q.waiting >= 1, 120):  # the page's job is behind ours
            release.set()

    helper = threading.Thread(target=let_go_once_queued, daemon=True)
    helper.start()
    at = open_page("generate")
    at.sidebar.toggle(key="gen_random_seed").set_value(False).run()
    at.sidebar.slider(key="gen_steps").set_value(1)
    at = at.sidebar.button(key="gen_go").click().run()
    release.set()  # whatever happened, free the worker for the tests that follow
    helper.join(10)
    for other in others:
        other.result(10)
    assert not at.exception and not at.error
    assert f"in the queue behind {jobs.jobs_text(q.workers)} of other sessions" in texts(at)
    (item,) = at.session_state["gen_gallery"]
    assert item.sample.steps == 1 and np.isfinite(item.volume.data).all()
