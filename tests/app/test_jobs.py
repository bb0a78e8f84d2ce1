"""The app's job queue (app_support/jobs.py): first come first served over a bounded pool, queue
positions, jobs taken out when their session stops waiting, errors handed back; and a session's
Generate waiting behind another session's job, then saying how long it waited."""

from __future__ import annotations

import threading

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
