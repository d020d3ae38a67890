"""Who controls a child, and when the job may take it: Kubernetes' ControllerRef rules, as the
ReplicaSet and Job controllers apply them (`ClaimObject` in k8s.io/kubernetes/pkg/controller).

- A child whose controller ownerReference is the job is the job's.
- An orphan (no controller) that carries the job's `kuberl.io/job` label is adopted: the job patches
  its controller reference in, so deleting the job garbage-collects it. That is what
  `kubectl delete rlj x --cascade=orphan` followed by a new `x` leaves behind.
- A child controlled by anything else is never taken (nor deleted). If the controller is an earlier
  RLJob of the same name (deleted, the garbage collector not there yet), the job waits quietly;
  any other controller, or an unlabelled orphan, is a conflict the user must resolve, and the job
  says so (`ReplicaFailure`, reason `ChildConflict`).

Pure functions over object dicts; the planner (pods) and the effects layer (ConfigMap, Service,
gang objects) share them.
"""

from __future__ import annotations

from typing import Any

from kuberl_operator import labels
from kuberl_operator.api import KIND

Obj = dict[str, Any]


def controller_of(obj: Obj) -> Obj | None:
    """The object's controller ownerReference, if any."""
    return next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)


def is_controlled_by(obj: Obj, uid: str) -> bool:
    ref = controller_of(obj)
    return ref is not None and ref.get("uid") == uid


def is_earlier_job(ref: Obj, job: str, uid: str) -> bool:
    """Whether the controller `ref` is an RLJob of this name but another uid: a job deleted before
    this one was created (two RLJobs of one name never coexist), whose children the garbage
    collector is about to delete."""
    return ref.get("kind") == KIND and ref.get("name") == job and ref.get("uid") != uid


def is_adoptable(obj: Obj, job: str) -> bool:
    """An orphan that says it belongs to a job of this name (the selector a ReplicaSet would match)."""
    meta = obj.get("metadata") or {}
    return (controller_of(obj) is None and not meta.get("deletionTimestamp")
            and (meta.get("labels") or {}).get(labels.JOB) == job)


def adoption_patch(obj: Obj, owner: Obj) -> Obj:
    """A JSON merge patch that makes `owner` (an ownerReference) the controller of `obj`, keeping its
    other ownerReferences. It carries the object's uid and resourceVersion: the API server refuses it
    (409) if the object was replaced or changed since it was read, so nothing is adopted twice or
    from under another controller that claimed it meanwhile."""
    meta = obj["metadata"]
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != owner["uid"]]
    guard = {k: meta[k] for k in ("uid", "resourceVersion") if meta.get(k)}
    return {"metadata": {**guard, "ownerReferences": [*refs, owner]}}


def conflict_message(kind: str, obj: Obj, job: str) -> str:
    """What the job tells its user about a child name another object holds (a stable sentence: it is
    the ReplicaFailure condition's message, and the Event is posted when it changes). `kind` is
    given: the items of a list response carry none."""
    what = f"{kind} {(obj.get('metadata') or {}).get('name')}"
    ref = controller_of(obj)
    if ref is not None:
        return (f"{what} exists and is controlled by {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')}), "
                "not by this RLJob: the job waits until it is deleted")
    return (f"{what} exists and is not this RLJob's (no controller, no {labels.JOB}={job} label): "
            "the job waits until it is deleted")
