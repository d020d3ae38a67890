"""Which failures restart the gang, which fail the job, and how long to wait between restarts.

A distributed job fails as a whole: when one rank dies the others lose their NCCL peers and die
too, so the *first* pod to fail carries the cause. Failure classes:
- retry: OOMKilled, eviction/preemption, a lost node, peers lost (rendezvous or NCCL timeouts,
  exit code EXIT_PEER_LOST), and unknown errors (up to backoffLimit);
- fail at once: exit codes the runtime reserves for configuration and data errors.
"""

from __future__ import annotations

from typing import Any

from kuberl_operator import labels
from kuberl_operator.api import FailureInfo
from kuberl_runtime.contract import EXIT_CONFIG_ERROR, EXIT_DATA_ERROR, NON_RETRYABLE_EXIT_CODES, parse_termination_message

Obj = dict[str, Any]
MAX_BACKOFF_S = 600

EXIT_MEANING = {
    EXIT_CONFIG_ERROR: "configuration error",
    EXIT_DATA_ERROR: "data or numerical error",
    137: "killed (SIGKILL, often out of memory)",
    143: "terminated (SIGTERM)",
}


def _terminated(pod: Obj) -> tuple[str | None, Obj]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            return cs.get("name"), term
    return None, {}


def pod_failure(pod: Obj, reason_override: str | None = None) -> FailureInfo:
    """Describe why a pod failed: role, container, exit code, reason, node, retryable."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    container, term = _terminated(pod)
    exit_code = term.get("exitCode")
    reason = reason_override or term.get("reason") or status.get("reason") or "Error"
    _, message = parse_termination_message(term.get("message"))  # the human part, without the progress line
    message = message or status.get("message") or ""
    if exit_code in EXIT_MEANING and not message:
        message = EXIT_MEANING[exit_code]
    return FailureInfo(
        role=(meta.get("labels") or {}).get(labels.ROLE, "unknown"),
        pod=meta.get("name", "unknown"),
        container=container,
        exit_code=exit_code,
        reason=reason,
        message=message.strip()[-1024:],
        node=(pod.get("spec") or {}).get("nodeName"),
        retryable=exit_code not in NON_RETRYABLE_EXIT_CODES,
    )


def _failed_at(pod: Obj) -> str:
    _, term = _terminated(pod)
    return term.get("finishedAt") or (pod.get("metadata") or {}).get("deletionTimestamp") or "9999"


def first_failure(failed_pods: list[Obj]) -> FailureInfo:
    """The earliest failure among the pods (by container finish time, then name)."""
    pod = min(failed_pods, key=lambda p: (_failed_at(p), p["metadata"]["name"]))
    return pod_failure(pod)


def restart_delay(restart: int, base_seconds: int) -> float:
    """Seconds to wait before creating the gang of restart number `restart` (1, 2, ...)."""
    if restart <= 0 or base_seconds <= 0:
        return 0.0
    return float(min(base_seconds * 2 ** (restart - 1), MAX_BACKOFF_S))


def describe(f: FailureInfo) -> str:
    parts = [f"pod {f.pod} (role {f.role})"]
    if f.container:
        parts.append(f"container {f.container}")
    if f.exit_code is not None:
        parts.append(f"exit code {f.exit_code}")
    parts.append(f"reason {f.reason}")
    if f.node:
        parts.append(f"on node {f.node}")
    text = ", ".join(parts)
    return f"{text}: {f.message}" if f.message else text
