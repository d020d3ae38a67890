"""The planner's Events and the corner cases the running operator met: one CreatingPods per gang
attempt, Unschedulable once (with the pod whose message names the missing resource), Resumed that
stays Resumed, a job being deleted left to the garbage collector, CheckpointsNotPersistent once per
change of its note, a rejected create remembered in ReplicaFailure (FailedCreate once per message)."""

from __future__ import annotations

import pytest
from factories import condition_message, conditions, later, make_job, make_pod, observe, step

from kuberl_operator.planner import plan, recovered_status, rejected_status

GANG_WAIT = "pod group is unschedulable, waiting for minCount pods from a gang to be scheduled"
NO_FIT = "0/5 nodes are available: 5 Insufficient nvidia.com/gpu."
PVC = {"persistentVolumeClaim": {"claimName": "ckpt"}}


def pending(p, **kw):
    return [make_pod(b["metadata"]["name"], phase="Pending", base=b, **kw) for b in p.create_pods]


def reasons(p):
    return [(e.type, e.reason) for e in p.events]


def test_creating_a_gang_posts_one_event():
    p, job = step(make_job(roles={"trainer": {"replicas": 2}}, runtime={"checkpoint": {"volume": PVC}}), observe())
    assert reasons(p) == [("Normal", "CreatingPods")]
    assert "2 pods (gang attempt 0)" in p.events[0].message
    p, _ = step(job, observe(pending(p), now=later(1)))
    assert reasons(p) == []


def test_unschedulable_warns_once_and_names_the_pod_that_does_not_fit():
    p, job = step(make_job(roles={"trainer": {"replicas": 4}}), observe())
    pods = [make_pod(b["metadata"]["name"], phase="Pending", base=b,
                     unschedulable=NO_FIT if b["metadata"]["name"] == "job-trainer-3" else GANG_WAIT)
            for b in p.create_pods]
    p, job = step(job, observe(pods, now=later(1)))
    assert reasons(p) == [("Warning", "Unschedulable")]
    assert p.events[0].message == f"pod job-trainer-3: {NO_FIT}"
    assert conditions(p.status)["PodsReady"] == ("False", "Unschedulable")
    p, _ = step(job, observe(pods, now=later(2)))
    assert reasons(p) == []


def waiting(pod, reason, message=""):
    """`pod` placed on a node, its container held by the kubelet in state waiting/`reason`."""
    pod = make_pod("", base=pod, phase="Pending", node="gpu-0")
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    pod["status"]["containerStatuses"] = [{"name": "runtime", "state": state}]
    return pod


@pytest.mark.parametrize("reason, message", [
    ("ImagePullBackOff", 'Back-off pulling image "registry.example/kuberl:typo"'),
    ("CreateContainerConfigError", 'secret "wandb" not found'),
])
def test_a_container_the_kubelet_cannot_start_is_said_once(reason, message):
    p, job = step(make_job(roles={"trainer": {"replicas": 2}}, runtime={"checkpoint": {"volume": PVC}}), observe())
    pods = pending(p, node="gpu-0")
    pods[1] = waiting(pods[1], reason, message)
    p, job = step(job, observe(pods, now=later(1)))
    said = f"pod job-trainer-1, container runtime: {reason}: {message}"
    assert reasons(p) == [("Warning", "ContainerWaiting")] and p.events[0].message == said
    assert conditions(p.status)["PodsReady"] == ("False", "ContainerWaiting")
    assert conditions(p.status)["Running"] == ("False", "ContainerWaiting")
    assert condition_message(p.status, "PodsReady") == said and p.status["phase"] == "Pending"
    # The kubelet alternates ErrImagePull / ImagePullBackOff: the message follows, no new Event.
    pods[1] = waiting(pods[1], "ErrImagePull", "rpc error: not found")
    p, job = step(job, observe(pods, now=later(2)))
    assert reasons(p) == [] and "ErrImagePull" in condition_message(p.status, "PodsReady")
    # Fixed (the user edited the image, the secret appeared): the pods run, the condition clears.
    pods = [make_pod("", base=x, phase="Running", node="gpu-0") for x in pods]
    p, job = step(job, observe(pods, now=later(3)))
    assert conditions(p.status)["PodsReady"] == ("True", "AllPodsReady")


def test_unschedulable_comes_before_a_waiting_container_and_plain_waiting_is_no_warning():
    p, job = step(make_job(roles={"trainer": {"replicas": 2}}, runtime={"checkpoint": {"volume": PVC}}), observe())
    pods = pending(p)
    pods[0] = make_pod("", base=pods[0], phase="Pending", unschedulable=NO_FIT)
    pods[1] = waiting(pods[1], "ImagePullBackOff")
    p, job = step(job, observe(pods, now=later(1)))
    assert reasons(p) == [("Warning", "Unschedulable")]
    pods[1] = waiting(pods[1], "ContainerCreating")  # normal start-up, not a reason to act
    pods[0] = make_pod("", base=pods[0], phase="Pending", node="gpu-1")
    p, _ = step(job, observe(pods, now=later(2)))
    assert reasons(p) == [] and conditions(p.status)["PodsReady"] == ("False", "WaitingForPods")


def test_resumed_stays_resumed_on_later_passes():
    p, job = step(make_job(), observe())
    job["spec"]["suspend"] = True
    p, job = step(job, observe([], now=later(1)))
    job["spec"]["suspend"] = False
    p, job = step(job, observe([], now=later(2)))
    assert conditions(p.status)["Suspended"] == ("False", "Resumed")
    p, job = step(job, observe(pending(p), now=later(3)))
    assert conditions(p.status)["Suspended"] == ("False", "Resumed")


def test_pods_of_a_previous_job_of_the_same_name_are_not_adopted():
    # `kubectl delete rlj job && kubectl apply -f job.yaml`: the first pass of the new job can see
    # the old job's pods (same names, labels and spec hash) before the garbage collector does.
    job = make_job(roles={"trainer": {"replicas": 2}}, runtime={"checkpoint": {"volume": PVC}})
    old_pods = [make_pod("", base=b, phase="Running") for b in plan(job, observe()).create_pods]
    for pod in old_pods:
        pod["metadata"]["ownerReferences"][0]["uid"] = "uid-of-the-previous-job"
    p, job = step(job, observe(old_pods))
    # Not ours: not counted, not deleted, and their names are busy, so nothing is created yet.
    assert (p.create_pods, p.delete_pods) == ([], [])
    assert p.status["phase"] == "Pending" and p.status["roles"]["trainer"]["ready"] == 0
    # Gone: the gang is created.
    p, job = step(job, observe([old_pods[1]], now=later(1)))
    assert p.create_pods == []
    p, job = step(job, observe([], now=later(2)))
    assert [x["metadata"]["name"] for x in p.create_pods] == ["job-trainer-0", "job-trainer-1"]


def test_a_job_being_deleted_is_left_to_the_garbage_collector():
    p, job = step(make_job(), observe())
    job["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:05Z"
    p = plan(job, observe([], now=later(10)))
    assert (p.create_pods, p.children, p.delete_pods, p.events) == ([], [], [], [])
    assert p.status == job["status"]


# ------------------------------------------------------------------- CheckpointsNotPersistent
@pytest.mark.parametrize("checkpoint, run_policy, suspend, warned", [
    ({}, {}, False, True),  # the defaults: an emptyDir, resume on, backoffLimit 3
    ({"volume": PVC}, {}, False, False),
    ({"resume": False}, {}, False, False),
    ({}, {"backoffLimit": 0}, False, False),  # never restarted, never resumed
    ({}, {"backoffLimit": 0}, True, True),  # ... unless suspended: the resume starts over
])
def test_checkpoints_on_an_empty_dir_warn_when_a_restart_would_resume(checkpoint, run_policy, suspend, warned):
    p, _ = step(make_job(runtime={"checkpoint": checkpoint}, runPolicy=run_policy, suspend=suspend), observe())
    events = [e for e in p.events if e.reason == "CheckpointsNotPersistent"]
    note = condition_message(p.status, "Valid")
    assert conditions(p.status)["Valid"] == ("True", "SpecValid")
    if warned:
        assert [e.type for e in events] == ["Warning"] and events[0].message == note
        assert "/checkpoints is an emptyDir" in note and "step 0" in note
    else:
        assert events == [] and note == ""


def test_the_checkpoint_warning_is_posted_once_per_change_of_its_note():
    p, job = step(make_job(), observe())
    assert [e.reason for e in p.events] == ["CheckpointsNotPersistent", "CreatingPods"]
    # Later passes (and a restarted operator: the note lives in status) post nothing new.
    p, job = step(job, observe(pending(p), now=later(1)))
    assert reasons(p) == []
    pods = pending(plan(make_job(), observe()))
    # A relative dir lands in the pod's workspace: the new note says where, and is posted once.
    job["spec"]["runtime"]["checkpoint"] = {"dir": "./runs/a"}
    p, job = step(job, observe(pods, now=later(2)))
    assert [e.message for e in p.events if e.reason == "CheckpointsNotPersistent"] == [
        "checkpoints are not persistent: ./runs/a (/workspace/runs/a in the pods) is an emptyDir "
        "(no spec.runtime.checkpoint.volume), so a gang restart or a resume starts training from step 0"]
    p, job = step(job, observe(pods, now=later(3)))
    assert "CheckpointsNotPersistent" not in [e.reason for e in p.events]
    # A volume clears the note; taking it away again warns again.
    job["spec"]["runtime"]["checkpoint"]["volume"] = PVC
    p, job = step(job, observe(pods, now=later(4)))
    assert condition_message(p.status, "Valid") == ""
    assert "CheckpointsNotPersistent" not in [e.reason for e in p.events]
    del job["spec"]["runtime"]["checkpoint"]["volume"]
    p, job = step(job, observe(pods, now=later(5)))
    assert [e.reason for e in p.events].count("CheckpointsNotPersistent") == 1


def test_a_finished_job_is_not_warned_about_checkpoints():
    p, job = step(make_job(runtime={"checkpoint": {"volume": PVC}}), observe())
    trainer = make_pod("job-trainer-0", phase="Succeeded", exit_code=0, base=p.create_pods[0])
    p, job = step(job, observe([trainer], now=later(1)))
    assert job["status"]["phase"] == "Succeeded"
    del job["spec"]["runtime"]["checkpoint"]["volume"]  # edited after it finished
    p, job = step(job, observe([trainer], now=later(2)))
    assert "CheckpointsNotPersistent" not in [e.reason for e in p.events]
    assert "not persistent" in condition_message(p.status, "Valid")


def test_a_spec_fixed_after_invalid_spec_is_warned_about_its_checkpoints():
    bad = make_job(roles={"trainer": {"replicas": 3}})  # 512 sequences do not split over 3 ranks
    p, job = step(bad, observe())
    assert job["status"]["phase"] == "Failed"
    assert "CheckpointsNotPersistent" not in [e.reason for e in p.events]
    job["spec"]["roles"]["trainer"]["replicas"] = 2
    p, job = step(job, observe(now=later(1)))
    assert [e.reason for e in p.events][:2] == ["CheckpointsNotPersistent", "CreatingPods"]


# ------------------------------------------------------------------------------- FailedCreate
QUOTA = "Pod job-trainer-1 not created: exceeded quota: one-pod, requested: pods=1, used: pods=1, limited: pods=1"


def rejected(job, message, seconds):
    """The job as the effects layer leaves it after a rejected create (None: nothing to write)."""
    status = rejected_status(job["status"], message, later(seconds), job["metadata"].get("generation"))
    return None if status is None else {**job, "status": status}


def test_a_rejected_create_is_said_once_per_distinct_message_and_cleared_once_created():
    p, job = step(make_job(roles={"trainer": {"replicas": 2}}, runtime={"checkpoint": {"volume": PVC}}), observe())
    assert reasons(p) == [("Normal", "CreatingPods")]
    pods = pending(p)[:1]  # the API server took the first pod and refused the second
    job = rejected(job, QUOTA, 1)
    assert conditions(job["status"])["ReplicaFailure"] == ("True", "FailedCreate")
    assert condition_message(job["status"], "ReplicaFailure") == QUOTA
    # Retries plan the same create; they post no CreatingPods, and the same rejection writes nothing.
    for n in (2, 3):
        p, job = step(job, observe(pods, now=later(n)))
        assert [x["metadata"]["name"] for x in p.create_pods] == ["job-trainer-1"]
        assert reasons(p) == [] and p.status == job["status"]
        assert rejected(job, QUOTA, n) is None
    # Another reason is news: the message changes, the transition time stays (still True).
    since = next(c for c in job["status"]["conditions"] if c["type"] == "ReplicaFailure")["lastTransitionTime"]
    other = "Pod job-trainer-1 not created: pods \"job-trainer-1\" is forbidden: violates PodSecurity \"restricted\""
    job = rejected(job, other, 4)
    assert condition_message(job["status"], "ReplicaFailure") == other
    assert next(c for c in job["status"]["conditions"] if c["type"] == "ReplicaFailure")["lastTransitionTime"] == since
    # A pass that created all it planned clears it; the condition is not the planner's to keep.
    assert "ReplicaFailure" not in conditions(recovered_status(job["status"]))
    assert recovered_status(recovered_status(job["status"])) is None


def test_a_finished_or_suspended_job_drops_the_create_failure():
    p, job = step(make_job(runtime={"checkpoint": {"volume": PVC}}), observe())
    job = rejected(job, QUOTA, 1)
    suspended = {**job, "spec": {**job["spec"], "suspend": True}}
    p, _ = step(suspended, observe(pending(p)[:1], now=later(2)))
    assert p.status["phase"] == "Suspended" and "ReplicaFailure" not in conditions(p.status)
    trainer = make_pod("job-trainer-0", phase="Succeeded", exit_code=0, base=plan(job, observe()).create_pods[0])
    p, _ = step(job, observe([trainer], now=later(3)))
    assert p.status["phase"] == "Succeeded" and "ReplicaFailure" not in conditions(p.status)
