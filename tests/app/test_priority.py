"""Model jobs run where they cannot starve the server: their threads are niced below the server's
(and the threads they start, as torch's OpenMP workers, inherit that), so the event loop that answers
/_stcore/health and the WebSockets is scheduled first. The latency it buys is in benchmarks/results.md
(Upload memory and server latency)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from app_support import jobs
from synthbrain.errors import ConfigError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_model_jobs_and_the_threads_they_start_run_niced():
    mine = thread_nice()
    if mine > 16:
        pytest.skip(f"this test runs at nice {mine}: no room to lower a thread by 3")

    def job(on_step):
        seen = []
        t = threading.Thread(target=lambda: seen.append(thread_nice()))
        t.start()
        t.join()
        return thread_nice(), seen[0]

    niced, plain = jobs.JobQueue(workers=1, nice=3), jobs.JobQueue(workers=1)
    try:
        assert niced.submit(job).result(30) == (mine + 3, mine + 3)
        assert thread_nice() == mine  # the caller (the event loop, in the server) keeps its priority
        assert plain.submit(job).result(30) == (mine, mine)  # nice=0: as the caller
    finally:
        niced.close()
        plain.close()


def test_a_page_scripts_thread_is_niced_by_the_setting(monkeypatch):
    mine = thread_nice()
    if mine > 17:
        pytest.skip(f"this test runs at nice {mine}")
    monkeypatch.setenv(jobs.NICE_ENV, "2")
    seen = []
    t = threading.Thread(target=lambda: (jobs.lower_script_priority(), seen.append(thread_nice())))
    t.start()
    t.join()
    assert seen == [mine + 2]
    monkeypatch.setenv(jobs.NICE_ENV, "-5")  # refused by the queue with its message; the script runs on
    t = threading.Thread(target=lambda: (jobs.lower_script_priority(), seen.append(thread_nice())))
    t.start()
    t.join()
    assert seen[1] == mine


@pytest.mark.parametrize("raw, nice", [("", jobs.DEFAULT_NICE), ("0", 0), ("19", 19), (" 4 ", 4)])
def test_nice_from_env(monkeypatch, raw, nice):
    monkeypatch.setenv(jobs.NICE_ENV, raw)
    assert jobs.nice_from_env() == nice


@pytest.mark.parametrize("raw", ["-1", "20", "high", "2.5"])
def test_a_bad_nice_is_one_message(monkeypatch, raw):
    monkeypatch.setenv(jobs.NICE_ENV, raw)
    with pytest.raises(ConfigError, match="SYNTHBRAIN_NICE must be a whole number from 0 to 19"):
        jobs.nice_from_env()
