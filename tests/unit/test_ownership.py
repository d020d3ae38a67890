"""Children the job finds rather than creates (ControllerRef rules: adopt orphans with the job's
label, never take another controller's), and condition messages that change their wording but not
their meaning (no status write, no Event for those)."""

from __future__ import annotations

import pytest
from factories import UID, condition_message, conditions, later, make_job, make_pod, observe, step

from kuberl_operator import ownership
from kuberl_operator.messages import same_meaning
from kuberl_operator.planner import plan, rejected_status

PVC = {"persistentVolumeClaim": {"claimName": "ckpt"}}


def job2():
    return make_job(roles={"trainer": {"replicas": 2}}, runtime={"checkpoint": {"volume": PVC}})


def as_server(pods, owner=None, rv="7"):
    """`pods` as the API server lists them: a uid, a resourceVersion, and `owner` as controller
    (None: orphaned, as `kubectl delete rlj --cascade=orphan` leaves them)."""
    out = []
    for i, pod in enumerate(pods):
        meta = pod["metadata"]
        meta.update(uid=f"pod-uid-{i}", resourceVersion=rv)
        meta["ownerReferences"] = [owner] if owner else []
        out.append(pod)
    return out


def rljob_ref(name, uid):
    return {"apiVersion": "kuberl.io/v1alpha1", "kind": "RLJob", "name": name, "uid": uid, "controller": True}


# ---------------------------------------------------------------------------------- adoption
def test_orphaned_pods_of_the_gang_are_adopted_and_counted():
    job = job2()
    pods = as_server([make_pod("", phase="Running", base=b) for b in plan(job, observe()).create_pods])
    p, _ = step(job, observe(pods))
    assert sorted(p.adopt_pods) == ["job-trainer-0", "job-trainer-1"]
    patch = p.adopt_pods["job-trainer-0"]["metadata"]
    assert (patch["uid"], patch["resourceVersion"]) == ("pod-uid-0", "7")  # preconditions
    [ref] = patch["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("RLJob", "job", UID, True)
    # Kept as the running gang: nothing deleted or created, the job is Running.
    assert (p.create_pods, p.delete_pods, p.status["phase"]) == ([], [], "Running")
    assert p.conflict is None


def test_adoption_keeps_other_owner_references_and_skips_pods_the_pass_deletes():
    job = job2()
    built = plan(job, observe()).create_pods
    pods = as_server([make_pod("", phase="Running", base=b) for b in built])
    keeper = {"apiVersion": "v1", "kind": "ConfigMap", "name": "notes", "uid": "cm-uid"}  # not a controller
    pods[0]["metadata"]["ownerReferences"] = [keeper]
    pods[1]["metadata"]["labels"]["kuberl.io/restart"] = "4"  # an attempt of the old job: stale
    p, _ = step(job, observe(pods))
    assert p.delete_pods == ["job-trainer-1"] and list(p.adopt_pods) == ["job-trainer-0"]
    assert p.adopt_pods["job-trainer-0"]["metadata"]["ownerReferences"][0] == keeper


def test_pods_the_job_controls_or_another_controls_are_not_adopted():
    job = job2()
    built = plan(job, observe()).create_pods
    ours = [make_pod("", phase="Running", base=b) for b in built]  # built with the job as controller
    p, _ = step(job, observe(ours))
    assert p.adopt_pods == {}
    theirs = as_server([make_pod("", phase="Running", base=b) for b in built], owner=rljob_ref("other", "u-2"))
    p, _ = step(job, observe(theirs))
    assert (p.adopt_pods, p.create_pods, p.delete_pods) == ({}, [], [])


def test_a_pod_name_held_by_another_controller_is_a_conflict_but_an_earlier_job_of_the_name_is_not():
    job = job2()
    built = plan(job, observe()).create_pods
    # The previous RLJob "job" (another uid): the garbage collector deletes its pods; wait quietly.
    earlier = as_server([make_pod("", phase="Running", base=built[1])], owner=rljob_ref("job", "old-uid"))
    p, _ = step(job, observe(earlier))
    assert p.conflict is None and [x["metadata"]["name"] for x in p.create_pods] == []
    # A ReplicaSet's pod with that name and label never goes by itself: the job says so.
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8", "uid": "rs-uid", "controller": True}
    held = as_server([make_pod("", phase="Running", base=built[1])], owner=rs)
    p, _ = step(job, observe(held))
    assert p.conflict == ("Pod job-trainer-1 exists and is controlled by ReplicaSet web-5d8 (uid rs-uid), "
                          "not by this RLJob: the job waits until it is deleted")
    assert p.create_pods == [] and p.adopt_pods == {}


@pytest.mark.parametrize("labels, controller, deleting, adoptable", [
    ({"kuberl.io/job": "job"}, None, False, True),
    ({"kuberl.io/job": "other"}, None, False, False),  # another job's selector
    ({}, None, False, False),  # unlabelled: someone else's object of that name
    ({"kuberl.io/job": "job"}, rljob_ref("job", "old"), False, False),  # controlled
    ({"kuberl.io/job": "job"}, None, True, False),  # being deleted
])
def test_what_is_adoptable(labels, controller, deleting, adoptable):
    meta = {"name": "job", "labels": labels, "ownerReferences": [controller] if controller else []}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert ownership.is_adoptable({"metadata": meta}, "job") is adoptable


def test_conflict_messages_name_the_holder():
    held = {"metadata": {"name": "job", "ownerReferences": [rljob_ref("other", "u-9")]}}
    assert ownership.conflict_message("Workload", held, "job") == (
        "Workload job exists and is controlled by RLJob other (uid u-9), not by this RLJob: the job waits until "
        "it is deleted")
    assert ownership.conflict_message("PodGroup", {"metadata": {"name": "job-gang-0"}}, "job") == (
        "PodGroup job-gang-0 exists and is not this RLJob's (no controller, no kuberl.io/job=job label): "
        "the job waits until it is deleted")


# ------------------------------------------------------------------------ message meanings
PULL_ERROR = ('failed to pull and unpack image "registry.example/kuberl:typo": failed to resolve reference '
              '"registry.example/kuberl:typo": registry.example/kuberl:typo: not found')
DENIED = 'failed to pull and unpack image "registry.example/kuberl:typo": pull access denied'
POD = "pod job-trainer-1, container runtime"


@pytest.mark.parametrize("old, new, same", [
    # The kubelet's two states of one failing pull (1.30+: the back-off carries the error).
    (f"{POD}: ErrImagePull: {PULL_ERROR}",
     f'{POD}: ImagePullBackOff: Back-off pulling image "registry.example/kuberl:typo": ErrImagePull: {PULL_ERROR}',
     True),
    (f'{POD}: ImagePullBackOff: Back-off pulling image "x": ErrImagePull: {PULL_ERROR}',
     f"{POD}: ErrImagePull: {PULL_ERROR}", True),
    # An older kubelet's back-off says no cause: nothing new after the error ...
    (f"{POD}: ErrImagePull: {PULL_ERROR}", f'{POD}: ImagePullBackOff: Back-off pulling image "x"', True),
    # ... but the error after such a back-off is news, once.
    (f'{POD}: ImagePullBackOff: Back-off pulling image "x"', f"{POD}: ErrImagePull: {PULL_ERROR}", False),
    # Another cause, another container, another pod: a new meaning.
    (f"{POD}: ErrImagePull: {PULL_ERROR}", f"{POD}: ErrImagePull: {DENIED}", False),
    (f"{POD}: ErrImagePull: {PULL_ERROR}", f"pod job-trainer-0, container runtime: ErrImagePull: {PULL_ERROR}", False),
    (f"{POD}: ErrImagePull: {PULL_ERROR}", f'{POD}: CreateContainerConfigError: secret "wandb" not found', False),
    # A quota's current usage moves with every pod in the namespace; what was asked and the limit do not.
    ("Pod job-trainer-1 not created: exceeded quota: q, requested: pods=1, used: pods=3, limited: pods=3",
     "Pod job-trainer-1 not created: exceeded quota: q, requested: pods=1, used: pods=4, limited: pods=3", True),
    ("Pod job-trainer-1 not created: exceeded quota: q, requested: cpu=2, used: cpu=6, limited: cpu=8",
     "Pod job-trainer-1 not created: exceeded quota: q, requested: cpu=4, used: cpu=6, limited: cpu=8", False),
    ("Pod job-trainer-1 not created: exceeded quota: q, requested: pods=1, used: pods=3, limited: pods=3",
     "Pod job-trainer-1 not created: exceeded quota: q, requested: pods=1, used: pods=3, limited: pods=5", False),
    # Repetition counters as Events print them.
    ('Back-off pulling image "x" (x3 over 2m)', 'Back-off pulling image "x" (x7 over 5m)', True),
    ("secret \"a\" not found", "secret \"b\" not found", False),
    ("", "", True),
])
def test_same_meaning(old, new, same):
    assert same_meaning(old, new) is same


def waiting(pod, reason, message):
    pod = make_pod("", base=pod, phase="Pending", node="gpu-0")
    pod["status"]["containerStatuses"] = [{"name": "runtime", "state": {"waiting": {"reason": reason, "message": message}}}]
    return pod


def test_an_image_pull_that_backs_off_again_writes_no_status():
    p, job = step(job2(), observe())
    pods = [make_pod("", base=b, phase="Pending", node="gpu-0") for b in p.create_pods]
    pods[1] = waiting(pods[1], "ErrImagePull", PULL_ERROR)
    p, job = step(job, observe(pods, now=later(1)))
    first = condition_message(p.status, "PodsReady")
    assert conditions(p.status)["PodsReady"] == ("False", "ContainerWaiting") and first == f"{POD}: ErrImagePull: {PULL_ERROR}"
    # The kubelet cycles through back-off and retries: same pod, container and error.
    for n, (reason, message) in enumerate([
            ("ImagePullBackOff", f'Back-off pulling image "registry.example/kuberl:typo": ErrImagePull: {PULL_ERROR}'),
            ("ErrImagePull", PULL_ERROR),
            ("ImagePullBackOff", 'Back-off pulling image "registry.example/kuberl:typo"')], start=2):
        pods[1] = waiting(pods[1], reason, message)
        p = plan(job, observe(pods, now=later(n)))
        assert p.status == job["status"] and p.events == [], reason  # nothing to write, nothing to post
    # The registry now says something else: that is news (the condition; the episode's Event stays one).
    pods[1] = waiting(pods[1], "ErrImagePull", DENIED)
    p, job = step(job, observe(pods, now=later(9)))
    assert condition_message(p.status, "PodsReady") == f"{POD}: ErrImagePull: {DENIED}"
    assert condition_message(p.status, "Running") == f"{POD}: ErrImagePull: {DENIED}" and p.events == []


def test_a_spec_edit_takes_the_new_wording():
    p, job = step(job2(), observe())
    pods = [make_pod("", base=b, phase="Pending", node="gpu-0") for b in p.create_pods]
    pods[1] = waiting(pods[1], "ErrImagePull", PULL_ERROR)
    p, job = step(job, observe(pods, now=later(1)))
    job["metadata"]["generation"] = 2  # e.g. a run-policy edit: the pods stay
    job["spec"]["runPolicy"] = {"backoffLimit": 5}
    pods[1] = waiting(pods[1], "ImagePullBackOff", f'Back-off pulling image "x": ErrImagePull: {PULL_ERROR}')
    p, _ = step(job, observe(pods, now=later(2)))
    assert "ImagePullBackOff" in condition_message(p.status, "PodsReady")


def test_a_quota_refusal_whose_usage_moves_is_not_news():
    _, job = step(job2(), observe())
    quota = "Pod job-trainer-1 not created: exceeded quota: q, requested: pods=1, used: pods={}, limited: pods=3"
    status = rejected_status(job["status"], quota.format(3), later(1), 1)
    assert condition_message(status, "ReplicaFailure") == quota.format(3)
    assert rejected_status(status, quota.format(2), later(2), 1) is None
    # The same sentence under another reason is another condition.
    conflict = rejected_status(status, quota.format(3), later(3), 1, "ChildConflict")
    assert conditions(conflict)["ReplicaFailure"] == ("True", "ChildConflict")
