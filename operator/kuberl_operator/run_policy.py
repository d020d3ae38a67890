"""Run policy: active deadline, clean-up of finished jobs' pods, TTL after finishing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kuberl_operator.api import RunPolicy

Obj = dict[str, Any]
TERMINAL_POD_PHASES = {"Succeeded", "Failed"}


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def format_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def deadline_left(policy: RunPolicy, start_time: str | None, now: datetime) -> float | None:
    """Seconds until activeDeadlineSeconds runs out (<= 0: exceeded); None when no deadline applies."""
    start = parse_time(start_time)
    if policy.active_deadline_seconds is None or start is None:
        return None
    return policy.active_deadline_seconds - (now - start).total_seconds()


def pods_to_clean(policy: RunPolicy, pods: list[Obj]) -> list[str]:
    """Names of a finished job's pods that cleanPodPolicy deletes."""
    if policy.clean_pod_policy == "None":
        return []
    return [
        p["metadata"]["name"]
        for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and (policy.clean_pod_policy == "All" or (p.get("status") or {}).get("phase") not in TERMINAL_POD_PHASES)
    ]


def ttl_left(policy: RunPolicy, completion_time: str | None, now: datetime) -> float | None:
    """Seconds until a finished job is deleted (<= 0: now); None when it is kept."""
    done = parse_time(completion_time)
    if policy.ttl_seconds_after_finished is None or done is None:
        return None
    return policy.ttl_seconds_after_finished - (now - done).total_seconds()
