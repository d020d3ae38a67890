"""plan(job, observed) -> Plan: the whole reconcile decision as a pure function.

From the RLJob and what exists (its pods, the time, whether the cluster serves gang scheduling,
trainer rank 0's latest progress), compute the children that must exist, the pods to create and
delete, the status to write and the events to emit. No API calls: the effects layer applies the
plan, status first (so a crash between status and pod changes re-derives the same decision).

Gang attempts: pods carry `kuberl.io/restart=<n>` (n = status.restarts when created) and a hash
of the pod-shaping spec. A pod of an older attempt or an older spec is stale and deleted; the
next gang is created once its names are free and the restart backoff has passed. Under native gang
scheduling each attempt has its own PodGroup; those of earlier attempts are deleted once no pod of
an earlier attempt is left (terminating ones included), i.e. before the next gang is created.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kuberl_operator import labels, messages, names, ownership
from kuberl_operator import restart_policy as rp
from kuberl_operator import run_policy
from kuberl_operator import status as st
from kuberl_operator.api import (FailureInfo, ProgressStatus, RLJobSpec, RLJobStatus, RoleStatus, RunPolicy, SpecError,
                                 parse_job)
from kuberl_operator.builders import JobRef, build_configmap, build_pods, build_service, in_workspace, pod_spec_hash
from kuberl_operator.scheduling import build_native_podgroup, build_podgroup, build_workload, native_podgroup_ref
from kuberl_runtime.contract import Progress, parse_termination_message

Obj = dict[str, Any]


_PHASE_CONDITION = {"Failed": st.FAILED, "Succeeded": st.SUCCEEDED, "Suspended": st.SUSPENDED,
                    "Restarting": st.RESTARTING, "Running": st.RUNNING, "Pending": st.PODS_READY}


@dataclass
class Observed:
    """What the handlers read before planning."""

    pods: list[Obj]
    now: datetime
    native_gang: bool = False  # the cluster serves Kubernetes' Workload API
    progress: Progress | None = None  # trainer rank 0's latest progress document
    nodes: set[str] | None = None  # existing node names; None when not read


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: Obj
    children: list[Obj] = field(default_factory=list)  # ensured: created if absent, data kept current
    create_pods: list[Obj] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    delete_children: list[Obj] = field(default_factory=list)  # deleted where present and owned by the job
    adopt_pods: dict[str, Obj] = field(default_factory=dict)  # pod name -> merge patch making the job its controller
    conflict: str | None = None  # a pod name the job needs is held by another controller (ReplicaFailure/ChildConflict)
    delete_job: bool = False
    requeue_after: float | None = None  # seconds until time alone changes the decision


def parse_status(raw: Obj | None) -> RLJobStatus:
    try:
        return RLJobStatus.model_validate(raw or {})
    except ValidationError:  # a status written by another version: start over rather than crash
        return RLJobStatus()


def _phase(pod: Obj) -> str:
    return (pod.get("status") or {}).get("phase", "Pending")


def is_foreign(pod: Obj, job_uid: str) -> bool:
    """Whether the pod's controller is another object than the job with `job_uid`."""
    ref = ownership.controller_of(pod)
    return bool(job_uid) and ref is not None and ref.get("uid") != job_uid


def _attempt(pod: Obj) -> int | None:
    """The gang attempt a pod was created for (its kuberl.io/restart label)."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(labels.RESTART, "")
    return int(value) if value.isdigit() else None


def _is_ready(pod: Obj) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return _phase(pod) == "Running" and any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _unschedulable_message(pods: list[Obj]) -> str | None:
    """The scheduler's reason a pod cannot be placed. Under gang scheduling most pods only say they
    wait for their gang; the pod whose message says which nodes lack what comes first."""
    found = []
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                message = c.get("message", "unschedulable")
                found.append(("nodes are available" not in message, pod["metadata"]["name"], message))
    if not found:
        return None
    _, name, message = min(found)
    return f"pod {name}: {message}"


# Container states the kubelet keeps a placed pod in until someone acts (an image name, a registry
# secret, a missing Secret/ConfigMap key): the pod stays Pending, so they would never show as a failure.
_STUCK_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                  "CreateContainerError", "RunContainerError"}


def _container_waiting_message(pods: list[Obj]) -> str | None:
    """Why a container of a placed pod does not start, from the first such pod by name."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _STUCK_WAITING:
                message = f"pod {pod['metadata']['name']}, container {cs.get('name')}: {waiting['reason']}"
                return message + (f": {waiting['message']}" if waiting.get("message") else "")
    return None


def final_progress(pod: Obj | None) -> Progress | None:
    """The Progress document a terminated container wrote first into its termination message."""
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        progress, _ = parse_termination_message(term.get("message"))
        if progress is not None:
            return progress
    return None


def _fmt(x: float | None) -> str | None:
    return None if x is None else f"{x:.4g}"


def progress_status(p: Progress, now: str) -> ProgressStatus:
    return ProgressStatus(
        step=p.step,
        total_steps=p.total_steps,
        reward_mean=_fmt(p.reward_mean),
        kl=_fmt(p.kl),
        tokens_per_second=_fmt(p.tokens_per_second),
        weights_version=p.weights_version,
        last_checkpoint_step=p.last_checkpoint_step,
        resumed_from_step=p.resumed_from_step,
        updated_at=now,
    )


def checkpoint_warning(spec: RLJobSpec) -> str:
    """Why the next gang would start training over: the trainers' checkpoint directory is an emptyDir
    (no `checkpoint.volume`), which dies with the pod, while the job would resume from it after a
    gang restart (`backoffLimit` > 0) or a suspend. Empty when checkpoints persist or nothing resumes.
    Carried in the Valid condition's message and posted as a Warning Event when it changes."""
    ckpt = spec.runtime.checkpoint
    if ckpt.volume is not None or not ckpt.resume or (spec.run_policy.backoff_limit == 0 and not spec.suspend):
        return ""
    where = in_workspace(ckpt.dir)
    path = ckpt.dir if where == ckpt.dir else f"{ckpt.dir} ({where} in the pods)"
    return (f"checkpoints are not persistent: {path} is an emptyDir (no spec.runtime.checkpoint.volume), "
            "so a gang restart or a resume starts training from step 0")


def _lenient_run_policy(raw_spec: Obj) -> RunPolicy:
    """spec.runPolicy of a spec that failed validation: as written where it is valid, else the defaults."""
    try:
        return RunPolicy.model_validate(raw_spec.get("runPolicy") or {})
    except (ValidationError, AttributeError):
        return RunPolicy()


_CONFIGMAPS: dict[tuple[JobRef, str], Obj] = {}


def _configmap(ref: JobRef, spec: RLJobSpec, spec_hash: str) -> Obj:
    """build_configmap, memoized on the spec hash (which covers spec.runtime): rendering the YAML is
    most of a pass's planning time, and it only changes with the spec. Callers must not mutate it."""
    key = (ref, spec_hash)
    if key not in _CONFIGMAPS:
        if len(_CONFIGMAPS) > 10_000:
            _CONFIGMAPS.clear()
        _CONFIGMAPS[key] = build_configmap(ref, spec)
    return _CONFIGMAPS[key]


class _Pass:
    """One reconcile decision; methods are the beats of plan(), in order."""

    def __init__(self, job: Obj, observed: Observed):
        meta = job.get("metadata") or {}
        self.ref = JobRef(meta.get("name", ""), meta.get("namespace", "default"), meta.get("uid", ""))
        self.generation = meta.get("generation")
        self.observed = observed
        self.now = run_policy.format_time(observed.now)
        self.old = parse_status(job.get("status"))
        self.s = self.old.model_copy(deep=True)
        self.plan = Plan(status={})
        # Pods of this job, not terminating: those it controls and orphans with its label (adopted,
        # see ownership). A pod with the job's label and name but another controller (the previous
        # job of that name, deleted and re-applied before the garbage collector got to its pods) is
        # not ours: never adopted, never deleted, its name is busy.
        live = [p for p in observed.pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
        self.pods = [p for p in live if not is_foreign(p, self.ref.uid)]
        self.foreign = [p for p in live if is_foreign(p, self.ref.uid)]
        self.terminating = {p["metadata"]["name"] for p in observed.pods} - {p["metadata"]["name"] for p in self.pods}
        self.final: Progress | None = None  # trainer rank 0's final progress, once it has terminated

    # -- helpers ------------------------------------------------------------------------------
    def cond(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        # A message that says what the written one says (an image pull that backs off again, see
        # messages.py) keeps the written text: no status write for a change of wording.
        before = st.get_condition(self.old, type_)
        if before is not None and (before.status == "True") == value and before.reason == reason \
                and before.observed_generation == self.generation and messages.same_meaning(before.message, message):
            message = before.message
        st.set_condition(self.s, type_, value, reason, message, self.now, self.generation)

    def event(self, reason: str, message: str) -> None:
        kind = "Warning" if reason in st.WARNING_REASONS else "Normal"
        self.plan.events.append(Event(kind, reason, message))

    def requeue(self, seconds: float | None) -> None:
        if seconds is None:
            return
        seconds = max(seconds, 0.5)
        cur = self.plan.requeue_after
        self.plan.requeue_after = seconds if cur is None else min(cur, seconds)

    def delete(self, pod_names: list[str]) -> None:
        self.plan.delete_pods.extend(n for n in pod_names if n not in self.plan.delete_pods)

    def fail(self, reason: str, message: str, spec: RLJobSpec | None) -> None:
        self.cond(st.FAILED, True, reason, message)
        self.cond(st.RUNNING, False, reason, message)
        if st.get_condition(self.s, st.RESTARTING):
            self.cond(st.RESTARTING, False, reason, message)
        if st.is_true(self.s, st.PODS_READY):
            self.cond(st.PODS_READY, False, reason, message)
        self.s.completion_time = self.s.completion_time or self.now
        if spec is not None:
            self.delete(run_policy.pods_to_clean(spec.run_policy, self.pods))

    def finish(self) -> Plan:
        # Orphans with the job's label that the job keeps become its own (ControllerRef adoption),
        # so the garbage collector deletes them with the job.
        owner = self.ref.owner_reference()
        self.plan.adopt_pods = {p["metadata"]["name"]: ownership.adoption_patch(p, owner) for p in self.pods
                                if ownership.is_adoptable(p, self.ref.name)
                                and p["metadata"]["name"] not in self.plan.delete_pods}
        self.s.phase = st.derive_phase(self.s)
        if self.s.phase in ("Failed", "Succeeded", "Suspended"):  # nothing is created any more
            st.remove_condition(self.s, st.REPLICA_FAILURE)
        self.s.observed_generation = self.generation
        if self.s.phase != self.old.phase and not any(e.reason == st.GANG_RESTARTING for e in self.plan.events):
            cond = st.get_condition(self.s, _PHASE_CONDITION[self.s.phase])
            reason = cond.reason if cond is not None else "Pending"
            message = f"RLJob is {self.s.phase}" + (f": {cond.message}" if cond is not None and cond.message else "")
            self.event(reason, message)
        self.plan.status = self.s.model_dump(mode="json", by_alias=True, exclude_none=True)
        return self.plan

    # -- beats --------------------------------------------------------------------------------
    def validate(self, job: Obj) -> RLJobSpec | None:
        try:
            # The name too: pods, the Service (a DNS-1035 label) and label values are made from it,
            # and a name they reject would fail every pass with no word in status.
            spec = parse_job({**job, "spec": job.get("spec") or {}})
        except SpecError as e:
            self.cond(st.VALID, False, st.INVALID_SPEC, str(e))
            if not st.is_finished(self.s):
                self.fail(st.INVALID_SPEC, f"spec is invalid: {e}", None)
            return None
        failed = st.get_condition(self.s, st.FAILED)
        if failed is not None and failed.reason == st.INVALID_SPEC:  # fixed by an edit: start over
            st.remove_condition(self.s, st.FAILED)
            st.remove_condition(self.s, st.RUNNING)
            self.s.completion_time = None
        # The old Valid message is the memory of what was said: the Event is posted once per change
        # of the note, not per pass, and not again after an operator restart (status survives it).
        note = checkpoint_warning(spec)
        before = st.get_condition(self.old, st.VALID)
        if note and (before is None or before.message != note) and not st.is_finished(self.s):
            self.event(st.CHECKPOINTS_NOT_PERSISTENT, note)
        self.cond(st.VALID, True, st.SPEC_VALID, note)
        return spec

    def invalid(self, raw_spec: Obj) -> Plan:
        """A spec only the operator rejects (the CRD schema and its CEL rules let it through). A
        running job edited into one fails like any other failure: its pods are cleaned up per the
        run policy and its TTL applies, read from the edited spec where that part is valid (else
        the defaults). Fixing the spec starts the job over (validate), resuming from checkpoints."""
        return self.finished(RLJobSpec.model_construct(run_policy=_lenient_run_policy(raw_spec)))

    def finished(self, spec: RLJobSpec) -> Plan:
        self.delete(run_policy.pods_to_clean(spec.run_policy, self.pods))
        left = run_policy.ttl_left(spec.run_policy, self.s.completion_time, self.observed.now)
        if left is not None and left <= 0:
            self.plan.delete_job = True
        self.requeue(left)
        return self.finish()

    def suspended(self) -> Plan:
        self.delete([p["metadata"]["name"] for p in self.pods])
        self.cond(st.SUSPENDED, True, st.SUSPENDED_REASON, "spec.suspend is true: pods deleted, status and checkpoints kept")
        self.cond(st.ADMITTED, False, st.SUSPENDED_REASON)
        self.cond(st.RUNNING, False, st.SUSPENDED_REASON)
        self.cond(st.PODS_READY, False, st.SUSPENDED_REASON)
        if st.is_true(self.s, st.RESTARTING):
            self.cond(st.RESTARTING, False, st.SUSPENDED_REASON)
        return self.finish()

    def gang_failure(self, current: dict[str, Obj], desired: list[str], spec_changed: bool) -> FailureInfo | None:
        failed = [p for p in current.values() if _phase(p) == "Failed"]
        if failed:
            return rp.first_failure(failed)
        if self.observed.nodes is not None:
            for p in current.values():
                node = (p.get("spec") or {}).get("nodeName")
                if node and node not in self.observed.nodes:
                    return rp.pod_failure(p, reason_override="NodeLost")
        # The gang was whole: a pod gone since is a failure (unless we replace it for a new spec).
        if st.is_true(self.s, st.RUNNING) and not spec_changed:
            gone = [n for n in desired if n not in current]
            if gone:
                role = next((r for r in ("trainer", "rollout", "critic", "reference", "reward")
                             if gone[0].startswith(f"{self.ref.name}-{r}-")), "unknown")
                return FailureInfo(role=role, pod=gone[0], reason="PodDeleted",
                                   message="pod disappeared while the gang was running", retryable=True)
        return None

    def restart_or_fail(self, spec: RLJobSpec, f: FailureInfo, current: dict[str, Obj]) -> Plan:
        self.s.failure = f
        self._mirror_progress()  # the failed attempt's last progress, when trainer rank 0 wrote it
        why = rp.describe(f)
        if not f.retryable:
            self.fail(st.NON_RETRYABLE, f"not retried: {why}", spec)
            return self.finish()
        if self.s.restarts >= spec.run_policy.backoff_limit:
            self.fail(st.BACKOFF_LIMIT, f"backoffLimit ({spec.run_policy.backoff_limit}) reached; last failure: {why}", spec)
            return self.finish()
        self.s.restarts += 1
        self.s.last_restart_time = self.now
        self.delete(list(current))
        msg = f"restart {self.s.restarts}/{spec.run_policy.backoff_limit} after failure of {why}"
        self.cond(st.RESTARTING, True, st.GANG_RESTARTING, msg)
        self.cond(st.RUNNING, False, st.GANG_RESTARTING, msg)
        self.cond(st.PODS_READY, False, st.GANG_RESTARTING, msg)
        self.event(st.GANG_RESTARTING, msg)
        self.requeue(rp.restart_delay(self.s.restarts, spec.run_policy.backoff_seconds))
        return self.finish()

    def run(self, spec: RLJobSpec) -> Plan:
        obs, ref = self.observed, self.ref
        self.cond(st.ADMITTED, True, st.ADMITTED_REASON)
        if st.is_true(self.s, st.SUSPENDED):
            self.cond(st.SUSPENDED, False, st.RESUMED, "spec.suspend is false: the gang is recreated")
            self.s.start_time = self.now  # like a Job's: activeDeadlineSeconds counts from the resume

        left = run_policy.deadline_left(spec.run_policy, self.s.start_time, obs.now)
        if left is not None and left <= 0:
            self.fail(st.DEADLINE, f"activeDeadlineSeconds ({spec.run_policy.active_deadline_seconds}) exceeded", spec)
            self.delete([p["metadata"]["name"] for p in self.pods])
            return self.finish()
        self.requeue(left)

        # Children that always exist while the job runs.
        spec_hash = pod_spec_hash(spec)
        self.plan.children = [_configmap(ref, spec, spec_hash), build_service(ref, spec)]
        meta = ref.metadata(names.workload_name(ref.name))
        if obs.native_gang and spec.run_policy.scheduling.gang:
            workload = names.workload_name(ref.name)
            self.plan.children.append(build_workload(meta, spec))
            group_meta = ref.metadata(names.native_podgroup_name(ref.name, self.s.restarts))
            self.plan.children.append(build_native_podgroup(group_meta, workload, spec))
            if not any(_attempt(p) != self.s.restarts for p in obs.pods if not is_foreign(p, ref.uid)):
                # every pod of an earlier attempt is gone: so is any use of its PodGroup
                self.plan.delete_children = [
                    native_podgroup_ref(ref.metadata(names.native_podgroup_name(ref.name, n)))
                    for n in range(self.s.restarts)]
        group = build_podgroup(ref.metadata(names.podgroup_name(ref.name)), spec)
        if group is not None:
            self.plan.children.append(group)

        # Sort pods into the current gang and stale ones (older attempt or older spec).
        desired = build_pods(ref, spec, self.s.restarts, obs.native_gang)
        desired_names = [p["metadata"]["name"] for p in desired]
        current: dict[str, Obj] = {}
        spec_changed = False
        for p in self.pods:
            meta_p = p["metadata"]
            lbl, ann = meta_p.get("labels") or {}, meta_p.get("annotations") or {}
            if meta_p["name"] in desired_names and lbl.get(labels.RESTART) == str(self.s.restarts) \
                    and ann.get(labels.SPEC_HASH) == spec_hash:
                current[meta_p["name"]] = p
            else:
                spec_changed |= lbl.get(labels.RESTART) == str(self.s.restarts)
                self.delete([meta_p["name"]])

        driver = current.get(names.pod_name(ref.name, "trainer", 0))
        self.final = final_progress(driver)
        if driver is not None and _phase(driver) == "Succeeded":
            self.cond(st.SUCCEEDED, True, st.SUCCEEDED_REASON, "trainer rank 0 exited 0")
            self.cond(st.RUNNING, False, st.COMPLETED)
            if st.get_condition(self.s, st.RESTARTING):
                self.cond(st.RESTARTING, False, st.COMPLETED)
            self.s.completion_time = self.now
            self._mirror_progress()
            self.delete(run_policy.pods_to_clean(spec.run_policy, self.pods))
            self.requeue(run_policy.ttl_left(spec.run_policy, self.s.completion_time, obs.now))
            return self.finish()

        failure = self.gang_failure(current, desired_names, spec_changed)
        if failure is not None:
            return self.restart_or_fail(spec, failure, current)

        if spec_changed and not st.is_true(self.s, st.RESTARTING):
            msg = "spec changed: the gang restarts with the new spec"
            self.cond(st.RESTARTING, True, st.SPEC_CHANGED, msg)
            self.cond(st.RUNNING, False, st.SPEC_CHANGED, msg)

        # Create the missing pods once their names are free and the restart backoff has passed.
        busy = self.terminating | set(self.plan.delete_pods)
        wait = 0.0
        if self.s.last_restart_time and self.s.restarts:
            since = (obs.now - run_policy.parse_time(self.s.last_restart_time)).total_seconds()
            wait = rp.restart_delay(self.s.restarts, spec.run_policy.backoff_seconds) - since
        missing = [p for p in desired if p["metadata"]["name"] not in current]
        if missing and wait > 0:
            self.requeue(wait)
        elif missing and not busy & {p["metadata"]["name"] for p in missing}:
            self.plan.create_pods = missing
            self.s.start_time = self.s.start_time or self.now
            # A retry of creates the API server rejected is no news: FailedCreate said it.
            if not st.is_true(self.old, st.REPLICA_FAILURE):
                self.event(st.CREATING, f"creating {len(missing)} pods (gang attempt {self.s.restarts})")
            if not st.get_condition(self.s, st.RUNNING):
                self.cond(st.RUNNING, False, st.CREATING, f"creating {len(missing)} pods")
        # A name held by another live controller does not free itself: say so (an earlier job of this
        # name is different: the garbage collector is about to delete its pods).
        held = sorted((p for p in self.foreign if p["metadata"]["name"] in {m["metadata"]["name"] for m in missing}
                       and not ownership.is_earlier_job(ownership.controller_of(p), ref.name, ref.uid)),
                      key=lambda p: p["metadata"]["name"])
        if held:
            self.plan.conflict = ownership.conflict_message("Pod", held[0], ref.name)

        self._pod_conditions(spec, current, desired_names)
        self._mirror_progress()
        return self.finish()

    def _pod_conditions(self, spec: RLJobSpec, current: dict[str, Obj], desired: list[str]) -> None:
        self.s.roles = {
            role: RoleStatus(
                ready=sum(1 for i in range(rs.replicas) if _is_ready(current.get(names.pod_name(self.ref.name, role, i), {}))),
                total=rs.replicas,
            )
            for role, rs in spec.roles.active()
        }
        whole = all(n in current for n in desired)
        # A gang that ran winds down unevenly: rollout and other ranks exit 0 at the end of the run a
        # moment before trainer rank 0 (whose exit decides success). They are done, not missing: the
        # job stays Running rather than blinking to Pending (with a WaitingForPods event) before it
        # succeeds. A pod that exits 0 before the gang has ever run counts as not running.
        done = {n for n in desired if n in current and _phase(current[n]) == "Succeeded"} \
            if st.is_true(self.old, st.RUNNING) else set()
        running = whole and all(_phase(current[n]) == "Running" or n in done for n in desired)
        ready = running and all(_is_ready(current[n]) or n in done for n in desired)
        # What keeps the gang from running that a user must act on: the scheduler's reason first
        # (nothing is placed yet), then a container the kubelet cannot start. One Event per episode.
        pods = list(current.values())
        blocked: tuple[str, str] | None = None
        if (message := _unschedulable_message(pods)) is not None:
            blocked = (st.UNSCHEDULABLE, message)
        elif (message := _container_waiting_message(pods)) is not None:
            blocked = (st.CONTAINER_WAITING, message)
        if ready:
            self.cond(st.PODS_READY, True, st.PODS_READY_REASON)
        elif blocked:
            before = st.get_condition(self.old, st.PODS_READY)
            if before is None or before.reason != blocked[0]:
                self.event(*blocked)
            self.cond(st.PODS_READY, False, *blocked)
        else:
            waiting = len(desired) - sum(1 for n in desired if n in current and _is_ready(current[n]))
            self.cond(st.PODS_READY, False, st.WAITING, f"{waiting} of {len(desired)} pods not ready")
        if running:
            self.cond(st.RUNNING, True, st.ALL_RUNNING, f"all {len(desired)} pods are running")
            if st.is_true(self.s, st.RESTARTING):
                self.cond(st.RESTARTING, False, st.GANG_RUNNING, "the restarted gang is running")
        elif blocked:
            self.cond(st.RUNNING, False, *blocked)
        elif st.get_condition(self.s, st.RUNNING) is None or st.is_true(self.s, st.RUNNING):
            self.cond(st.RUNNING, False, st.WAITING, "waiting for every pod of the gang to run")

    def _mirror_progress(self) -> None:
        """status.progress from trainer rank 0: its final document once it has terminated (the
        termination message), else what its endpoint served. A new trainer that has not started
        (or resumed) yet serves step 0: the last known progress is kept until it reports.

        A read that brings nothing new changes nothing, `updatedAt` included: it is when the
        progress last changed, not when it was last read. So a running job whose trainer makes no
        step costs no status write (and no watch event, and no extra pass) per poll, and an
        `updatedAt` far older than a step takes says the trainer is stuck."""
        p = self.final or self.observed.progress
        if p is None:
            return
        old = self.s.progress
        if p is not self.final and old is not None and p.state == "starting" \
                and p.resumed_from_step is None and p.step == 0:
            return
        new = progress_status(p, self.now)
        if old is not None and new.model_copy(update={"updated_at": old.updated_at}) == old:
            return
        self.s.progress = new


def rejected_status(status: Obj, message: str, now: datetime, generation: int | None,
                    reason: str = st.FAILED_CREATE) -> Obj | None:
    """`status` saying a create cannot succeed (condition ReplicaFailure=True; reason FailedCreate: the
    API server rejects it, ChildConflict: the name is another controller's), or None when it already
    says that: the same reason and a message of the same meaning (a quota's `used:` amounts move
    with every pod in the namespace, see messages.py). The effects layer writes it and posts the
    Event only then: the condition is the memory of what was posted, so a pass retried against the
    same rejection (or a restarted operator) posts nothing."""
    s = parse_status(status)
    before = st.get_condition(s, st.REPLICA_FAILURE)
    if before is not None and before.status == "True" and before.reason == reason \
            and messages.same_meaning(before.message, message):
        return None
    st.set_condition(s, st.REPLICA_FAILURE, True, reason, message, run_policy.format_time(now), generation)
    return s.model_dump(mode="json", by_alias=True, exclude_none=True)


def recovered_status(status: Obj) -> Obj | None:
    """`status` without ReplicaFailure once a pass created all it planned; None when it has none."""
    s = parse_status(status)
    if st.get_condition(s, st.REPLICA_FAILURE) is None:
        return None
    st.remove_condition(s, st.REPLICA_FAILURE)
    return s.model_dump(mode="json", by_alias=True, exclude_none=True)


def plan(job: Obj, observed: Observed) -> Plan:
    """The reconcile decision for one RLJob. Pure: same inputs, same (byte-identical) output."""
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return Plan(status=job.get("status") or {})  # being deleted: the garbage collector takes over
    p = _Pass(job, observed)
    spec = p.validate(job)
    if spec is None:
        return p.invalid(job.get("spec") or {})
    if spec.managed_by not in (None, names.MANAGER):
        return Plan(status=job.get("status") or {})  # another controller owns it: hands off
    if st.is_finished(p.s):
        return p.finished(spec)
    if spec.suspend:
        return p.suspended()
    return p.run(spec)
