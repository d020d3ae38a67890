"""Any event of an RLJob (added, modified, deleted, or listed at start-up) asks for a pass."""

from __future__ import annotations

from kuberl_operator.context import OperatorContext


async def on_job_event(ctx: OperatorContext, event_type: str | None, namespace: str, name: str) -> None:
    key = (namespace, name)
    if event_type == "DELETED":
        ctx.queue.forget(key)
        ctx.progress.forget(key)
        ctx.kube.forget(namespace, name)
        ctx.metrics.job_phase(key, None)
        return
    await ctx.queue.request(key)
