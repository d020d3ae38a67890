"""An event of a child (a pod, or the ConfigMap/Service gone) asks for a pass of the job that owns it
(and of the job its kuberl.io/job label names, where that is another)."""

from __future__ import annotations

from kuberl_operator import labels
from kuberl_operator.api import KIND
from kuberl_operator.context import OperatorContext


def owning_job(meta: dict) -> str | None:
    """The RLJob controlling the object: its controller ownerReference, else its kuberl.io/job label."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            return ref.get("name")
    return (meta.get("labels") or {}).get(labels.JOB)


def is_deletion(event: dict, **_) -> bool:
    """ConfigMaps and Services matter only when they disappear (the pass recreates them)."""
    return event.get("type") == "DELETED"


async def on_child_event(ctx: OperatorContext, namespace: str, meta: dict, gone: bool = False) -> None:
    # The job named by the label too, when another controls the object: a pod an earlier job of that
    # name left behind holds a name the new job waits for.
    jobs = {owning_job(meta), (meta.get("labels") or {}).get(labels.JOB)} - {None, ""}
    for job in sorted(jobs):
        if gone:  # a ConfigMap or Service was deleted: check every child again
            ctx.kube.forget(namespace, job)
        await ctx.queue.request((namespace, job))
