"""The operator against a real control plane: one `kuberl operator` process for the module, a fresh
namespace per test, kwok's fake GPU nodes running (and failing, and finishing) the pods.

Every assertion is on what a user sees: the job's status, its pods, its Events, the operator's
/metrics. Waits poll with a deadline (wait_for); nothing sleeps a fixed time.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from operator_support import (FIELD_MANAGER, Cluster, ProgressServer, condition, documented_rbac_rules,
                              install_crd, rljob, service_account_kubeconfig, start_operator)

from kuberl_operator import labels, names
from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.devcluster.nodes import GPU_RESOURCE, GPUPool, build_gpu_node
from kuberl_operator.devcluster.pytest_plugin import wait_for
from kuberl_operator.planner import Observed, plan
from kuberl_runtime.contract import Progress

pytestmark = pytest.mark.integration
T = 60  # seconds any single wait may take


@pytest.fixture(scope="module")
def operator(k8s_cluster, tmp_path_factory):
    """The operator runs as a ServiceAccount holding exactly the RBAC docs/operator.md lists, so a
    verb missing from that table fails these tests with Forbidden."""
    tmp = tmp_path_factory.mktemp("operator")
    with config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)) as api_client:
        install_crd(api_client)
        kubeconfig = service_account_kubeconfig(api_client, k8s_cluster.kubeconfig, tmp / "kubeconfig",
                                                documented_rbac_rules())
    op = start_operator(k8s_cluster, tmp / "operator.log", kubeconfig=kubeconfig)
    yield op
    op.kill()
    log = op.log()
    assert "Traceback" not in log and "Forbidden" not in log, log[-6000:]


@pytest.fixture
def kube(operator, kube_api, namespace) -> Cluster:
    return Cluster(kube_api, namespace)


def ready_counts(status: dict) -> dict:
    return {role: (r.get("ready"), r.get("total")) for role, r in (status.get("roles") or {}).items()}


# ------------------------------------------------------------------------------------- 1. create
def test_create_makes_children_and_the_job_goes_running(kube):
    created = kube.create(rljob("grpo", trainer={"replicas": 2, "gpus": 4}))
    uid = created["metadata"]["uid"]

    # The first pass already writes a designed status.
    first = wait_for(lambda: kube.status("grpo").get("conditions"), timeout=T, what="a first status")
    assert condition({"conditions": first}, "Valid")["status"] == "True"

    pods = wait_for(kube.all_running("grpo", 2), timeout=T, what="2 running pods")
    status = wait_for(kube.phase_is("grpo", "Running"), timeout=T, what="phase Running")

    for pod in pods:
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.uid, owner.controller) == ("RLJob", "grpo", uid, True)
        assert pod.spec.containers[0].resources.limits[GPU_RESOURCE] == "4"
        node = kube.core.read_node(pod.spec.node_name)
        assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        # Native gang scheduling is on by default and the dev cluster serves it.
        assert pod.spec.scheduling_group.pod_group_name == names.native_podgroup_name("grpo", 0)
    assert [p.metadata.name for p in pods] == ["grpo-trainer-0", "grpo-trainer-1"]

    cm = kube.core.read_namespaced_config_map(names.configmap_name("grpo"), kube.ns)
    assert "config.yaml" in cm.data and cm.metadata.owner_references[0].uid == uid
    svc = kube.core.read_namespaced_service(names.service_name("grpo"), kube.ns)
    assert svc.spec.cluster_ip == "None" and svc.metadata.owner_references[0].uid == uid
    workload = kube.custom.get_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, "workloads", "grpo")
    assert workload["spec"]["podGroupTemplates"][0]["schedulingPolicy"]["gang"]["minCount"] == 2

    generation = kube.job("grpo")["metadata"]["generation"]
    assert status["observedGeneration"] == generation
    assert all(c["observedGeneration"] == generation for c in status["conditions"])
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Valid": "True", "Admitted": "True", "PodsReady": "True", "Running": "True"}
    assert ready_counts(status) == {"trainer": (2, 2)}
    assert status["restarts"] == 0 and status["startTime"]
    reasons = wait_for(lambda: "AllPodsRunning" in kube.event_reasons("grpo") and kube.event_reasons("grpo"),
                       timeout=T, what="the Running event")
    assert "CreatingPods" in reasons


def test_unschedulable_gang_binds_no_pod_and_says_why(kube):
    # 48 GPUs asked, 32 in the cluster: four of the six pods would fit, the gang must bind none.
    kube.create(rljob("big", placement="disaggregated", trainer={"replicas": 4, "gpus": 8},
                      roles={"rollout": {"replicas": 2, "gpus": 8}}))

    def unschedulable():
        c = condition(kube.status("big"), "PodsReady")
        return c if c and c["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in c["message"] else None

    cond = wait_for(unschedulable, timeout=T, what="PodsReady=False/Unschedulable with the scheduler's message")
    assert "nodes are available" in cond["message"]
    status = kube.status("big")
    assert status["phase"] == "Pending"
    assert condition(status, "Running")["reason"] == "Unschedulable"
    assert ready_counts(status) == {"trainer": (0, 4), "rollout": (0, 2)}
    pods = kube.pods("big")
    assert len(pods) == 6 and all(p.spec.node_name is None for p in pods)
    wait_for(lambda: "Unschedulable" in kube.event_reasons("big"), timeout=T, what="an Unschedulable event")


def test_invalid_spec_sets_valid_false_and_creates_nothing(kube, operator):
    # Passes the CRD schema; fails the batch-over-ranks check (512 sequences over 3 ranks).
    kube.create(rljob("bad", trainer={"replicas": 3, "gpus": 1}))
    kube.create(rljob("good"))

    def invalid():
        c = condition(kube.status("bad"), "Valid")
        return c if c and c["status"] == "False" else None

    cond = wait_for(invalid, timeout=T, what="Valid=False")
    assert cond["reason"] == "InvalidSpec" and "trainer ranks" in cond["message"]
    assert "miniBatchSize" in cond["message"]
    wait_for(kube.phase_is("good", "Running"), timeout=T, what="the valid job to run beside it")
    assert kube.pods("bad") == []
    assert operator.proc.poll() is None
    with pytest.raises(ApiException):
        kube.core.read_namespaced_config_map(names.configmap_name("bad"), kube.ns)


def test_checkpoints_on_an_empty_dir_get_one_warning_event(kube, operator):
    kube.create(rljob("ephemeral"))
    kube.create(rljob("kept", runtime={"model": {"path": "/models/m"}, "data": {"path": "/data/p.jsonl"},
                                       "checkpoint": {"volume": {"nfs": {"server": "nfs.example", "path": "/ckpt"}}}}))
    kube.wait_event("ephemeral", "CheckpointsNotPersistent")
    warning = next(e for e in kube.events("ephemeral") if e.reason == "CheckpointsNotPersistent")
    assert warning.type == "Warning" and "/checkpoints is an emptyDir" in warning.message
    assert condition(kube.status("ephemeral"), "Valid")["message"] == warning.message
    # The first pass posts it before CreatingPods: once that is there, the kept job had its chance.
    kube.wait_event("kept", "CreatingPods")
    wait_for(kube.phase_is("ephemeral", "Running"), timeout=T, what="Running")
    start = operator.reconciles()
    wait_for(lambda: operator.reconciles() >= start + 4, timeout=T, what="four more passes")
    assert kube.event_reasons("ephemeral").count("CheckpointsNotPersistent") == 1
    assert "CheckpointsNotPersistent" not in kube.event_reasons("kept")
    assert condition(kube.status("kept"), "Valid").get("message", "") == ""


@pytest.mark.parametrize("name", ["grpo-qwen2-5-7b-instruct-gsm8k-lr1e-6-run3", "7b-run"])
def test_a_name_pods_and_services_cannot_carry_is_rejected_at_admission(kube, name):
    # 41 characters, or not starting with a letter: as a Service name or pod hostname it would fail
    # every pass; the CRD's CEL rule turns it away at `kubectl apply`.
    with pytest.raises(ApiException) as err:
        kube.create(rljob(name))
    assert err.value.status == 422 and "metadata.name: must be a DNS-1035 label of at most 40" in err.value.body
    kube.create(rljob(name[-40:].lstrip("-0123456789")))


def retried_passes(operator) -> float:
    return operator.metrics().get(("kuberl_operator_reconciles_total", (("result", "retry"),)), 0.0)


def poke(kube, name: str) -> None:
    """Touch the job (an annotation): its watch event asks the operator for a pass now."""
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, kube.ns, PLURAL, name, {"metadata": {
        "annotations": {"kuberl-test/poke": datetime.now(timezone.utc).isoformat()}}}, field_manager=FIELD_MANAGER)


def failing_passes(kube, operator, name: str, count: int) -> None:
    """`count` more passes of the job that the API server turns away (retried with backoff)."""
    for _ in range(count):
        before = retried_passes(operator)
        poke(kube, name)
        wait_for(lambda: retried_passes(operator) > before, timeout=T, what="one more retried pass")


def failed_creates(kube, name: str) -> list:
    # creationTimestamp has one-second resolution: two Events of the same second are ordered by
    # resourceVersion (etcd's revision on this test cluster), not by their random names.
    return sorted((e for e in kube.events(name) if e.reason == "FailedCreate"),
                  key=lambda e: (e.metadata.creation_timestamp, int(e.metadata.resource_version)))


def test_a_pod_the_api_server_rejects_is_one_failed_create_event_per_refusal_and_retried(kube, operator):
    # A ResourceQuota of one pod: the second pod of the gang is forbidden at admission.
    kube.core.create_namespaced_resource_quota(kube.ns, {"metadata": {"name": "one-pod"},
                                                         "spec": {"hard": {"pods": "1"}}})
    wait_for(lambda: kube.core.read_namespaced_resource_quota("one-pod", kube.ns).status.hard, timeout=T,
             what="the quota controller to fill in the quota's status")
    kube.create(rljob("quota"))
    kube.wait_event("quota", "FailedCreate")
    warning = failed_creates(kube, "quota")[0]
    assert warning.type == "Warning" and "exceeded quota: one-pod" in warning.message
    assert warning.message.startswith("Pod quota-trainer-")
    # The status says why the job waits, and is the memory of what was posted.
    status = kube.status("quota")
    failure = condition(status, "ReplicaFailure")
    assert (failure["status"], failure["reason"], failure["message"]) == ("True", "FailedCreate", warning.message)
    assert status["phase"] == "Pending" and len(kube.pods("quota")) == 1

    # Retries refused the same way post nothing: still one Event (count 1), one CreatingPods.
    failing_passes(kube, operator, "quota", 3)
    assert [(e.message, e.count) for e in failed_creates(kube, "quota")] == [(warning.message, 1)]
    assert kube.event_reasons("quota").count("CreatingPods") == 1

    # Another refusal is news: a LimitRange (checked before the quota) allows no GPU per container.
    kube.core.create_namespaced_limit_range(kube.ns, {"metadata": {"name": "no-gpu"}, "spec": {
        "limits": [{"type": "Container", "max": {GPU_RESOURCE: "0"}}]}})

    def limit_range_said():
        poke(kube, "quota")
        return next((e for e in failed_creates(kube, "quota") if "maximum" in e.message), None)

    second = wait_for(limit_range_said, timeout=T, interval=1, what="a FailedCreate Event for the LimitRange")
    failing_passes(kube, operator, "quota", 3)
    assert [e.message for e in failed_creates(kube, "quota")] == [warning.message, second.message]
    assert condition(kube.status("quota"), "ReplicaFailure")["message"] == second.message

    # Both go: the retried pass creates the rest of the gang, and the condition clears. (The API
    # server's admission caches may still refuse once with the quota's message: an Event only if it
    # differs from the last one.)
    kube.core.delete_namespaced_resource_quota("one-pod", kube.ns)
    kube.core.delete_namespaced_limit_range("no-gpu", kube.ns)
    poke(kube, "quota")
    wait_for(kube.all_running("quota", 2), timeout=T, what="the whole gang once the quota is gone")
    wait_for(kube.phase_is("quota", "Running"), timeout=T, what="Running")
    wait_for(lambda: condition(kube.status("quota"), "ReplicaFailure") is None, timeout=T,
             what="ReplicaFailure cleared")
    said = [e.message for e in failed_creates(kube, "quota")]
    assert all(a != b for a, b in zip(said, said[1:])), said


# ----------------------------------------------------------------------------- 2. idempotence
def test_children_deleted_by_hand_come_back(kube):
    kube.create(rljob("heal"))
    wait_for(kube.phase_is("heal", "Running"), timeout=T, what="Running")
    cm_name, svc_name = names.configmap_name("heal"), names.service_name("heal")
    old_cm = kube.core.read_namespaced_config_map(cm_name, kube.ns).metadata.uid
    old_svc = kube.core.read_namespaced_service(svc_name, kube.ns).metadata.uid
    kube.core.delete_namespaced_config_map(cm_name, kube.ns)
    kube.core.delete_namespaced_service(svc_name, kube.ns)

    wait_for(lambda: kube.core.read_namespaced_config_map(cm_name, kube.ns).metadata.uid != old_cm,
             timeout=T, what="the ConfigMap recreated")
    wait_for(lambda: kube.core.read_namespaced_service(svc_name, kube.ns).metadata.uid != old_svc,
             timeout=T, what="the Service recreated")

    # A pod deleted by hand breaks the gang: it is recorded and the gang is recreated.
    victim = kube.live_pods("heal")[1]
    kube.core.delete_namespaced_pod(victim.metadata.name, kube.ns)
    status = wait_for(lambda: (s := kube.status("heal")).get("restarts") == 1 and s.get("phase") == "Running" and s,
                      timeout=T, what="a gang restart after the pod deletion")
    assert status["failure"]["reason"] == "PodDeleted" and status["failure"]["pod"] == victim.metadata.name
    pods = wait_for(kube.all_running("heal", 2), timeout=T, what="the gang back")
    assert victim.metadata.uid not in {p.metadata.uid for p in pods}
    assert {p.metadata.labels[labels.RESTART] for p in pods} == {"1"}


def test_status_is_written_only_when_it_changes_and_spec_never(kube, operator):
    kube.create(rljob("quiet"))
    wait_for(kube.phase_is("quiet", "Running"), timeout=T, what="Running")
    wait_for(lambda: condition(kube.status("quiet"), "PodsReady")["status"] == "True", timeout=T, what="ready")
    rv = kube.job("quiet")["metadata"]["resourceVersion"]
    # While Running, the job is reconciled every --progress-interval (1 s) to read its progress.
    start = operator.reconciles()
    wait_for(lambda: operator.reconciles() >= start + 4, timeout=T, what="four more passes")
    job = kube.job("quiet")
    assert job["metadata"]["resourceVersion"] == rv, "a pass with nothing new rewrote the job"
    assert job["metadata"]["generation"] == 1
    # Every write by anyone but the test went to the status subresource.
    for entry in job["metadata"]["managedFields"]:
        if entry["manager"] != FIELD_MANAGER:
            assert entry.get("subresource") == "status", entry


PULL_ERROR = ('failed to pull and unpack image "registry.example/kuberl:typo": failed to resolve reference '
              '"registry.example/kuberl:typo": registry.example/kuberl:typo: not found')


def test_an_image_pull_backing_off_writes_the_status_once_per_meaning(kube, operator):
    # A node no kwok manages (no kwok.x-k8s.io/node annotation): the test plays its kubelet, which
    # keeps a container between ErrImagePull and ImagePullBackOff with texts that differ each time.
    node = build_gpu_node(GPUPool(count=1), 90 + sum(map(ord, kube.ns)) % 900)
    del node["metadata"]["annotations"]["kwok.x-k8s.io/node"]
    node["metadata"]["labels"]["kuberl.io/test-node"] = kube.ns
    node_name = node["metadata"]["name"]
    kube.core.create_node(node)
    try:
        kube.create(rljob("pull", trainer={"nodeSelector": {"kuberl.io/test-node": kube.ns}}))
        pods = wait_for(lambda: (p := kube.pods("pull")) and len(p) == 2 and all(x.spec.node_name for x in p) and p,
                        timeout=T, what="the gang placed on the unmanaged node")
        assert {p.spec.node_name for p in pods} == {node_name}

        def kubelet_says(reason: str, message: str) -> None:
            kube.core.patch_namespaced_pod_status("pull-trainer-1", kube.ns, {"status": {"containerStatuses": [{
                "name": "runtime", "image": "registry.example/kuberl:typo", "imageID": "", "ready": False,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}})

        def pods_ready_message():
            c = condition(kube.status("pull"), "PodsReady")
            return c["message"] if c and c["reason"] == "ContainerWaiting" else None

        said = "pod pull-trainer-1, container runtime: ErrImagePull: " + PULL_ERROR
        kubelet_says("ErrImagePull", PULL_ERROR)
        assert wait_for(pods_ready_message, timeout=T, what="PodsReady=False/ContainerWaiting") == said
        rv = kube.job("pull")["metadata"]["resourceVersion"]

        # Retries and back-offs: other texts, the same meaning. Each patch is a pod event, so a pass.
        backoff = 'Back-off pulling image "registry.example/kuberl:typo"'
        for reason, message in [("ImagePullBackOff", f"{backoff}: ErrImagePull: {PULL_ERROR}"),
                                ("ErrImagePull", PULL_ERROR),
                                ("ImagePullBackOff", backoff),  # an older kubelet's back-off: no cause
                                ("ImagePullBackOff", f"{backoff}: ErrImagePull: {PULL_ERROR}")]:
            before = operator.reconciles()
            kubelet_says(reason, message)
            wait_for(lambda: operator.reconciles() > before, timeout=T, what=f"a pass after {reason}")
        # Then a new meaning: the registry refuses access now.
        denied = 'failed to pull and unpack image "registry.example/kuberl:typo": pull access denied'
        kubelet_says("ErrImagePull", denied)
        wait_for(lambda: pods_ready_message() == f"pod pull-trainer-1, container runtime: ErrImagePull: {denied}",
                 timeout=T, what="the new cause in PodsReady")

        # Every write to the job since `rv`, in order (a watch from `rv` replays them): passes of one
        # job run one after the other, so any write for the retries came before the last one.
        w = watch.Watch()
        written = []
        for ev in w.stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, kube.ns, PLURAL,
                           field_selector="metadata.name=pull", resource_version=rv, timeout_seconds=T):
            written.append(condition(ev["object"].get("status") or {}, "PodsReady")["message"])
            if denied in written[-1]:
                w.stop()
        assert written == [f"pod pull-trainer-1, container runtime: ErrImagePull: {denied}"]
        events = [e for e in kube.events("pull") if e.reason == "ContainerWaiting"]
        assert [e.message for e in events] == [said]  # one Event for the episode
    finally:
        try:
            kube.core.delete_node(node_name)
        except ApiException as e:
            if e.status != 404:
                raise


# --------------------------------------------------------------------------- 3. gang restarts
def test_oom_restarts_the_gang_and_records_the_failure(kube):
    # The phase is Restarting for the backoff: 5 s is a wide window for a 0.2 s poll on a loaded machine.
    kube.create(rljob("oom", run_policy={"backoffSeconds": 5}))
    before = wait_for(kube.all_running("oom", 2), timeout=T, what="the first gang")
    wait_for(kube.phase_is("oom", "Running"), timeout=T, what="Running")
    kube.fail_pod("oom-trainer-1", "OOMKilled", 137)

    restarting = wait_for(kube.phase_is("oom", "Restarting"), timeout=T, what="phase Restarting")
    assert restarting["restarts"] == 1
    assert condition(restarting, "Restarting")["reason"] == "GangRestarting"
    status = wait_for(kube.phase_is("oom", "Running"), timeout=T, what="Running again")
    f = status["failure"]
    assert (f["role"], f["pod"], f["exitCode"], f["reason"], f["retryable"]) == (
        "trainer", "oom-trainer-1", 137, "OOMKilled", True)
    assert f["node"] == before[1].spec.node_name and f["container"] == names.CONTAINER_NAME
    assert status["restarts"] == 1 and status["lastRestartTime"]
    after = wait_for(kube.all_running("oom", 2), timeout=T, what="the second gang")
    assert not {p.metadata.uid for p in before} & {p.metadata.uid for p in after}
    kube.wait_event("oom", "GangRestarting")
    # Native gang scheduling: attempt 0's PodGroup is deleted, attempt 1's is the one the pods use.
    current = names.native_podgroup_name("oom", 1)
    assert {p.spec.scheduling_group.pod_group_name for p in after} == {current}
    wait_for(lambda: kube.native_podgroups("oom") == [current], timeout=T, what="only the PodGroup of attempt 1")


def test_config_error_fails_at_once_and_stays_failed(kube, operator):
    kube.create(rljob("cfg"))
    wait_for(kube.phase_is("cfg", "Running"), timeout=T, what="Running")
    kube.fail_pod("cfg-trainer-0", "Error", 78)

    status = wait_for(kube.phase_is("cfg", "Failed"), timeout=T, what="Failed")
    assert status["restarts"] == 0
    failed = condition(status, "Failed")
    assert failed["reason"] == "NonRetryableFailure" and "exit code 78" in failed["message"]
    assert status["failure"]["retryable"] is False and status["completionTime"]
    # cleanPodPolicy Running (the default): the still-running pod goes, the failed one stays.
    wait_for(lambda: [p.metadata.name for p in kube.live_pods("cfg")] == ["cfg-trainer-0"], timeout=T,
             what="the running pod cleaned up")

    # Pods gone by hand: the job stays Failed and nothing is recreated on later passes.
    kube.core.delete_namespaced_pod("cfg-trainer-0", kube.ns)
    wait_for(lambda: kube.pods("cfg") == [], timeout=T, what="no pods")
    start = operator.reconciles()
    kube.custom.patch_namespaced_custom_object("kuberl.io", "v1alpha1", kube.ns, "rljobs", "cfg",
                                               {"metadata": {"annotations": {"poke": "1"}}})
    wait_for(lambda: operator.reconciles() >= start + 2, timeout=T, what="passes after the poke")
    assert kube.pods("cfg") == [] and kube.status("cfg")["phase"] == "Failed"


def test_backoff_limit_exhausted_fails_with_the_reason(kube):
    kube.create(rljob("limit", run_policy={"backoffLimit": 1, "cleanPodPolicy": "All"}))
    wait_for(kube.all_running("limit", 2), timeout=T, what="gang 0")
    wait_for(kube.phase_is("limit", "Running"), timeout=T, what="Running")
    kube.fail_pod("limit-trainer-0", "OOMKilled", 137)
    wait_for(lambda: kube.status("limit").get("restarts") == 1 and kube.status("limit")["phase"] == "Running",
             timeout=T, what="gang 1 running")
    pods = wait_for(kube.all_running("limit", 2), timeout=T, what="gang 1 pods")
    assert {p.metadata.labels[labels.RESTART] for p in pods} == {"1"}
    kube.fail_pod("limit-trainer-1", "Evicted", 1)

    status = wait_for(kube.phase_is("limit", "Failed"), timeout=T, what="Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit (1)" in failed["message"] and "Evicted" in failed["message"]
    assert status["restarts"] == 1
    wait_for(lambda: kube.pods("limit") == [], timeout=T, what="cleanPodPolicy All removing every pod")
    kube.wait_event("limit", "BackoffLimitExceeded")


# ------------------------------------------------------------------------------- 4. success
def test_success_cleans_pods_and_ttl_deletes_the_job(kube):
    kube.create(rljob("done", run_policy={"ttlSecondsAfterFinished": 3}))
    wait_for(kube.phase_is("done", "Running"), timeout=T, what="Running")
    kube.succeed_pod("done-trainer-0")

    status = wait_for(kube.phase_is("done", "Succeeded"), timeout=T, what="Succeeded")
    assert condition(status, "Succeeded")["reason"] == "TrainerSucceeded" and status["completionTime"]
    assert condition(status, "Running")["status"] == "False"
    # cleanPodPolicy Running: trainer-1 (still running) deleted, trainer-0 (Succeeded) kept.
    wait_for(lambda: [p.metadata.name for p in kube.live_pods("done")] == ["done-trainer-0"], timeout=T,
             what="the running pod cleaned up")
    kube.wait_event("done", "TrainerSucceeded")
    wait_for(lambda: not kube.exists("done"), timeout=T, what="ttlSecondsAfterFinished deleting the job")
    wait_for(lambda: kube.live_pods("done") == [], timeout=T, what="the garbage collector deleting the pods")


# ---------------------------------------------------------- 5. suspend, deadline, deletion
def test_suspend_deletes_pods_keeps_status_and_resume_recreates(kube):
    kube.create(rljob("susp"))
    first = wait_for(kube.all_running("susp", 2), timeout=T, what="running")
    wait_for(kube.phase_is("susp", "Running"), timeout=T, what="Running")
    kube.patch_spec("susp", {"suspend": True})

    status = wait_for(kube.phase_is("susp", "Suspended"), timeout=T, what="Suspended")
    wait_for(lambda: kube.pods("susp") == [], timeout=T, what="pods deleted")
    assert condition(status, "Admitted")["status"] == "False"
    assert status["startTime"] and status["restarts"] == 0
    assert status["observedGeneration"] == kube.job("susp")["metadata"]["generation"]
    kube.wait_event("susp", "Suspended")

    kube.patch_spec("susp", {"suspend": False})
    status = wait_for(kube.phase_is("susp", "Running"), timeout=T, what="Running after resume")
    resumed = condition(status, "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "Resumed")
    second = wait_for(kube.all_running("susp", 2), timeout=T, what="the gang recreated")
    assert not {p.metadata.uid for p in first} & {p.metadata.uid for p in second}
    assert status["restarts"] == 0


def test_active_deadline_fails_a_job_that_runs_too_long(kube):
    kube.create(rljob("slow", run_policy={"activeDeadlineSeconds": 3}))
    wait_for(kube.phase_is("slow", "Running"), timeout=T, what="Running")
    status = wait_for(kube.phase_is("slow", "Failed"), timeout=T, what="Failed by the deadline")
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: kube.live_pods("slow") == [], timeout=T, what="pods deleted")
    kube.wait_event("slow", "DeadlineExceeded")


def test_a_pod_left_by_a_previous_job_of_the_same_name_is_not_adopted(kube):
    # `kubectl delete rlj reuse && kubectl apply -f reuse.yaml` can be faster than the garbage
    # collector: the new job sees the old job's pod, same name, labels and spec hash. Played here
    # by a pod built for "reuse" whose controller is another RLJob (so the collector keeps it).
    other = kube.create(rljob("other", suspend=True))
    wait_for(kube.phase_is("other", "Suspended"), timeout=T, what="the owner RLJob settled")
    job = {**rljob("reuse"), "metadata": {"name": "reuse", "namespace": kube.ns, "uid": other["metadata"]["uid"]}}
    leftover = plan(job, Observed(pods=[], now=datetime.now(timezone.utc), native_gang=True)).create_pods[0]
    leftover["metadata"]["ownerReferences"][0]["name"] = "other"
    kube.core.create_namespaced_pod(kube.ns, leftover)

    uid = kube.create(rljob("reuse"))["metadata"]["uid"]
    status = wait_for(lambda: condition(kube.status("reuse"), "Running"), timeout=T, what="a first status")
    # The first pass decided to wait (an adopting one would have said CreatingPods, creating trainer-1).
    assert (status["status"], status["reason"]) == ("False", "WaitingForPods")
    assert kube.status("reuse")["phase"] == "Pending" and "CreatingPods" not in kube.event_reasons("reuse")
    assert [p.metadata.name for p in kube.pods("reuse")] == ["reuse-trainer-0"]  # only the leftover
    # Its controller is a live object (here, not an earlier "reuse" the collector is about to reach):
    # the job says what holds the name.
    conflict = wait_for(lambda: condition(kube.status("reuse"), "ReplicaFailure"), timeout=T, what="ReplicaFailure")
    assert (conflict["reason"], conflict["message"]) == ("ChildConflict", (
        f"Pod reuse-trainer-0 exists and is controlled by RLJob other (uid {other['metadata']['uid']}), "
        "not by this RLJob: the job waits until it is deleted"))

    # Its pod event names "other" as controller; the kuberl.io/job label brings "reuse" a pass too.

    kube.core.delete_namespaced_pod("reuse-trainer-0", kube.ns)
    pods = wait_for(kube.all_running("reuse", 2), timeout=T, what="the new job's own gang")
    assert all(p.metadata.owner_references[0].uid == uid for p in pods)
    status = wait_for(kube.phase_is("reuse", "Running"), timeout=T, what="Running")
    assert status["restarts"] == 0 and "failure" not in status
    wait_for(lambda: condition(kube.status("reuse"), "ReplicaFailure") is None, timeout=T, what="the conflict cleared")


def test_a_podgroup_left_by_a_previous_job_of_the_same_name_is_not_taken_for_the_jobs(kube):
    # Same race for the gang objects: the old job's Workload and PodGroup (same names, same spec)
    # are still there when the new job ensures its own, then the garbage collector deletes them.
    # Nothing watches those kinds: a job that took them for its own created its pods for a PodGroup
    # that no longer exists, and they were never scheduled. Played by objects built for "regang"
    # whose owner is another RLJob, plus one leftover pod that keeps the names busy.
    other = kube.create(rljob("other", suspend=True))
    wait_for(kube.phase_is("other", "Suspended"), timeout=T, what="the owner RLJob settled")
    job = {**rljob("regang"), "metadata": {"name": "regang", "namespace": kube.ns, "uid": other["metadata"]["uid"]}}
    old = plan(job, Observed(pods=[], now=datetime.now(timezone.utc), native_gang=True))
    leftovers = [c for c in old.children if c["kind"] in ("Workload", "PodGroup")] + old.create_pods[:1]
    assert [c["kind"] for c in leftovers] == ["Workload", "PodGroup", "Pod"]
    for obj in leftovers:
        obj["metadata"]["ownerReferences"][0]["name"] = "other"
        if obj["kind"] == "Pod":  # not in the PodGroup, which can then go before it (no protection)
            obj["spec"].pop("schedulingGroup", None)
            kube.core.create_namespaced_pod(kube.ns, obj)
        else:
            kube.custom.create_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns,
                                                        obj["kind"].lower() + "s", obj)

    uid = kube.create(rljob("regang"))["metadata"]["uid"]
    wait_for(lambda: condition(kube.status("regang"), "Running"), timeout=T, what="a first status")
    # The collector's part: the gang objects go, then the pod.
    group_name = names.native_podgroup_name("regang", 0)
    for obj in leftovers[:2]:
        kube.custom.delete_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns,
                                                    obj["kind"].lower() + "s", obj["metadata"]["name"])
    wait_for(lambda: not any(g["metadata"]["ownerReferences"][0]["uid"] != uid for g in kube.custom.list_namespaced_custom_object(
        "scheduling.k8s.io", "v1alpha2", kube.ns, "podgroups")["items"]), timeout=T, what="the old PodGroup gone")
    kube.core.delete_namespaced_pod(leftovers[2]["metadata"]["name"], kube.ns)
    pods = wait_for(kube.all_running("regang", 2), timeout=T, what="the new job's gang scheduled and running")
    assert all(p.metadata.owner_references[0].uid == uid for p in pods)
    group = kube.custom.get_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, "podgroups",
                                                     group_name)
    assert group["metadata"]["ownerReferences"][0]["uid"] == uid


def job_children(kube, job: str) -> dict[tuple[str, str], dict]:
    """Every child of `job` by (kind, name): its uid and ownerReferences, as plain dicts."""
    sel = labels.job_selector(job)
    out = {}
    for kind, items in (("Pod", kube.core.list_namespaced_pod(kube.ns, label_selector=sel).items),
                        ("ConfigMap", kube.core.list_namespaced_config_map(kube.ns, label_selector=sel).items),
                        ("Service", kube.core.list_namespaced_service(kube.ns, label_selector=sel).items)):
        for o in items:
            refs = [{"kind": r.kind, "name": r.name, "uid": r.uid, "controller": r.controller}
                    for r in o.metadata.owner_references or []]
            out[(kind, o.metadata.name)] = {"uid": o.metadata.uid, "ownerReferences": refs}
    for kind, plural in (("Workload", "workloads"), ("PodGroup", "podgroups")):
        for o in kube.custom.list_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, plural,
                                                           label_selector=sel)["items"]:
            refs = [{k: r.get(k) for k in ("kind", "name", "uid", "controller")}
                    for r in o["metadata"].get("ownerReferences") or []]
            out[(kind, o["metadata"]["name"])] = {"uid": o["metadata"]["uid"], "ownerReferences": refs}
    return out


def test_children_orphaned_by_a_deleted_job_are_adopted_by_the_next_job_of_that_name(kube):
    # `kubectl delete rlj adopt --cascade=orphan` then a new `adopt`: Kubernetes' controllers adopt
    # orphans their selector matches (ControllerRef); so does the job, and its deletion then takes them.
    kube.create(rljob("adopt"))
    wait_for(kube.all_running("adopt", 2), timeout=T, what="the first job's gang")
    wait_for(kube.phase_is("adopt", "Running"), timeout=T, what="Running")
    kinds = ["ConfigMap", "Pod", "Pod", "PodGroup", "Service", "Workload"]
    wait_for(lambda: sorted(k for k, _ in job_children(kube, "adopt")) == kinds, timeout=T, what="every child")
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, kube.ns, PLURAL, "adopt",
                                                body={"propagationPolicy": "Orphan"})
    wait_for(lambda: not kube.exists("adopt"), timeout=T, what="the job gone, its children orphaned")
    orphans = job_children(kube, "adopt")
    assert sorted(k for k, _ in orphans) == kinds
    assert all(c["ownerReferences"] == [] for c in orphans.values()), orphans

    uid = kube.create(rljob("adopt"))["metadata"]["uid"]

    def adopted():
        children = job_children(kube, "adopt")
        return children if all([(r["uid"], r["controller"]) for r in c["ownerReferences"]] == [(uid, True)]
                               for c in children.values()) else None

    children = wait_for(adopted, timeout=T, what="every orphan controlled by the new job")
    # Adopted, not replaced: the same objects, the gang running on as attempt 0.
    assert {k: c["uid"] for k, c in children.items()} == {k: c["uid"] for k, c in orphans.items()}
    status = wait_for(kube.phase_is("adopt", "Running"), timeout=T, what="the new job Running")
    assert status["restarts"] == 0 and condition(status, "ReplicaFailure") is None
    new_events = [e.reason for e in kube.events("adopt") if e.involved_object.uid == uid]
    assert "AllPodsRunning" in new_events and "CreatingPods" not in new_events

    # The garbage collector now deletes them with the job.
    kube.delete("adopt")
    wait_for(lambda: job_children(kube, "adopt") == {}, timeout=T, what="every child garbage-collected")


def test_a_gang_object_another_controller_holds_is_said_on_the_job(kube, operator):
    # A Workload named like the job whose controller is something else (a ConfigMap here) never
    # goes by itself: the job must say why it does not start, once, and start once it is gone.
    holder = kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "holder"}})
    workload = {"apiVersion": "scheduling.k8s.io/v1alpha2", "kind": "Workload",
                "metadata": {"name": "held", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "ConfigMap", "name": "holder", "uid": holder.metadata.uid,
                    "controller": True}]},
                "spec": {"podGroupTemplates": [{"name": "gang", "schedulingPolicy": {"gang": {"minCount": 1}}}]}}
    kube.custom.create_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, "workloads", workload)
    kube.create(rljob("held"))

    def said():
        c = condition(kube.status("held"), "ReplicaFailure")
        return c if c and c["reason"] == "ChildConflict" else None

    cond = wait_for(said, timeout=T, what="ReplicaFailure=True/ChildConflict")
    assert cond["status"] == "True"
    assert cond["message"] == (f"Workload held exists and is controlled by ConfigMap holder (uid {holder.metadata.uid}), "
                               "not by this RLJob: the job waits until it is deleted")
    assert kube.status("held")["phase"] == "Pending" and kube.pods("held") == []
    failing_passes(kube, operator, "held", 2)  # retried, the same conflict: no new Event
    events = [e for e in kube.events("held") if e.reason == "ChildConflict"]
    assert [(e.type, e.message, e.count) for e in events] == [("Warning", cond["message"], 1)]
    assert kube.pods("held") == []

    kube.custom.delete_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, "workloads", "held")
    poke(kube, "held")
    wait_for(kube.all_running("held", 2), timeout=T, what="the gang once the Workload is gone")
    wait_for(lambda: condition(kube.status("held"), "ReplicaFailure") is None, timeout=T, what="the conflict cleared")
    mine = kube.custom.get_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, "workloads", "held")
    assert mine["metadata"]["ownerReferences"][0]["uid"] == kube.job("held")["metadata"]["uid"]


def test_deleting_the_job_cascades(kube):
    kube.create(rljob("gone"))
    wait_for(kube.all_running("gone", 2), timeout=T, what="running")
    kube.delete("gone")
    wait_for(lambda: kube.pods("gone") == [], timeout=T, what="pods garbage-collected")

    def children_gone():
        sel = labels.job_selector("gone")
        return not (kube.core.list_namespaced_config_map(kube.ns, label_selector=sel).items
                    or kube.core.list_namespaced_service(kube.ns, label_selector=sel).items)

    wait_for(children_gone, timeout=T, what="ConfigMap and Service garbage-collected")


# ------------------------------------------------------------------------- 6. spec changes
def test_spec_changes_restart_the_gang_run_policy_applies_in_place(kube):
    kube.create(rljob("edit"))
    first = wait_for(kube.all_running("edit", 2), timeout=T, what="running")
    wait_for(kube.phase_is("edit", "Running"), timeout=T, what="Running")

    kube.patch_spec("edit", {"runPolicy": {"backoffLimit": 7}})
    status = wait_for(lambda: (s := kube.status("edit")).get("observedGeneration") == 2 and s,
                      timeout=T, what="generation 2 observed")
    assert status["phase"] == "Running"
    assert {p.metadata.uid for p in kube.live_pods("edit")} == {p.metadata.uid for p in first}

    kube.patch_spec("edit", {"roles": {"trainer": {"replicas": 2, "gpus": 2}}})
    second = wait_for(lambda: (pods := kube.all_running("edit", 2)()) and all(
        p.spec.containers[0].resources.limits[GPU_RESOURCE] == "2" for p in pods) and pods,
        timeout=T, what="the gang recreated with 2 GPUs per pod")
    assert not {p.metadata.uid for p in first} & {p.metadata.uid for p in second}
    status = wait_for(kube.phase_is("edit", "Running"), timeout=T, what="Running with the new spec")
    assert status["observedGeneration"] == 3 and status["restarts"] == 0

    # A new gang size: the attempt's PodGroup (immutable) is replaced with minCount 4. Its
    # podgroup-protection finalizer keeps the old one until no pod uses it; a slow kubelet (here:
    # a finalizer of the test's on one old pod) makes that wait visible.
    old = kube.live_pods("edit")
    kube.core.patch_namespaced_pod(old[0].metadata.name, kube.ns, {"metadata": {"finalizers": ["kuberl.io/test-hold"]}})
    kube.patch_spec("edit", {"roles": {"trainer": {"replicas": 4, "gpus": 2}}})
    wait_for(lambda: kube.live_pods("edit") == [], timeout=T, what="the old pods terminating")
    group_name = names.native_podgroup_name("edit", 0)
    wait_for(lambda: kube.custom.get_namespaced_custom_object(
        "scheduling.k8s.io", "v1alpha2", kube.ns, "podgroups", group_name)["metadata"].get("deletionTimestamp"),
        timeout=T, what="the stale PodGroup held by the old pod")
    kube.core.patch_namespaced_pod(old[0].metadata.name, kube.ns, {"metadata": {"finalizers": None}})
    wait_for(kube.all_running("edit", 4), timeout=T, what="the gang of 4 running")
    group = kube.custom.get_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", kube.ns, "podgroups", group_name)
    assert group["spec"]["schedulingPolicy"]["gang"]["minCount"] == 4 and not group["metadata"].get("deletionTimestamp")


def test_a_lost_node_restarts_the_gang(kube):
    # A node of its own (kwok runs it), so the shared nodes of the session stay as they are.
    node = build_gpu_node(GPUPool(count=1), 90 + sum(map(ord, kube.ns)) % 900)
    node["metadata"]["labels"]["kuberl.io/test-node"] = kube.ns
    name = node["metadata"]["name"]
    kube.core.create_node(node)
    try:
        kube.create(rljob("lost", trainer={"nodeSelector": {"kuberl.io/test-node": kube.ns}}))
        pods = wait_for(kube.all_running("lost", 2), timeout=T, what="the gang on the extra node")
        assert {p.spec.node_name for p in pods} == {name}
        wait_for(kube.phase_is("lost", "Running"), timeout=T, what="Running")
        kube.core.delete_node(name)

        status = wait_for(lambda: (s := kube.status("lost")).get("restarts") == 1 and s, timeout=T,
                          what="a gang restart after the node vanished")
        assert status["failure"]["reason"] == "NodeLost" and status["failure"]["node"] == name
        assert status["phase"] == "Restarting"  # the new gang has no node to go to
        kube.wait_event("lost", "GangRestarting")
    finally:
        try:
            kube.core.delete_node(name)
        except ApiException as e:
            if e.status != 404:
                raise


# ---------------------------------------------------------------------------- 7. progress
def test_progress_endpoint_is_mirrored_into_status(kube):
    doc = Progress(state="running", step=7, total_steps=100, reward_mean=0.625, kl=0.0123,
                   tokens_per_second=1500.0, weights_version=7, last_checkpoint_step=5, resumed_from_step=0)
    with ProgressServer(doc) as server:
        # The operator under test reads http://127.0.0.1:{port}/progress; port = spec.runtime.logging.port.
        kube.create(rljob("prog", runtime={"model": {"path": "/models/m"}, "data": {"path": "/data/p.jsonl"},
                                           "logging": {"port": server.port}}))
        progress = wait_for(lambda: (kube.status("prog").get("progress") or {}).get("step") == 7
                            and kube.status("prog")["progress"], timeout=T, what="status.progress")
        assert progress["totalSteps"] == 100 and progress["rewardMean"] == "0.625"
        assert progress["kl"] == "0.0123" and progress["tokensPerSecond"] == "1500"
        assert progress["weightsVersion"] == 7 and progress["lastCheckpointStep"] == 5
        assert progress["updatedAt"]

        # Reads that bring nothing new write nothing, updatedAt included: the job keeps its
        # resourceVersion. Passes of one job never overlap, so read n+1 means pass n is done.
        wait_for(lambda: condition(kube.status("prog"), "PodsReady")["status"] == "True", timeout=T, what="ready")
        rv = kube.job("prog")["metadata"]["resourceVersion"]
        reads = server.reads
        wait_for(lambda: server.reads >= reads + 4, timeout=T, what="four more progress reads (1 s apart)")
        job = kube.job("prog")
        assert job["metadata"]["resourceVersion"] == rv, "a progress read with nothing new rewrote the status"
        assert job["status"]["progress"] == progress

        # A new step moves it (the reads above were >= 1 s apart: a later second).
        server.progress = doc.model_copy(update={"step": 8, "reward_mean": 0.75})
        wait_for(lambda: kube.status("prog")["progress"]["step"] == 8, timeout=T, what="step 8 mirrored")
        moved = kube.status("prog")["progress"]
        assert moved["rewardMean"] == "0.75"
        assert moved["updatedAt"] > progress["updatedAt"]


# ----------------------------------------------------------------------------- 8. metrics
def test_the_documented_rbac_table_parses_into_the_rules_the_operator_runs_with():
    rules = {(r["apiGroups"][0], res): set(r["verbs"]) for r in documented_rbac_rules() for res in r["resources"]}
    assert rules[("", "pods")] == {"list", "watch", "create", "delete", "patch"}
    assert rules[("kuberl.io", "rljobs/status")] == {"update"}
    assert rules[("scheduling.k8s.io", "podgroups")] == {"get", "create", "delete", "patch"}


def test_owner_references_that_block_deletion_need_the_documented_finalizers_rule(k8s_cluster, kube, tmp_path):
    """The dev cluster enforces OwnerReferencesPermissionEnforcement (as OpenShift does): a child whose
    owner reference sets blockOwnerDeletion, as the operator's children do, is refused to a client
    without `update` on rljobs/finalizers, and accepted with the documented rules."""
    job = kube.create(rljob("fin"))
    ref = {"apiVersion": "kuberl.io/v1alpha1", "kind": "RLJob", "name": "fin", "uid": job["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    documented = documented_rbac_rules()
    without = [r for r in documented if r["resources"] != ["rljobs/finalizers"]]
    assert len(without) == len(documented) - 1
    for name, rules, allowed in (("kuberl-no-finalizers", without, False), ("kuberl-documented", documented, True)):
        with config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig)) as admin:
            kc = service_account_kubeconfig(admin, k8s_cluster.kubeconfig, tmp_path / name, rules, name=name)
        with config.new_client_from_config(config_file=str(kc)) as api:
            cm = {"metadata": {"name": name, "ownerReferences": [ref]}, "data": {}}

            def attempt():
                try:
                    client.CoreV1Api(api).create_namespaced_config_map(kube.ns, cm)
                    return "created"
                except ApiException as e:
                    if e.status == 403 and "blockOwnerDeletion" in e.body:
                        return "refused for blockOwnerDeletion"
                    assert e.status == 403, e.body
                    return None  # the new binding not yet seen by the authorizer: try again

            outcome = wait_for(attempt, timeout=T, what=f"{name}: a create the authorizer has decided")
        assert outcome == ("created" if allowed else "refused for blockOwnerDeletion"), name


def test_metrics_and_liveness(kube, operator):
    kube.create(rljob("met"))
    wait_for(kube.phase_is("met", "Running"), timeout=T, what="Running")
    assert operator.healthy()
    m = wait_for(lambda: (m := operator.metrics()).get(("kuberl_operator_jobs", (("phase", "Running"),)), 0) >= 1
                 and m, timeout=T, what="jobs{phase=Running} >= 1")
    assert m[("kuberl_operator_reconciles_total", (("result", "ok"),))] > 0
    assert m[("kuberl_operator_reconcile_duration_seconds_count", ())] > 0
    assert m[("kuberl_operator_pods_created_total", ())] >= 2
    assert ("kuberl_operator_reconcile_errors_total", ()) in m
    assert ("kuberl_operator_gang_restarts_total", ()) in m
    assert {labels_[0][1] for (name, labels_) in m if name == "kuberl_operator_jobs"} >= {
        "Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"}
