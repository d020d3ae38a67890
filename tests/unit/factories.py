"""Fixture builders for the unit tests: small functions that read like the object they build.

    make_job(roles={"trainer": {"replicas": 2, "gpus": 8}}, runtime={"algorithm": {"name": "ppo"}})
    make_pod("job-trainer-0", phase="Failed", exit_code=137, reason="OOMKilled", node="gpu-1")

Overrides are deep-merged into a minimal valid job; a value of None removes the key (so
`runtime={"model": {"path": None, "hubId": "Qwen/Qwen2.5-0.5B"}}` swaps the model source).
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

from kuberl_operator import labels
from kuberl_operator.api import parse_spec
from kuberl_operator.planner import Observed, plan

Obj = dict[str, Any]

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
JOB = "job"
NS = "team-a"
UID = "11111111-2222-3333-4444-555555555555"

# The "15-line RLJob" the defaults must make valid and sensible.
MINIMAL_YAML = """\
apiVersion: kuberl.io/v1alpha1
kind: RLJob
metadata:
  name: minimal
spec:
  roles:
    trainer:
      gpus: 8
  runtime:
    model:
      path: /models/Qwen2.5-0.5B-Instruct
    data:
      path: /data/gsm8k.jsonl
"""


def merge(base: Obj, override: Obj | None) -> Obj:
    """Deep merge of plain dicts; None in `override` deletes the key."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_runtime(**override: Any) -> Obj:
    return merge({"model": {"path": "/models/m"}, "data": {"path": "/data/prompts.jsonl"}}, override)


def make_spec(roles: Obj | None = None, runtime: Obj | None = None, **fields: Any) -> Obj:
    """A spec dict; `fields` use the YAML (camelCase) names: placement=..., runPolicy=..."""
    spec: Obj = {"roles": {"trainer": {"replicas": 1, "gpus": 1}}, "runtime": make_runtime()}
    override = {k: v for k, v in (("roles", roles), ("runtime", runtime)) if v is not None}
    return merge(spec, {**override, **fields})


def make_job(name: str = JOB, namespace: str = NS, roles: Obj | None = None, runtime: Obj | None = None,
             status: Obj | None = None, generation: int = 1, **fields: Any) -> Obj:
    return {
        "apiVersion": "kuberl.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": generation},
        "spec": make_spec(roles, runtime, **fields),
        "status": status or {},
    }


def parsed(**kw: Any):
    """The RLJobSpec of make_spec(**kw)."""
    return parse_spec(make_spec(**kw))


def make_pod(name: str, phase: str = "Running", ready: bool | None = None, exit_code: int | None = None,
             reason: str | None = None, message: str | None = None, node: str | None = None,
             restart: int = 0, role: str | None = None, spec_hash: str = "", unschedulable: str | None = None,
             finished_at: str | None = None, deleting: bool = False, base: Obj | None = None) -> Obj:
    """A pod as the API server reports it. `base` is a built pod (e.g. from plan().create_pods)."""
    pod = copy.deepcopy(base) if base else {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels.pod_labels(JOB, role or name.split("-")[-2], int(name.split("-")[-1]), restart),
            "annotations": {labels.SPEC_HASH: spec_hash},
        },
        "spec": {},
    }
    if node:
        pod["spec"]["nodeName"] = node
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2025-01-01T11:59:00Z"
    ready = phase == "Running" if ready is None else ready
    status: Obj = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if unschedulable:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable})
    if exit_code is not None:
        term: Obj = {"exitCode": exit_code, "reason": reason or "Error"}
        if message:
            term["message"] = message
        if finished_at:
            term["finishedAt"] = finished_at
        status["containerStatuses"] = [{"name": "runtime", "state": {"terminated": term}}]
    pod["status"] = status
    return pod


def observe(pods: list[Obj] | None = None, now: datetime = NOW, **kw: Any) -> Observed:
    return Observed(pods=pods or [], now=now, **kw)


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def gang(job: Obj, phase: str = "Running", **pod_kw: Any) -> list[Obj]:
    """The pods plan() creates for `job`, as the API server reports them once in `phase`."""
    p = plan(job, observe())
    return [make_pod(b["metadata"]["name"], phase=phase, base=b, **pod_kw) for b in p.create_pods]


def step(job: Obj, observed: Observed):
    """plan() once and return (plan, job with the planned status written back)."""
    p = plan(job, observed)
    return p, {**job, "status": p.status}


def conditions(status: Obj) -> dict[str, tuple[str, str]]:
    """{type: (status, reason)} of a planned status."""
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


def condition_message(status: Obj, type_: str) -> str:
    return next(c.get("message", "") for c in status["conditions"] if c["type"] == type_)


def names_of(objs: list[Obj]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]
