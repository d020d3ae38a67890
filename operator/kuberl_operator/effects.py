"""The effects layer: apply a Plan to the cluster, idempotently.

Order matters: status first, with optimistic concurrency (the job's resourceVersion), so two
racing passes cannot both act on the same stale status; a 409 raises kopf.TemporaryError and the
pass is retried from fresh reads. Then the Events (the status just written is what says they were
posted), then the adoption of orphaned pods, pod deletions, children (created when absent, adopted
when orphaned, kept current where they may change), the children of earlier gang attempts
(deleted), then pod creations. Every call goes
through `call`, which makes creates and deletes idempotent: 409 on create and 404 on delete mean
"already done", so an operator killed half-way and restarted converges without duplicates.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kuberl_operator import ownership
from kuberl_operator.api import GROUP, KIND, PLURAL, VERSION
from kuberl_operator.labels import JOB as JOB_LABEL
from kuberl_operator.planner import Event, Plan, recovered_status, rejected_status
from kuberl_operator.status import CHILD_CONFLICT, FAILED_CREATE

Obj = dict[str, Any]
T = TypeVar("T")
log = logging.getLogger("kuberl.effects")
COMPONENT = "kuberl-operator"
CONFLICT_RETRY_S = 0.5
DELETED = "deleted"  # Kube.ensured's mark for a child this process has deleted
REPLACE_RETRY_S = 1.0
MERGE_PATCH = "application/merge-patch+json"


@dataclass
class Kube:
    """The API clients one operator process shares (thread-safe; used from worker threads)."""

    api: client.ApiClient
    # Children this process has created or checked, per job: {(kind, name): digest}. A pass skips a
    # child whose digest it already ensured, so a settled job costs no create-409-read round trips.
    # Forgotten when the job or one of its watched children (ConfigMap, Service) is deleted.
    ensured: dict[tuple[str, str], dict[tuple[str, str], str]] = field(default_factory=dict)

    def forget(self, namespace: str, job: str) -> None:
        self.ensured.pop((namespace, job), None)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)


def call(fn: Callable[..., T], *args: Any, ok: tuple[int, ...] = (), **kwargs: Any) -> T | None:
    """Call the API; statuses in `ok` (409 for a create, 404 for a delete) return None instead of raising.

    A create in a namespace being deleted (403 NamespaceTerminating) or already gone (404 on the
    namespace) is also None: the namespace controller is removing the job and everything of it,
    there is nothing to converge to.
    """
    try:
        result = fn(*args, **kwargs)
        if kwargs.get("_preload_content") is False:
            result.data  # noqa: B018 - read it all: the connection goes back to the pool
        return result
    except ApiException as e:
        if e.status in ok or (409 in ok and (is_namespace_terminating(e) or is_namespace_gone(e))):
            return None
        raise


def is_namespace_terminating(e: ApiException) -> bool:
    return e.status == 403 and "NamespaceTerminating" in (e.body or "")


def is_namespace_gone(e: ApiException) -> bool:
    """A 404 about the namespace itself (not the object): `namespaces "x" not found`."""
    if e.status != 404:
        return False
    try:
        return (json.loads(e.body or "{}").get("details") or {}).get("kind") == "namespaces"
    except (ValueError, AttributeError):
        return False


def _group_version(obj: Obj) -> tuple[str, str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return group, version


def _plural(obj: Obj) -> str:
    return obj["kind"].lower() + "s"  # ConfigMap/Service/Pod/Workload/PodGroup: regular plurals


# ---------------------------------------------------------------------------------- primitives
def create_object(kube: Kube, obj: Obj) -> bool:
    """Create `obj`; False when it already exists."""
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    if kind == "Pod":
        return call(kube.core.create_namespaced_pod, ns, obj, ok=(409,), _preload_content=False) is not None
    if kind == "ConfigMap":
        return call(kube.core.create_namespaced_config_map, ns, obj, ok=(409,), _preload_content=False) is not None
    if kind == "Service":
        return call(kube.core.create_namespaced_service, ns, obj, ok=(409,), _preload_content=False) is not None
    group, version = _group_version(obj)
    return call(kube.custom.create_namespaced_custom_object, group, version, ns, _plural(obj), obj,
                ok=(409,), _preload_content=False) is not None


def read_object(kube: Kube, obj: Obj) -> Obj | None:
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    if obj["kind"] in ("ConfigMap", "Service"):
        read = kube.core.read_namespaced_config_map if obj["kind"] == "ConfigMap" else kube.core.read_namespaced_service
        resp = call(read, name, ns, ok=(404,), _preload_content=False)
        return json.loads(resp.data) if resp is not None else None
    group, version = _group_version(obj)
    return call(kube.custom.get_namespaced_custom_object, group, version, ns, _plural(obj), name, ok=(404,))


def patch_object(kube: Kube, kind: str, obj: Obj, body: Obj) -> Obj | None:
    """JSON-merge-patch the object of `kind` that `obj` names; the object as patched, None when it is
    gone. A patch whose uid/resourceVersion no longer match (409) re-plans the pass from fresh reads."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    core = {"Pod": kube.core.patch_namespaced_pod, "ConfigMap": kube.core.patch_namespaced_config_map,
            "Service": kube.core.patch_namespaced_service}
    try:
        if kind in core:
            resp = call(core[kind], name, ns, body, ok=(404,), _content_type=MERGE_PATCH, _preload_content=False)
        else:
            group, version = _group_version(obj)
            resp = call(kube.custom.patch_namespaced_custom_object, group, version, ns, kind.lower() + "s", name,
                        body, ok=(404,), _content_type=MERGE_PATCH, _preload_content=False)
    except ApiException as e:
        if e.status == 409:
            raise kopf.TemporaryError(f"{kind} {name} changed while being patched; re-planning",
                                      delay=CONFLICT_RETRY_S) from None
        raise
    return json.loads(resp.data) if resp is not None else None


def adopt_pod(kube: Kube, namespace: str, name: str, patch: Obj) -> None:
    """Make the job the controller of an orphaned pod it keeps (the planner's adoption patch)."""
    if patch_object(kube, "Pod", {"metadata": {"namespace": namespace, "name": name}}, patch) is not None:
        log.info("%s: adopted orphaned pod %s", namespace, name)


def delete_object(kube: Kube, obj: Obj) -> None:
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    group, version = _group_version(obj)
    call(kube.custom.delete_namespaced_custom_object, group, version, ns, _plural(obj), name, ok=(404,))


def delete_pod(kube: Kube, namespace: str, name: str) -> None:
    call(kube.core.delete_namespaced_pod, name, namespace, ok=(404,), _preload_content=False)


def delete_job(kube: Kube, namespace: str, name: str) -> None:
    """Delete the RLJob; the garbage collector removes its children (background propagation)."""
    body = client.V1DeleteOptions(propagation_policy="Background")
    call(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, body=body,
         ok=(404,))


def _is_subset(want: Any, have: Any) -> bool:
    """Whether every field of `want` is in `have` (the server adds defaults; those do not count)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_is_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(_is_subset, want, have))
    return want == have


def _digest(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def ensure_child(kube: Kube, obj: Obj) -> None:
    """Create the child when absent; keep a ConfigMap's data current; replace a stale immutable group.

    Skipped when this process already ensured the same content for the job (see Kube.ensured)."""
    meta = obj["metadata"]
    job = (meta.get("labels") or {}).get(JOB_LABEL, meta["name"])
    known = kube.ensured.setdefault((meta["namespace"], job), {})
    key, digest = (obj["kind"], meta["name"]), _digest(obj)
    if known.get(key) == digest:
        return
    _ensure_child(kube, obj)
    known[key] = digest


def _ensure_child(kube: Kube, obj: Obj) -> None:
    if create_object(kube, obj):
        return
    kind = obj["kind"]
    have = read_object(kube, obj)
    if have is None:  # deleted since the create said it exists
        create_object(kube, obj)
        return
    have = claim_child(kube, obj, have)
    if kind == "ConfigMap":
        if have.get("data") != obj["data"]:
            kube.core.patch_namespaced_config_map(obj["metadata"]["name"], obj["metadata"]["namespace"],
                                                  {"data": obj["data"]})
    elif kind in ("Workload", "PodGroup"):
        # Their specs are immutable: a stale one (the gang size changed) is deleted and recreated.
        # A PodGroup's deletion waits (podgroup-protection finalizer) until no pod uses it, and
        # pods must not join the old one meanwhile: the pass is retried, creating no pod, until the
        # new one exists. The same for one deleted by hand.
        deleting = bool(have["metadata"].get("deletionTimestamp"))
        if not deleting and _is_subset(obj["spec"], have.get("spec")):
            return
        if not deleting:
            delete_object(kube, obj)
        if not create_object(kube, obj):
            raise kopf.TemporaryError(f"{kind} {obj['metadata']['name']} is being replaced; waiting for the old "
                                      "one to go", delay=REPLACE_RETRY_S)


def claim_child(kube: Kube, obj: Obj, have: Obj) -> Obj:
    """`have`, the existing object named like the child `obj`, once it is the job's (see ownership):
    controlled by the job already; or an orphan with the job's label, adopted (its controller
    reference patched in, so the garbage collector deletes it with the job). Anything else is never
    taken, nor used: the pods would depend on an object that is not the job's.
    - controlled by an earlier RLJob of this name, or being deleted: the garbage collector (or the
      deletion) is about to remove it. The pass is retried with backoff, creating no pod, until it
      is gone (a ConfigMap or Service going is a watch event and brings a pass at once);
    - anything else (another controller, an unlabelled orphan) stays until someone acts: Rejected
      with reason ChildConflict, which the job's ReplicaFailure condition and an Event say."""
    meta = obj["metadata"]
    owner, job = meta["ownerReferences"][0], meta["labels"][JOB_LABEL]
    ctrl = ownership.controller_of(have)
    if ctrl is not None and ctrl.get("uid") == owner["uid"]:
        return have
    what = f"{obj['kind']} {meta['name']}"
    if have["metadata"].get("deletionTimestamp") or (ctrl is not None and ownership.is_earlier_job(ctrl, job, owner["uid"])):
        raise kopf.TemporaryError(f"{what} belongs to an earlier RLJob of this name or is being deleted; "
                                  "waiting for it to go", delay=None)
    if not ownership.is_adoptable(have, job):
        raise Rejected(ownership.conflict_message(obj["kind"], have, job), CHILD_CONFLICT)
    adopted = patch_object(kube, obj["kind"], obj, ownership.adoption_patch(have, owner))
    if adopted is None:
        raise kopf.TemporaryError(f"{what} went while being adopted; re-planning", delay=CONFLICT_RETRY_S)
    log.info("%s: adopted orphaned %s of RLJob %s", meta["namespace"], what, job)
    return adopted


def delete_owned_child(kube: Kube, obj: Obj) -> None:
    """Delete `obj` where it exists and is owned by the same RLJob (uid) as `obj`'s metadata says;
    an object of that name that is not the job's is left alone. Once per object per process."""
    meta = obj["metadata"]
    known = kube.ensured.setdefault((meta["namespace"], meta["labels"][JOB_LABEL]), {})
    key = (obj["kind"], meta["name"])
    if known.get(key) == DELETED:
        return
    have = read_object(kube, obj)
    owner = meta["ownerReferences"][0]["uid"]
    if have is not None and owner in {r.get("uid") for r in have["metadata"].get("ownerReferences") or []}:
        group, version = _group_version(obj)
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=have["metadata"]["uid"]))
        call(kube.custom.delete_namespaced_custom_object, group, version, meta["namespace"], _plural(obj),
             meta["name"], body=body, ok=(404, 409))
    known[key] = DELETED


def patch_status(kube: Kube, job: Obj, status: Obj, resource_version: str | None = None) -> str | None:
    """Replace the job's status if its resourceVersion is still the one we planned from (the job's, or
    `resource_version`: the one this pass's own earlier write returned). The new resourceVersion;
    None when the job is gone; raises kopf.TemporaryError when it changed since it was read.
    """
    meta = job["metadata"]
    body = {"apiVersion": job["apiVersion"], "kind": KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                         "resourceVersion": resource_version or meta["resourceVersion"]},
            "spec": job.get("spec") or {}, "status": status}
    try:
        resp = call(kube.custom.replace_namespaced_custom_object_status, GROUP, VERSION, meta["namespace"], PLURAL,
                    meta["name"], body, _preload_content=False)
    except ApiException as e:
        if e.status == 409:
            raise kopf.TemporaryError("the RLJob changed during the pass; re-planning", delay=CONFLICT_RETRY_S)
        if e.status == 404:
            return None  # deleted meanwhile: nothing left to do
        raise
    return json.loads(resp.data)["metadata"]["resourceVersion"]


def create_event(kube: Kube, job: Obj, event: Event) -> None:
    meta = job["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": job["apiVersion"], "kind": KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"],
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": event.reason,
        "message": event.message[:1024],
        "type": event.type,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        call(kube.core.create_namespaced_event, meta["namespace"], body, _preload_content=False)
    except ApiException as e:  # an Event is best effort: never fail a pass over one
        if is_namespace_terminating(e) or is_namespace_gone(e):
            return
        log.warning("could not post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], e.reason)


def api_message(e: ApiException) -> str:
    """The API server's own sentence from an error response (its Status `message`)."""
    try:
        return json.loads(e.body or "{}").get("message") or str(e.reason)
    except (ValueError, AttributeError):
        return str(e.reason)


class Rejected(Exception):
    """A create that cannot succeed until someone changes the cluster or the spec: the API server
    refused it (403: a ResourceQuota, a PodSecurity level, RBAC; 422: invalid; reason FailedCreate),
    or its name is held by an object of another controller (reason ChildConflict)."""

    def __init__(self, message: str, reason: str = FAILED_CREATE):
        super().__init__(message)
        self.reason = reason


def create_or_reject(kube: Kube, obj: Obj, create: Callable[[Kube, Obj], Any]) -> None:
    """Create (or ensure) a child; Rejected with what to tell the user when the API server refuses it."""
    try:
        create(kube, obj)
    except ApiException as e:
        if e.status not in (403, 422):
            raise
        raise Rejected(f"{obj['kind']} {obj['metadata']['name']} not created: {api_message(e)}") from None


def report_rejection(kube: Kube, job: Obj, status: Obj, resource_version: str | None, why: str,
                     reason: str = FAILED_CREATE) -> None:
    """Say why the job waits where the user looks, as the ReplicaSet controller does: condition
    ReplicaFailure (reason FailedCreate with the API server's message, or ChildConflict) and a Warning
    Event of that reason. Only when the status does not say it already: a retry that fails the same
    way writes and posts nothing, a different rejection is a new message and a new Event. Event after
    status, as in apply_plan: the condition is the memory of what was posted."""
    changed = rejected_status(status, why, datetime.now(timezone.utc), job["metadata"].get("generation"), reason)
    if changed is not None and patch_status(kube, job, changed, resource_version) is not None:
        create_event(kube, job, Event("Warning", reason, why))


# ------------------------------------------------------------------------------------ the plan
def apply_plan(kube: Kube, job: Obj, plan: Plan) -> None:
    """Apply one pass's decision: status, events, pod adoptions, pod deletes, children, child deletes,
    pod creates, then ReplicaFailure (set on a rejected create or a name another controller holds,
    which retries the pass with backoff; cleared once every create of a pass went through), job
    deletion."""
    rv = job["metadata"].get("resourceVersion")
    if plan.status != (job.get("status") or {}):
        rv = patch_status(kube, job, plan.status)
        if rv is None:
            return
    ns = job["metadata"]["namespace"]
    # Events right after the status they describe: the status is the memory of what was posted, so
    # an Event must not wait behind calls that can fail or be cut short by an operator restart.
    for event in plan.events:
        create_event(kube, job, event)
    for name, patch in plan.adopt_pods.items():
        adopt_pod(kube, ns, name, patch)
    for name in plan.delete_pods:
        delete_pod(kube, ns, name)
    try:
        for child in plan.children:
            create_or_reject(kube, child, ensure_child)
        for child in plan.delete_children:
            delete_owned_child(kube, child)
        for pod in plan.create_pods:
            create_or_reject(kube, pod, create_object)
        if plan.conflict:
            raise Rejected(plan.conflict, CHILD_CONFLICT)
    except Rejected as e:
        report_rejection(kube, job, plan.status, rv, str(e), e.reason)
        raise kopf.TemporaryError(str(e), delay=None) from None
    # A pass of a running job (it ensures the children) that created all it planned: nothing is refused.
    if plan.children and (cleared := recovered_status(plan.status)) is not None:
        if patch_status(kube, job, cleared, rv) is None:
            return
    if plan.delete_job:
        delete_job(kube, ns, job["metadata"]["name"])
