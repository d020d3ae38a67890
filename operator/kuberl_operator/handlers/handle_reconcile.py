"""One reconcile pass of one RLJob: observe -> plan -> apply. Returns when to come back."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import kopf

from kuberl_operator import observe
from kuberl_operator.context import OperatorContext
from kuberl_operator.effects import apply_plan
from kuberl_operator.planner import Observed, plan
from kuberl_operator.status import GANG_RESTARTING

Key = tuple[str, str]


async def reconcile(ctx: OperatorContext, key: Key) -> float | None:
    namespace, name = key
    started = time.perf_counter()
    # Pods first, the job after: `kubectl delete --cascade=orphan` sets the job's deletionTimestamp
    # before the garbage collector strips the pods' ownerReferences, so a pod seen orphaned here
    # comes with a job read that says it is being deleted (the planner then stays away). Read the
    # other way round, a pass that had read the job just before the deletion adopted its own pods
    # back, and the collector deleted them with the job.
    pods = await asyncio.to_thread(observe.list_pods, ctx.kube, namespace, name)
    job = await asyncio.to_thread(observe.read_job, ctx.kube, namespace, name)
    if job is None:  # deleted: the garbage collector removes the children
        ctx.queue.forget(key)
        ctx.progress.forget(key)
        ctx.kube.forget(namespace, name)
        ctx.metrics.job_phase(key, None)
        return None
    pod_nodes = {p["spec"]["nodeName"] for p in pods if (p.get("spec") or {}).get("nodeName")}
    nodes = await asyncio.to_thread(ctx.facts.nodes, pod_nodes)
    native_gang = await asyncio.to_thread(ctx.facts.native_gang)
    progress = await ctx.progress.read(job, pods)

    decision = plan(job, Observed(pods=pods, now=datetime.now(timezone.utc), native_gang=native_gang,
                                  progress=progress, nodes=nodes))

    try:
        await asyncio.to_thread(apply_plan, ctx.kube, job, decision)
    except kopf.TemporaryError:  # retried with backoff (a rejected create, a conflict)
        ctx.metrics.reconciles.labels("retry").inc()
        raise
    record(ctx, key, decision, time.perf_counter() - started)
    return next_pass(ctx, decision)


def record(ctx: OperatorContext, key: Key, decision, seconds: float) -> None:
    m = ctx.metrics
    m.reconciles.labels("ok").inc()
    m.latency.observe(seconds)
    m.job_phase(key, decision.status.get("phase"))
    m.pods_created.inc(len(decision.create_pods))
    m.pods_deleted.inc(len(decision.delete_pods))
    m.restarts.inc(sum(1 for e in decision.events if e.reason == GANG_RESTARTING))


def next_pass(ctx: OperatorContext, decision) -> float | None:
    """The planner's requeue, or the next progress poll while the gang runs."""
    delays = [decision.requeue_after] if decision.requeue_after is not None else []
    if decision.status.get("phase") == "Running" and ctx.config.progress_interval > 0:
        delays.append(ctx.config.progress_interval)
    return min(delays) if delays else None
