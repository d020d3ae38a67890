"""Conditions, reasons and the phase derived from them (Kubernetes API conventions).

The operator collects condition changes during a reconcile pass and writes status once, only if
it differs. `lastTransitionTime` moves only when a condition's status changes.
"""

from __future__ import annotations

from kuberl_operator.api import Condition, Phase, RLJobStatus

# Condition types, in the order they are listed in status.
VALID = "Valid"
ADMITTED = "Admitted"
SUSPENDED = "Suspended"
PODS_READY = "PodsReady"
RUNNING = "Running"
RESTARTING = "Restarting"
REPLICA_FAILURE = "ReplicaFailure"  # True while a pod or child cannot be created (as a ReplicaSet's)
SUCCEEDED = "Succeeded"
FAILED = "Failed"
ORDER = [VALID, ADMITTED, SUSPENDED, PODS_READY, RUNNING, RESTARTING, REPLICA_FAILURE, SUCCEEDED, FAILED]

# Reasons.
SPEC_VALID = "SpecValid"
INVALID_SPEC = "InvalidSpec"
ADMITTED_REASON = "Admitted"
SUSPENDED_REASON = "Suspended"
RESUMED = "Resumed"
NOT_SUSPENDED = "NotSuspended"
CREATING = "CreatingPods"
UNSCHEDULABLE = "Unschedulable"
CONTAINER_WAITING = "ContainerWaiting"  # placed, but the kubelet cannot start a container (image, secret)
FAILED_CREATE = "FailedCreate"  # ReplicaFailure's reason and an Event: the API server rejected a child
CHILD_CONFLICT = "ChildConflict"  # ReplicaFailure's reason and an Event: a child's name is another controller's
WAITING = "WaitingForPods"
PODS_READY_REASON = "AllPodsReady"
ALL_RUNNING = "AllPodsRunning"
GANG_RESTARTING = "GangRestarting"
SPEC_CHANGED = "SpecChanged"
GANG_RUNNING = "GangRunning"
COMPLETED = "Completed"
SUCCEEDED_REASON = "TrainerSucceeded"
BACKOFF_LIMIT = "BackoffLimitExceeded"
NON_RETRYABLE = "NonRetryableFailure"
DEADLINE = "DeadlineExceeded"
CHECKPOINTS_NOT_PERSISTENT = "CheckpointsNotPersistent"  # an Event; the Valid condition's message says it too

WARNING_REASONS = {INVALID_SPEC, UNSCHEDULABLE, CONTAINER_WAITING, FAILED_CREATE, CHILD_CONFLICT, GANG_RESTARTING, BACKOFF_LIMIT, NON_RETRYABLE, DEADLINE,
                   CHECKPOINTS_NOT_PERSISTENT}


def get_condition(status: RLJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def is_true(status: RLJobStatus, type_: str) -> bool:
    c = get_condition(status, type_)
    return c is not None and c.status == "True"


def set_condition(status: RLJobStatus, type_: str, value: bool, reason: str, message: str, now: str,
                  generation: int | None) -> None:
    new = "True" if value else "False"
    old = get_condition(status, type_)
    cond = Condition(
        type=type_,
        status=new,
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time if old is not None and old.status == new else now,
        observed_generation=generation,
    )
    others = [c for c in status.conditions if c.type != type_]
    status.conditions = sorted([*others, cond], key=lambda c: ORDER.index(c.type) if c.type in ORDER else 99)


def remove_condition(status: RLJobStatus, type_: str) -> None:
    status.conditions = [c for c in status.conditions if c.type != type_]


def derive_phase(status: RLJobStatus) -> Phase:
    for type_, phase in ((FAILED, "Failed"), (SUCCEEDED, "Succeeded"), (SUSPENDED, "Suspended"),
                         (RESTARTING, "Restarting"), (RUNNING, "Running")):
        if is_true(status, type_):
            return phase  # type: ignore[return-value]
    return "Pending"


def is_finished(status: RLJobStatus) -> bool:
    return is_true(status, SUCCEEDED) or is_true(status, FAILED)
