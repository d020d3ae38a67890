"""The work queue: one pass at a time per job, triggers coalesced, failures retried with backoff,
requeues honoured. Real asyncio, real time (short)."""

from __future__ import annotations

import asyncio

import kopf

from kuberl_operator import workqueue
from kuberl_operator.metrics import Metrics
from kuberl_operator.workqueue import WorkQueue


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_passes_of_one_job_never_overlap_and_triggers_coalesce(monkeypatch):
    monkeypatch.setattr(workqueue, "MIN_SPACING_S", 0.0)
    running, peak, passes = 0, 0, []

    async def reconcile(key):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        passes.append(key)
        await asyncio.sleep(0.05)
        running -= 1
        return None

    async def main():
        q = WorkQueue(reconcile)
        await asyncio.gather(*(q.request(("ns", "a")) for _ in range(20)))

    run(main())
    assert peak == 1
    assert 1 <= len(passes) <= 2  # the first pass, then one more for everything that arrived meanwhile


def test_different_jobs_reconcile_concurrently(monkeypatch):
    monkeypatch.setattr(workqueue, "MIN_SPACING_S", 0.0)
    running, peak = 0, 0

    async def reconcile(key):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    async def main():
        q = WorkQueue(reconcile)
        await asyncio.gather(*(q.request(("ns", f"j{i}")) for i in range(5)))

    run(main())
    assert peak == 5


def test_a_temporary_error_is_retried_after_its_delay_and_a_requeue_is_honoured(monkeypatch):
    monkeypatch.setattr(workqueue, "MIN_SPACING_S", 0.0)
    calls = []
    done = None

    async def reconcile(key):
        calls.append(key)
        if len(calls) == 1:
            raise kopf.TemporaryError("conflict", delay=0.05)
        if len(calls) == 2:
            return 0.05  # come back in 50 ms
        done.set()
        return None

    async def main():
        nonlocal done
        done = asyncio.Event()
        q = WorkQueue(reconcile)
        await q.request(("ns", "a"))
        await done.wait()

    run(main())
    assert len(calls) == 3


def test_an_exception_is_counted_backed_off_and_does_not_stop_the_queue(monkeypatch):
    monkeypatch.setattr(workqueue, "MIN_SPACING_S", 0.0)
    monkeypatch.setattr(workqueue, "ERROR_BACKOFF_S", (0.05, 0.1))
    metrics = Metrics()
    calls = 0
    done = None

    async def reconcile(key):
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ValueError("a job the operator cannot handle")
        done.set()

    async def main():
        nonlocal done
        done = asyncio.Event()
        q = WorkQueue(reconcile, on_error=lambda key, exc: metrics.errors.inc())
        await q.request(("ns", "a"))
        await done.wait()

    run(main())
    assert calls == 3
    assert metrics.registry.get_sample_value("kuberl_operator_reconcile_errors_total") == 2


def test_forget_cancels_the_timer(monkeypatch):
    calls = []

    async def reconcile(key):
        calls.append(key)

    async def main():
        q = WorkQueue(reconcile)
        q.later(("ns", "a"), 0.05)
        q.forget(("ns", "a"))
        await asyncio.sleep(0.15)

    run(main())
    assert calls == []


def test_jobs_by_phase_follow_each_job():
    m = Metrics()
    m.job_phase(("ns", "a"), "Pending")
    m.job_phase(("ns", "b"), "Pending")
    m.job_phase(("ns", "a"), "Running")
    m.job_phase(("ns", "b"), None)  # deleted
    value = lambda phase: m.registry.get_sample_value("kuberl_operator_jobs", {"phase": phase})  # noqa: E731
    assert (value("Pending"), value("Running"), value("Failed")) == (0, 1, 0)
