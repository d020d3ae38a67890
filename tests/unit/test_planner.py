"""plan(job, observed) -> Plan: the whole reconcile decision, table-driven.

Each test walks the pure state machine the way the operator does: plan, write the planned status
back into the job (`step`), report the created pods back in some phase (`reported`), plan again.
Nothing here talks to an API server; tests/integration runs the same decisions against a real one.
"""

import copy
import dataclasses

import pytest
import yaml

from kuberl_operator import labels, names
from kuberl_operator.planner import plan
from kuberl_runtime import contract
from kuberl_runtime.contract import Progress

from factories import (
    UID,
    condition_message,
    conditions,
    later,
    make_job,
    make_pod,
    names_of,
    observe,
    step,
)

PPO = {"algorithm": {"name": "ppo"}}
DISAGG = dict(placement="disaggregated", roles={"trainer": {"replicas": 2}, "rollout": {"replicas": 1}})
DISAGG_PODS = ["job-trainer-0", "job-trainer-1", "job-rollout-0"]


def reported(pods: list[dict], phase: str = "Running", **kw) -> list[dict]:
    """Built pods as the API server reports them once in `phase`."""
    return [make_pod(p["metadata"]["name"], phase=phase, base=p, **kw) for p in pods]


def replace(pods: list[dict], name: str, **kw) -> list[dict]:
    """The same pods with `name` reported differently (make_pod keywords)."""
    return [make_pod(name, base=p, **kw) if p["metadata"]["name"] == name else p for p in pods]


def running(job: dict) -> tuple[dict, list[dict]]:
    """Create the gang and report it Running and ready: (job with status Running, its pods)."""
    p, job = step(job, observe())
    pods = reported(p.create_pods)
    p, job = step(job, observe(pods))
    assert p.status["phase"] == "Running", p.status
    return job, pods


def dump(p) -> str:
    return yaml.safe_dump(dataclasses.asdict(p), sort_keys=False)


# ------------------------------------------------------------------------------------------ create

COMBINATIONS = [
    # (id, make_job kwargs, pod names)
    ("colocated-trainer", dict(), ["job-trainer-0"]),
    ("colocated-2-trainers", dict(roles={"trainer": {"replicas": 2, "gpus": 8}}), ["job-trainer-0", "job-trainer-1"]),
    ("colocated-cpu", dict(roles={"trainer": {"gpus": 0}}), ["job-trainer-0"]),
    ("colocated-ppo-critic", dict(roles={"critic": {"replicas": 1}}, runtime=PPO), ["job-trainer-0", "job-critic-0"]),
    ("colocated-reference-reward", dict(roles={"reference": {"replicas": 1}, "reward": {"replicas": 2}}),
     ["job-trainer-0", "job-reference-0", "job-reward-0", "job-reward-1"]),
    ("disaggregated", DISAGG, DISAGG_PODS),
    ("disaggregated-every-role",
     dict(placement="disaggregated", runtime={**PPO, "rollout": {"engine": "vllm", "tensorParallelSize": 2}},
          roles={"rollout": {"replicas": 2, "gpus": 2, "tensorParallelSize": 2}, "critic": {"replicas": 1},
                 "reference": {"replicas": 1}, "reward": {"replicas": 1}}),
     ["job-trainer-0", "job-rollout-0", "job-rollout-1", "job-critic-0", "job-reference-0", "job-reward-0"]),
]


@pytest.mark.parametrize("kw, pod_names", [c[1:] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_create(kw, pod_names):
    job = make_job(**kw)
    p = plan(job, observe())
    assert [(c["kind"], c["metadata"]["name"]) for c in p.children] == [("ConfigMap", "job-config"), ("Service", "job")]
    assert names_of(p.create_pods) == pod_names
    assert p.delete_pods == [] and not p.delete_job
    for obj in [*p.children, *p.create_pods]:
        assert obj["metadata"]["namespace"] == "team-a"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
        assert obj["metadata"]["labels"][labels.JOB] == "job"
    for pod in p.create_pods:
        role, index = pod["metadata"]["name"].split("-")[1:]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert (env[contract.ENV_ROLE], env[contract.ENV_ROLE_RANK], env[contract.ENV_RESTART]) == (role, index, "0")
        assert pod["metadata"]["labels"][labels.ROLE] == role
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["spec"]["containers"][0]["volumeMounts"]
    s = p.status
    assert s["phase"] == "Pending"
    assert conditions(s) == {
        "Valid": ("True", "SpecValid"), "Admitted": ("True", "Admitted"),
        "PodsReady": ("False", "WaitingForPods"), "Running": ("False", "CreatingPods"),
    }
    assert s["startTime"] == "2025-01-01T12:00:00Z" and s["restarts"] == 0 and s["observedGeneration"] == 1
    roles = {n.split("-")[1] for n in pod_names}
    assert s["roles"] == {r: {"ready": 0, "total": sum(n.split("-")[1] == r for n in pod_names)} for r in roles}


def test_gpu_placement_reaches_the_pods():
    job = make_job(roles={"trainer": {"gpus": 8, "gpuProduct": ["NVIDIA-H100-80GB-HBM3"]}})
    pod = plan(job, observe()).create_pods[0]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]


# ------------------------------------------------------------------------- determinism, idempotence


@pytest.mark.parametrize("kw", [c[1] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_same_input_gives_byte_identical_output(kw):
    job = make_job(**kw)
    first = dump(plan(copy.deepcopy(job), observe()))
    assert dump(plan(copy.deepcopy(job), observe())) == first
    assert job == make_job(**kw)  # the input is not mutated


def test_plan_on_its_own_output_changes_nothing():
    job = make_job(**DISAGG)
    p1, job = step(job, observe())
    pending = reported(p1.create_pods, phase="Pending")
    p2, job2 = step(job, observe(pending, now=later(5)))
    assert (p2.create_pods, p2.delete_pods, p2.events) == ([], [], [])
    assert p2.children == p1.children
    assert p2.status == p1.status  # nothing changed, so no transition time moved either
    p3, _ = step(job2, observe(pending, now=later(10)))
    assert dump(p3) == dump(p2)


def test_a_running_gang_is_left_alone():
    job, pods = running(make_job(**DISAGG))
    p = plan(job, observe(pods, now=later(60)))
    assert (p.create_pods, p.delete_pods, p.events, p.requeue_after) == ([], [], [], None)
    assert p.status == job["status"]


# --------------------------------------------------------------------------------- running, ready


def test_pending_to_running():
    job = make_job(**DISAGG)
    p, job = step(job, observe())
    pods = reported(p.create_pods, phase="Pending")
    half = replace(pods, "job-trainer-0", phase="Running")
    p, job = step(job, observe(half, now=later(1)))
    assert p.status["phase"] == "Pending"
    assert condition_message(p.status, "PodsReady") == "2 of 3 pods not ready"
    assert p.status["roles"]["trainer"] == {"ready": 1, "total": 2}

    p, job = step(job, observe(reported(pods, phase="Running", ready=False), now=later(2)))
    assert conditions(p.status)["Running"] == ("True", "AllPodsRunning")
    assert conditions(p.status)["PodsReady"] == ("False", "WaitingForPods")
    assert p.status["phase"] == "Running"
    assert [(e.type, e.reason) for e in p.events] == [("Normal", "AllPodsRunning")]

    p, job = step(job, observe(reported(pods), now=later(3)))
    assert conditions(p.status)["PodsReady"] == ("True", "AllPodsReady")
    assert p.status["roles"] == {"trainer": {"ready": 2, "total": 2}, "rollout": {"ready": 1, "total": 1}}
    running_since = {c["type"]: c["lastTransitionTime"] for c in p.status["conditions"]}["Running"]
    assert running_since == "2025-01-01T12:00:02Z"  # moved when Running became True, not since


def test_unschedulable_is_reported_with_the_pod_and_the_scheduler_message():
    job = make_job(**DISAGG)
    p, job = step(job, observe())
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pods = replace(reported(p.create_pods, phase="Pending"), "job-rollout-0", phase="Pending", unschedulable=msg)
    p, _ = step(job, observe(pods, now=later(1)))
    assert conditions(p.status)["PodsReady"] == ("False", "Unschedulable")
    assert conditions(p.status)["Running"] == ("False", "Unschedulable")
    assert condition_message(p.status, "Running") == f"pod job-rollout-0: {msg}"


def test_progress_is_mirrored_from_trainer_rank_0():
    job, pods = running(make_job())
    progress = Progress(step=5, total_steps=10, reward_mean=0.123456, kl=0.01, tokens_per_second=1234.5,
                        weights_version=5, last_checkpoint_step=4)
    p = plan(job, observe(pods, now=later(1), progress=progress))
    assert p.status["progress"] == {
        "step": 5, "totalSteps": 10, "rewardMean": "0.1235", "kl": "0.01", "tokensPerSecond": "1234",
        "weightsVersion": 5, "lastCheckpointStep": 4, "updatedAt": "2025-01-01T12:00:01Z"}


def test_a_progress_read_that_brings_nothing_new_changes_no_status():
    job, pods = running(make_job())
    doc = Progress(state="running", step=5, total_steps=10, reward_mean=0.5, entropy=1.25)
    p, job = step(job, observe(pods, now=later(1), progress=doc))
    assert p.status["progress"]["updatedAt"] == "2025-01-01T12:00:01Z"

    # The same document, and one that differs only where status.progress mirrors nothing: the
    # planned status is the stored one (the effects layer writes nothing), updatedAt included.
    for seconds, again in ((16, doc), (31, doc.model_copy(update={"entropy": 1.5}))):
        p = plan(job, observe(pods, now=later(seconds), progress=again))
        assert p.status == job["status"] and p.events == []

    # The next step moves it: updatedAt is when the progress last changed.
    p, job = step(job, observe(pods, now=later(46), progress=doc.model_copy(update={"step": 6})))
    assert (p.status["progress"]["step"], p.status["progress"]["updatedAt"]) == (6, "2025-01-01T12:00:46Z")


def test_final_progress_comes_from_trainer_rank_0s_termination_message():
    job, pods = running(make_job(**DISAGG))
    p, job = step(job, observe(pods, now=later(1), progress=Progress(state="running", step=289, total_steps=300)))
    assert p.status["progress"]["step"] == 289
    final = Progress(state="succeeded", step=300, total_steps=300, reward_mean=0.75, last_checkpoint_step=300)
    message = contract.format_termination_message("succeeded at step 300 of 300", final)
    done = replace(pods, "job-trainer-0", phase="Succeeded", exit_code=0, reason="Completed", message=message)
    p, job = step(job, observe(done, now=later(50)))  # the endpoint is gone: no document read
    assert p.status["phase"] == "Succeeded"
    assert p.status["progress"] == {"step": 300, "totalSteps": 300, "rewardMean": "0.75", "weightsVersion": 0,
                                    "lastCheckpointStep": 300, "updatedAt": "2025-01-01T12:00:50Z"}


def test_a_failure_message_shows_the_human_part_and_keeps_the_last_progress():
    job, pods = running(make_job(**DISAGG))
    last = Progress(state="failed", step=120, total_steps=300, last_checkpoint_step=100)
    message = contract.format_termination_message("peer job-rollout-0 lost: rendezvous timed out", last)
    failed = replace(pods, "job-trainer-0", phase="Failed", exit_code=contract.EXIT_PEER_LOST, message=message)
    p, job = step(job, observe(failed, now=later(10)))
    assert p.status["failure"]["message"] == "peer job-rollout-0 lost: rendezvous timed out"
    assert "kuberl-progress" not in p.events[0].message and p.events[0].message.endswith("rendezvous timed out")
    assert (p.status["progress"]["step"], p.status["progress"]["lastCheckpointStep"]) == (120, 100)

    # The next gang: its trainer serves step 0 until it has resumed; the last progress stays.
    p, job = step(job, observe([], now=later(30)))
    pods = reported(p.create_pods)
    p, job = step(job, observe(pods, now=later(31), progress=Progress(state="starting", total_steps=300)))
    assert p.status["progress"]["step"] == 120
    resumed = Progress(state="starting", step=100, total_steps=300, resumed_from_step=100, last_checkpoint_step=100)
    p, job = step(job, observe(pods, now=later(32), progress=resumed))
    assert (p.status["progress"]["step"], p.status["progress"]["resumedFromStep"]) == (100, 100)


# ---------------------------------------------------------------------------------- gang restarts


def test_pod_failure_restarts_the_whole_gang():
    job, pods = running(make_job(**DISAGG))
    failed = replace(pods, "job-trainer-1", phase="Failed", exit_code=137, reason="OOMKilled", node="gpu-1")
    p, job = step(job, observe(failed, now=later(100)))
    s = p.status
    assert s["restarts"] == 1 and s["phase"] == "Restarting"
    assert s["failure"] == {"role": "trainer", "pod": "job-trainer-1", "container": "runtime", "exitCode": 137,
                            "reason": "OOMKilled", "message": "killed (SIGKILL, often out of memory)",
                            "node": "gpu-1", "retryable": True}
    assert sorted(p.delete_pods) == sorted(DISAGG_PODS) and p.create_pods == []
    assert conditions(s)["Restarting"] == ("True", "GangRestarting")
    assert conditions(s)["Running"] == ("False", "GangRestarting")
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "GangRestarting")]
    assert p.events[0].message.startswith(
        "restart 1/3 after failure of pod job-trainer-1 (role trainer), container runtime, exit code 137, "
        "reason OOMKilled, on node gpu-1")
    assert p.requeue_after == 10  # runPolicy.backoffSeconds x 2^0

    # The old pods are still there (or terminating): they are stale, nothing is created yet.
    p, job = step(job, observe(failed, now=later(101)))
    assert sorted(p.delete_pods) == sorted(DISAGG_PODS) and p.create_pods == []
    terminating = [make_pod("", base=x, phase=x["status"]["phase"], deleting=True) for x in failed]
    p, job = step(job, observe(terminating, now=later(200)))
    assert p.create_pods == [] and p.delete_pods == []

    # Backoff over, names free: the next attempt's gang, labelled and told it is restart 1.
    p, job = step(job, observe([], now=later(105)))
    assert p.create_pods == [] and p.requeue_after == 5
    p, job = step(job, observe([], now=later(110)))
    assert names_of(p.create_pods) == DISAGG_PODS
    for pod in p.create_pods:
        assert pod["metadata"]["labels"][labels.RESTART] == "1"
        assert {"name": contract.ENV_RESTART, "value": "1"} in pod["spec"]["containers"][0]["env"]

    p, job = step(job, observe(reported(p.create_pods), now=later(120)))
    assert p.status["phase"] == "Running"
    assert conditions(p.status)["Restarting"] == ("False", "GangRunning")
    assert p.status["restarts"] == 1 and p.status["failure"]["pod"] == "job-trainer-1"  # kept for the user


def test_the_first_pod_to_fail_is_blamed():
    job, pods = running(make_job(**DISAGG))
    pods = replace(pods, "job-trainer-0", phase="Failed", exit_code=75, finished_at="2025-01-01T12:00:09Z",
                   message="peer job-rollout-0 lost")
    pods = replace(pods, "job-rollout-0", phase="Failed", exit_code=1, reason="Error", node="gpu-3",
                   finished_at="2025-01-01T12:00:05Z", message="Traceback ... CUDA error")
    p = plan(job, observe(pods, now=later(10)))
    f = p.status["failure"]
    assert (f["pod"], f["role"], f["exitCode"], f["node"], f["message"]) == (
        "job-rollout-0", "rollout", 1, "gpu-3", "Traceback ... CUDA error")


@pytest.mark.parametrize("exit_code, meaning", [(contract.EXIT_CONFIG_ERROR, "configuration error"),
                                                (contract.EXIT_DATA_ERROR, "data or numerical error")])
def test_non_retryable_exit_codes_fail_at_once(exit_code, meaning):
    job, pods = running(make_job(**DISAGG))
    pods = replace(pods, "job-trainer-0", phase="Failed", exit_code=exit_code, node="gpu-0")
    p = plan(job, observe(pods, now=later(10)))
    s = p.status
    assert s["phase"] == "Failed" and s["restarts"] == 0
    assert conditions(s)["Failed"] == ("True", "NonRetryableFailure")
    assert condition_message(s, "Failed") == (
        f"not retried: pod job-trainer-0 (role trainer), container runtime, exit code {exit_code}, "
        f"reason Error, on node gpu-0: {meaning}")
    assert s["failure"]["retryable"] is False
    assert s["completionTime"] == "2025-01-01T12:00:10Z"
    assert sorted(p.delete_pods) == ["job-rollout-0", "job-trainer-1"]  # cleanPodPolicy Running
    assert p.create_pods == []
    assert ("Warning", "NonRetryableFailure") in [(e.type, e.reason) for e in p.events]


@pytest.mark.parametrize(
    "exit_code, reason, retried",
    [
        (1, "Error", True),  # an unknown error: retried up to backoffLimit
        (contract.EXIT_OUT_OF_MEMORY, "Error", True),
        (contract.EXIT_PEER_LOST, "Error", True),
        (137, "OOMKilled", True),
        (143, "Error", True),  # SIGTERM, e.g. preemption
        (contract.EXIT_CONFIG_ERROR, "Error", False),
        (contract.EXIT_DATA_ERROR, "Error", False),
    ],
)
def test_failure_classes(exit_code, reason, retried):
    job, pods = running(make_job())
    p = plan(job, observe(reported(pods, phase="Failed", exit_code=exit_code, reason=reason), now=later(10)))
    assert p.status["phase"] == ("Restarting" if retried else "Failed")
    assert p.status["restarts"] == (1 if retried else 0)
    assert p.status["failure"]["retryable"] is retried


def test_an_evicted_pod_is_retried_with_the_kubelet_reason():
    job, pods = running(make_job())
    evicted = reported(pods, phase="Failed", node="gpu-2")
    evicted[0]["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    p = plan(job, observe(evicted, now=later(10)))
    f = p.status["failure"]
    assert (f["reason"], f["message"], "exitCode" in f, f["retryable"]) == (
        "Evicted", "The node was low on resource: memory.", False, True)
    assert p.status["phase"] == "Restarting"


@pytest.mark.parametrize("backoff_limit", [0, 1, 2])
def test_backoff_limit_exhausted_fails_the_job(backoff_limit):
    job = make_job(runPolicy={"backoffLimit": backoff_limit, "backoffSeconds": 0})
    t = 0
    for attempt in range(backoff_limit + 1):
        p, job = step(job, observe([], now=later(t)))
        assert names_of(p.create_pods) == ["job-trainer-0"], attempt
        pods = reported(p.create_pods, phase="Failed", exit_code=137, reason="OOMKilled", node=f"n{attempt}")
        p, job = step(job, observe(pods, now=later(t + 1)))
        t += 10
    s = p.status
    assert s["phase"] == "Failed" and s["restarts"] == backoff_limit
    assert conditions(s)["Failed"] == ("True", "BackoffLimitExceeded")
    assert condition_message(s, "Failed").startswith(
        f"backoffLimit ({backoff_limit}) reached; last failure: pod job-trainer-0 (role trainer), container "
        f"runtime, exit code 137, reason OOMKilled, on node n{backoff_limit}")
    p, _ = step(job, observe([], now=later(t + 1000)))
    assert p.create_pods == [] and p.status["phase"] == "Failed"  # a failed job stays failed


def test_backoff_grows_exponentially_and_is_capped():
    job, pods = running(make_job(runPolicy={"backoffLimit": 20, "backoffSeconds": 100}))
    delays = []
    for restart in range(1, 6):
        failed = reported(pods, phase="Failed", exit_code=1)
        p, job = step(job, observe(failed, now=later(10_000 * restart)))
        delays.append(p.requeue_after)
        p, job = step(job, observe([], now=later(10_000 * restart + 600)))
        pods = reported(p.create_pods)
    assert delays == [100, 200, 400, 600, 600]


def test_node_lost_restarts_the_gang():
    job, pods = running(make_job(**DISAGG))
    pods = [make_pod("", base=p, node=f"gpu-{i}") for i, p in enumerate(pods)]
    p = plan(job, observe(pods, now=later(10), nodes={"gpu-0", "gpu-1", "gpu-2"}))
    assert p.delete_pods == [] and p.status["phase"] == "Running"
    p = plan(job, observe(pods, now=later(10), nodes={"gpu-0", "gpu-2"}))
    f = p.status["failure"]
    assert (f["pod"], f["reason"], f["node"], f["retryable"]) == ("job-trainer-1", "NodeLost", "gpu-1", True)
    assert p.status["restarts"] == 1 and sorted(p.delete_pods) == sorted(DISAGG_PODS)


def test_a_pod_deleted_from_a_running_gang_restarts_it():
    job, pods = running(make_job(**DISAGG))
    p = plan(job, observe([x for x in pods if x["metadata"]["name"] != "job-rollout-0"], now=later(10)))
    f = p.status["failure"]
    assert (f["pod"], f["role"], f["reason"]) == ("job-rollout-0", "rollout", "PodDeleted")
    assert p.status["restarts"] == 1


# ------------------------------------------------------------------------------------ spec change


def test_a_pod_shaping_spec_change_replaces_the_gang_without_a_failure():
    job, pods = running(make_job(**DISAGG))
    job = {**job, "spec": {**job["spec"], "image": "reg/kuberl:2"}, "metadata": {**job["metadata"], "generation": 2}}
    p, job = step(job, observe(pods, now=later(10)))
    assert sorted(p.delete_pods) == sorted(DISAGG_PODS) and p.create_pods == []
    assert p.status["restarts"] == 0 and "failure" not in p.status
    assert conditions(p.status)["Restarting"] == ("True", "SpecChanged")
    p, job = step(job, observe([], now=later(11)))
    assert names_of(p.create_pods) == DISAGG_PODS
    assert {c["image"] for pod in p.create_pods for c in pod["spec"]["containers"]} == {"reg/kuberl:2"}


def test_a_run_policy_change_keeps_the_gang():
    job, pods = running(make_job(**DISAGG))
    job = {**job, "spec": {**job["spec"], "runPolicy": {"backoffLimit": 7}}}
    p = plan(job, observe(pods, now=later(10)))
    assert (p.create_pods, p.delete_pods) == ([], [])


# ----------------------------------------------------------------------------------------- success


@pytest.mark.parametrize(
    "clean, deleted",
    [("Running", ["job-rollout-0", "job-trainer-1"]), ("All", sorted(DISAGG_PODS)), ("None", [])],
)
def test_success_when_trainer_rank_0_succeeds(clean, deleted):
    job, pods = running(make_job(runPolicy={"cleanPodPolicy": clean}, **DISAGG))
    pods = replace(pods, "job-trainer-0", phase="Succeeded")
    p, job = step(job, observe(pods, now=later(50)))
    s = p.status
    assert s["phase"] == "Succeeded"
    assert conditions(s)["Succeeded"] == ("True", "TrainerSucceeded")
    assert conditions(s)["Running"] == ("False", "Completed")
    assert s["completionTime"] == "2025-01-01T12:00:50Z"
    assert sorted(p.delete_pods) == deleted and p.create_pods == []
    assert [(e.type, e.reason) for e in p.events] == [("Normal", "TrainerSucceeded")]
    p, _ = step(job, observe(pods, now=later(60)))  # finished: only clean-up, never new pods
    assert p.create_pods == [] and sorted(p.delete_pods) == deleted and p.status == s


def test_another_rank_exiting_0_is_not_success():
    job, pods = running(make_job(**DISAGG))
    p = plan(job, observe(replace(pods, "job-trainer-1", phase="Succeeded"), now=later(10)))
    assert p.status["phase"] != "Succeeded" and "Succeeded" not in conditions(p.status)


def test_ranks_exiting_0_before_trainer_0_keep_the_job_running():
    # The end of a disaggregated run: the rollout pod and trainer rank 1 exit 0 a moment before
    # trainer rank 0. The job stays Running (no Pending blink, no WaitingForPods event), then succeeds.
    job, pods = running(make_job(**DISAGG))
    pods = replace(pods, "job-rollout-0", phase="Succeeded", exit_code=0, reason="Completed")
    pods = replace(pods, "job-trainer-1", phase="Succeeded", exit_code=0, reason="Completed")
    p, job = step(job, observe(pods, now=later(10)))
    assert p.status["phase"] == "Running" and conditions(p.status)["Running"][0] == "True"
    assert conditions(p.status)["PodsReady"][0] == "True"
    assert (p.create_pods, p.delete_pods, p.events) == ([], [], [])
    assert p.status["roles"]["rollout"] == {"ready": 0, "total": 1}  # the counts say what is up
    p, _ = step(job, observe(replace(pods, "job-trainer-0", phase="Succeeded"), now=later(12)))
    assert p.status["phase"] == "Succeeded"


def test_a_rank_exiting_0_before_the_gang_ran_is_not_running():
    p, job = step(make_job(**DISAGG), observe())
    pods = replace(reported(p.create_pods), "job-trainer-0", phase="Pending")
    pods = replace(pods, "job-rollout-0", phase="Succeeded", exit_code=0, reason="Completed")
    p, job = step(job, observe(pods, now=later(1)))
    assert p.status["phase"] == "Pending" and conditions(p.status)["Running"][0] == "False"
    p, _ = step(job, observe(replace(pods, "job-trainer-0", phase="Running"), now=later(2)))
    assert p.status["phase"] == "Pending"  # a gang with a finished pod never starts as Running


# ---------------------------------------------------------------------------------- suspend, resume


def test_suspend_deletes_the_pods_and_resume_recreates_them():
    job, pods = running(make_job(**DISAGG))
    job["spec"]["suspend"] = True
    p, job = step(job, observe(pods, now=later(10)))
    s = p.status
    assert s["phase"] == "Suspended"
    assert conditions(s)["Suspended"] == ("True", "Suspended")
    assert conditions(s)["Running"] == ("False", "Suspended")
    assert sorted(p.delete_pods) == sorted(DISAGG_PODS) and p.create_pods == []
    p, job = step(job, observe([], now=later(20)))
    assert p.create_pods == [] and p.status["phase"] == "Suspended"

    job["spec"]["suspend"] = False
    p, job = step(job, observe([], now=later(30)))
    assert names_of(p.create_pods) == DISAGG_PODS
    assert conditions(p.status)["Suspended"] == ("False", "Resumed")
    assert p.status["restarts"] == 0  # suspension is not a failure


def test_a_job_created_suspended_creates_no_pods():
    p = plan(make_job(suspend=True), observe())
    assert p.create_pods == [] and p.status["phase"] == "Suspended"


# ------------------------------------------------------------------------------ deadline and TTL


def test_active_deadline():
    job, pods = running(make_job(runPolicy={"activeDeadlineSeconds": 60}))
    p, job = step(job, observe(pods, now=later(45)))
    assert p.requeue_after == 15 and p.status["phase"] == "Running"
    p, job = step(job, observe(pods, now=later(60)))
    assert p.status["phase"] == "Failed"
    assert conditions(p.status)["Failed"] == ("True", "DeadlineExceeded")
    assert condition_message(p.status, "Failed") == "activeDeadlineSeconds (60) exceeded"
    assert p.delete_pods == ["job-trainer-0"]


def test_active_deadline_counts_from_the_last_resume():
    job, pods = running(make_job(runPolicy={"activeDeadlineSeconds": 60}))
    job["spec"]["suspend"] = True
    p, job = step(job, observe(pods, now=later(30)))
    p, job = step(job, observe([], now=later(1000)))
    assert p.status["phase"] == "Suspended" and p.requeue_after is None  # no deadline while suspended
    job["spec"]["suspend"] = False
    p, job = step(job, observe([], now=later(2000)))
    assert names_of(p.create_pods) == ["job-trainer-0"] and p.status["phase"] != "Failed"
    assert p.status["startTime"] == "2025-01-01T12:33:20Z" and p.requeue_after == 60
    pods = reported(p.create_pods)
    p, job = step(job, observe(pods, now=later(2059)))
    assert p.status["phase"] == "Running" and p.requeue_after == 1
    p, job = step(job, observe(pods, now=later(2060)))
    assert conditions(p.status)["Failed"] == ("True", "DeadlineExceeded")


@pytest.mark.parametrize("ttl, at, deleted, requeue", [(100, 50, False, 50), (100, 100, True, None),
                                                       (0, 0, True, None), (None, 10**6, False, None)])
def test_ttl_after_finished(ttl, at, deleted, requeue):
    job, pods = running(make_job(runPolicy={"ttlSecondsAfterFinished": ttl}))
    _, job = step(job, observe(replace(pods, "job-trainer-0", phase="Succeeded"), now=later(10)))
    p = plan(job, observe([], now=later(10 + at)))
    assert p.delete_job is deleted
    if requeue is not None:
        assert p.requeue_after == requeue
    elif not deleted:
        assert p.requeue_after is None


# ------------------------------------------------------------------------------------ invalid spec


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(roles={"trainer": {"gpus": -1}}), "spec.roles.trainer.gpus: Input should be greater than or equal to 0"),
        (dict(roles={"rollout": {"replicas": 2}}), "spec.roles.rollout.replicas: must be 0 when placement is colocated"),
        (dict(placement="hybrid"), "spec.placement: must be one of 'colocated' or 'disaggregated'"),
        (dict(runtime={"training": {"globalBatchSize": 48, "miniBatchSize": 32}}),
         "spec.runtime.training.miniBatchSize: must divide globalBatchSize (48), got 32"),
        (dict(roles={"trainer": {"gpu": 8}}), "spec.roles.trainer.gpu: unknown field"),
        # Caught here rather than as a pod the API server rejects (port 65536) at reconcile time.
        (dict(placement="disaggregated", roles={"rollout": {"gpus": 8}}, runtime={"logging": {"port": 65529}}),
         "spec.runtime.logging.port: must leave room for the rollout pods' engine ports"),
        # The name becomes pod hostnames, the Service's name and label values.
        (dict(name="grpo-qwen2-5-7b-instruct-gsm8k-lr1e-6-run3"), "metadata.name: must be a DNS-1035 label of at "
         "most 40 characters"),
        (dict(name="7b-run"), "metadata.name: must be a DNS-1035 label"),
    ],
)
def test_invalid_spec_is_a_condition_naming_the_field(kw, message):
    p = plan(make_job(**kw), observe())
    s = p.status
    assert conditions(s)["Valid"] == ("False", "InvalidSpec")
    assert message in condition_message(s, "Valid")
    assert conditions(s)["Failed"] == ("True", "InvalidSpec") and s["phase"] == "Failed"
    assert (p.children, p.create_pods) == ([], [])
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "InvalidSpec")]


def test_fixing_an_invalid_spec_starts_the_job():
    job = make_job(roles={"trainer": {"gpus": -1}})
    _, job = step(job, observe())
    job["spec"]["roles"]["trainer"]["gpus"] = 1
    p = plan(job, observe(now=later(10)))
    assert conditions(p.status)["Valid"] == ("True", "SpecValid")
    assert "Failed" not in conditions(p.status) and p.status["phase"] == "Pending"
    assert names_of(p.create_pods) == ["job-trainer-0"]


@pytest.mark.parametrize("clean, deleted", [("Running", sorted(DISAGG_PODS)), ("None", [])])
def test_a_running_job_edited_into_an_invalid_spec_fails_and_cleans_its_pods(clean, deleted):
    job, pods = running(make_job(runPolicy={"cleanPodPolicy": clean}, **DISAGG))
    job["spec"]["runtime"]["training"] = {"globalBatchSize": 48, "miniBatchSize": 32}  # only the operator rejects
    job["metadata"]["generation"] = 2
    p, job = step(job, observe(pods, now=later(10)))
    s = p.status
    assert s["phase"] == "Failed" and conditions(s)["Failed"] == ("True", "InvalidSpec")
    assert conditions(s)["Valid"] == ("False", "InvalidSpec")
    assert conditions(s)["PodsReady"] == ("False", "InvalidSpec") and conditions(s)["Running"][0] == "False"
    assert sorted(p.delete_pods) == deleted and p.create_pods == []

    job["spec"]["runtime"]["training"] = {"globalBatchSize": 64, "miniBatchSize": 32}  # fixed: starts over
    p, job = step(job, observe([], now=later(20)))
    assert "Failed" not in conditions(p.status) and names_of(p.create_pods) == DISAGG_PODS


@pytest.mark.parametrize("run_policy", [{"ttlSecondsAfterFinished": 100},
                                        {"ttlSecondsAfterFinished": 100, "backoffLimit": -1}])
def test_ttl_applies_to_a_job_that_failed_validation(run_policy):
    job = make_job(roles={"trainer": {"gpus": -1}}, runPolicy=run_policy)
    p, job = step(job, observe())
    expected_ttl = 100 if "backoffLimit" not in run_policy else None  # an invalid runPolicy: its defaults
    assert p.requeue_after == expected_ttl and not p.delete_job
    p = plan(job, observe(now=later(100)))
    assert p.delete_job is (expected_ttl is not None)


def test_a_job_managed_by_another_controller_is_left_alone():
    job = make_job(managedBy="kueue.x-k8s.io/multikueue", status={"phase": "Running"})
    p = plan(job, observe())
    assert (p.status, p.children, p.create_pods, p.delete_pods, p.events) == ({"phase": "Running"}, [], [], [], [])


# ------------------------------------------------------------------------------ gang scheduling


def pod_meta(p, name: str) -> dict:
    return next(x for x in p.create_pods if x["metadata"]["name"] == name)["metadata"]


def test_kueue_labels_with_a_new_group_per_attempt():
    job = make_job(runPolicy={"scheduling": {"queueName": "team-q"}}, **DISAGG)
    p = plan(job, observe())
    for pod in p.create_pods:
        meta = pod["metadata"]
        assert meta["labels"][labels.KUEUE_QUEUE] == "team-q"
        assert meta["labels"][labels.KUEUE_POD_GROUP] == "job-g0"
        assert meta["annotations"][labels.KUEUE_GROUP_TOTAL] == "3"
    assert {c["kind"] for c in p.children} == {"ConfigMap", "Service"}  # Kueue builds its own Workload

    job, pods = running(job)
    _, job = step(job, observe(replace(pods, "job-trainer-0", phase="Failed", exit_code=1), now=later(10)))
    p = plan(job, observe([], now=later(100)))
    assert {x["metadata"]["labels"][labels.KUEUE_POD_GROUP] for x in p.create_pods} == {"job-g1"}


@pytest.mark.parametrize(
    "scheduling, api_version, group_spec, scheduler, pod_marker",
    [
        ({"podGroup": "volcano", "queueName": "q", "priorityClassName": "high"}, "scheduling.volcano.sh/v1beta1",
         {"minMember": 3, "queue": "q", "priorityClassName": "high"}, "volcano",
         ("annotations", labels.VOLCANO_GROUP)),
        ({"podGroup": "scheduler-plugins"}, "scheduling.x-k8s.io/v1alpha1",
         {"minMember": 3, "scheduleTimeoutSeconds": 600}, "scheduler-plugins-scheduler",
         ("labels", labels.COSCHEDULING_GROUP)),
        ({"podGroup": "scheduler-plugins", "schedulerName": "my-sched"}, "scheduling.x-k8s.io/v1alpha1",
         {"minMember": 3, "scheduleTimeoutSeconds": 600}, "my-sched", ("labels", labels.COSCHEDULING_GROUP)),
    ],
)
def test_pod_groups(scheduling, api_version, group_spec, scheduler, pod_marker):
    p = plan(make_job(runPolicy={"scheduling": scheduling}, **DISAGG), observe())
    groups = [c for c in p.children if c["kind"] == "PodGroup"]
    assert len(groups) == 1
    assert groups[0]["apiVersion"] == api_version and groups[0]["spec"] == group_spec
    assert groups[0]["metadata"]["name"] == names.podgroup_name("job")
    assert groups[0]["metadata"]["ownerReferences"][0]["uid"] == UID
    for pod in p.create_pods:
        assert pod["spec"]["schedulerName"] == scheduler
        assert pod["metadata"][pod_marker[0]][pod_marker[1]] == "job"


def test_priority_class_and_no_scheduler_by_default():
    p = plan(make_job(runPolicy={"scheduling": {"priorityClassName": "rl-high"}}), observe())
    pod = p.create_pods[0]["spec"]
    assert pod["priorityClassName"] == "rl-high" and "schedulerName" not in pod
    assert not [c for c in p.children if c["kind"] == "PodGroup"]


def find(node, key):
    """Every value of `key` anywhere in a nested manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from find(v, key)


@pytest.mark.parametrize("native_gang, gang, workload", [(True, True, True), (True, False, False),
                                                         (False, True, False)])
def test_native_gang_scheduling_only_where_served_and_asked(native_gang, gang, workload):
    job = make_job(runPolicy={"scheduling": {"gang": gang}}, **DISAGG)
    p = plan(job, observe(native_gang=native_gang))
    workloads = [c for c in p.children if c["kind"] == "Workload"]
    assert bool(workloads) is workload
    plain = plan(job, observe(native_gang=False))
    if workload:
        assert workloads[0]["apiVersion"].startswith("scheduling.k8s.io/")
        assert set(find(workloads[0], "minCount")) == {3}  # all pods or none
        assert all(a["spec"] != b["spec"] for a, b in zip(p.create_pods, plain.create_pods))  # pods join it
    else:
        assert p.create_pods == plain.create_pods


def native_groups(p) -> tuple[list[str], list[str]]:
    """(native PodGroups ensured, native PodGroups to delete) of a plan."""
    kept = [c["metadata"]["name"] for c in p.children
            if c["kind"] == "PodGroup" and c["apiVersion"].startswith("scheduling.k8s.io/")]
    return kept, names_of(p.delete_children)


def test_podgroups_of_earlier_gang_attempts_are_deleted_once_their_pods_are_gone():
    job = make_job(**DISAGG)
    p, job = step(job, observe(native_gang=True))
    pods = reported(p.create_pods)
    p, job = step(job, observe(pods, native_gang=True))
    assert native_groups(p) == (["job-gang-0"], [])  # attempt 0: nothing earlier

    # Attempt 0 fails: the gang restarts, its pods (still there, then terminating) keep gang-0.
    failed = replace(pods, "job-trainer-1", phase="Failed", exit_code=137, reason="OOMKilled")
    p, job = step(job, observe(failed, now=later(100), native_gang=True))
    assert p.status["restarts"] == 1 and native_groups(p) == (["job-gang-0"], [])
    terminating = [make_pod("", base=x, phase=x["status"]["phase"], deleting=True) for x in failed]
    p, job = step(job, observe(terminating, now=later(101), native_gang=True))
    assert native_groups(p) == (["job-gang-1"], [])

    # Every pod of attempt 0 gone: gang-0 goes in the pass that creates attempt 1 (before its pods).
    p, job = step(job, observe([], now=later(200), native_gang=True))
    assert names_of(p.create_pods) == DISAGG_PODS
    assert native_groups(p) == (["job-gang-1"], ["job-gang-0"])
    stub = p.delete_children[0]
    assert (stub["apiVersion"], stub["kind"]) == ("scheduling.k8s.io/v1alpha2", "PodGroup")
    assert stub["metadata"]["ownerReferences"][0]["uid"] == UID
    assert stub["metadata"]["labels"][labels.JOB] == "job"
    pods = reported(p.create_pods)
    # Level-triggered: every later pass asks again (the effects layer deletes once per process).
    p, job = step(job, observe(pods, now=later(210), native_gang=True))
    assert job["status"]["phase"] == "Running"
    assert native_groups(p) == (["job-gang-1"], ["job-gang-0"])

    # Attempt 2, after a second failure: every earlier attempt, never the current one.
    failed = replace(pods, "job-rollout-0", phase="Failed", exit_code=1)
    p, job = step(job, observe(failed, now=later(300), native_gang=True))
    assert native_groups(p) == (["job-gang-1"], ["job-gang-0"])  # attempt 1's pods still there
    p, job = step(job, observe([], now=later(400), native_gang=True))
    assert job["status"]["restarts"] == 2
    assert native_groups(p) == (["job-gang-2"], ["job-gang-0", "job-gang-1"])


@pytest.mark.parametrize("native_gang, gang", [(False, True), (True, False)])
def test_no_native_podgroups_to_delete_without_native_gang_scheduling(native_gang, gang):
    job, pods = running(make_job(runPolicy={"scheduling": {"gang": gang}}, **DISAGG))
    _, job = step(job, observe(replace(pods, "job-trainer-0", phase="Failed", exit_code=1), now=later(10)))
    p = plan(job, observe([], now=later(100), native_gang=native_gang))
    assert job["status"]["restarts"] == 1 and p.create_pods
    assert p.delete_children == []
