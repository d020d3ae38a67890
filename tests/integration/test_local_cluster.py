"""The local control plane behaves like a GPU cluster: real scheduler, real garbage collector,
kwok-simulated nodes and pod lifecycles (including failures on demand)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kuberl_operator.devcluster.cluster import _pid_alive
from kuberl_operator.devcluster.nodes import (GPU_RESOURCE, KWOK_ANNOTATION, POD_EXIT_CODE,
                                              POD_FAIL, POD_SUCCEED)
from kuberl_operator.devcluster.pytest_plugin import needs_kwok, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _local_cluster_only(k8s_cluster):
    needs_kwok(k8s_cluster)

GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def make_pod(name: str, gpus: int = 0, tolerate_gpu: bool = False, annotations=None,
             owner=None) -> dict:
    resources = {"limits": {GPU_RESOURCE: str(gpus)}} if gpus else {}
    metadata = {"name": name, "annotations": annotations or {}}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "kuberl/fake:latest",
                            "resources": resources}],
            "tolerations": [GPU_TOLERATION] if tolerate_gpu else [],
        },
    }


def read_pod(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod:
    return core.read_namespaced_pod(name, namespace)


def phase_is(core, namespace, name, phase):
    def check():
        pod = read_pod(core, namespace, name)
        return pod if pod.status.phase == phase else None
    return check


def node_labels(core: client.CoreV1Api, node_name: str) -> dict:
    return core.read_node(node_name).metadata.labels


def test_nodes_look_like_gpu_feature_discovery_labels_them(kube_api):
    nodes = [n for n in client.CoreV1Api(kube_api).list_node().items
             if (n.metadata.annotations or {}).get(KWOK_ANNOTATION) == "fake"]
    gpu = [n for n in nodes if "nvidia.com/gpu.product" in n.metadata.labels]
    cpu = [n for n in nodes if n not in gpu]

    assert (len(gpu), len(cpu)) == (4, 1)
    for node in gpu:
        assert node.status.capacity[GPU_RESOURCE] == "8"
        assert node.status.allocatable[GPU_RESOURCE] == "8"
        assert {k: node.metadata.labels[k] for k in (
            "nvidia.com/gpu.product", "nvidia.com/gpu.memory", "nvidia.com/gpu.count")} == {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "8"}
        assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [
            (GPU_RESOURCE, "present", "NoSchedule")]
    assert GPU_RESOURCE not in cpu[0].status.capacity and not cpu[0].spec.taints
    assert all(c.status == "True" for n in nodes for c in n.status.conditions
               if c.type == "Ready")


def test_gpu_pod_is_scheduled_on_a_gpu_node_and_runs(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, make_pod("trainer", gpus=4, tolerate_gpu=True))

    pod = wait_for(phase_is(core, namespace, "trainer", "Running"), timeout=60,
                   what="pod trainer to be Running")

    labels = node_labels(core, pod.spec.node_name)
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert pod.status.container_statuses[0].state.running is not None


def test_pod_asking_for_more_gpus_than_a_node_has_stays_pending(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, make_pod("too-big", gpus=16, tolerate_gpu=True))

    def unschedulable():
        pod = read_pod(core, namespace, "too-big")
        return next((c for c in pod.status.conditions or []
                     if c.type == "PodScheduled" and c.status == "False"), None)

    condition = wait_for(unschedulable, timeout=60, what="PodScheduled=False on too-big")
    assert "Insufficient nvidia.com/gpu" in condition.message
    pod = read_pod(core, namespace, "too-big")
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_pod_without_the_gpu_toleration_lands_on_the_cpu_node(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    names = [f"cpu-{i}" for i in range(3)]
    for name in names:
        core.create_namespaced_pod(namespace, make_pod(name))

    for name in names:
        pod = wait_for(phase_is(core, namespace, name, "Running"), timeout=60,
                       what=f"pod {name} to be Running")
        assert "nvidia.com/gpu.product" not in node_labels(core, pod.spec.node_name)
        assert pod.spec.node_name.startswith("kwok-cpu-")


def test_deleting_an_owner_deletes_its_dependents(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="owner"), data={"k": "v"}))
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                 "uid": owner.metadata.uid}
    core.create_namespaced_pod(namespace, make_pod("dependent", owner=reference))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="dependent-config", owner_references=[reference])))
    wait_for(phase_is(core, namespace, "dependent", "Running"), timeout=60,
             what="pod dependent to be Running")

    core.delete_namespaced_config_map("owner", namespace)

    wait_for(lambda: not core.list_namespaced_pod(namespace).items
             and not core.list_namespaced_config_map(
                 namespace, field_selector="metadata.name=dependent-config").items,
             timeout=60, what="the garbage collector to delete the owner's dependents")


def test_fail_annotation_turns_a_running_pod_failed(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, make_pod("rollout", gpus=1, tolerate_gpu=True))
    wait_for(phase_is(core, namespace, "rollout", "Running"), timeout=60,
             what="pod rollout to be Running")

    core.patch_namespaced_pod("rollout", namespace, {"metadata": {"annotations": {
        POD_FAIL: "OOMKilled", POD_EXIT_CODE: "137"}}})

    pod = wait_for(phase_is(core, namespace, "rollout", "Failed"), timeout=60,
                   what="pod rollout to be Failed")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code) == ("OOMKilled", 137)


def test_succeed_annotation_turns_a_pod_succeeded(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, make_pod(
        "reward", annotations={POD_SUCCEED: "true"}))

    pod = wait_for(phase_is(core, namespace, "reward", "Succeeded"), timeout=60,
                   what="pod reward to be Succeeded")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code) == ("Completed", 0)


def test_a_deleted_pod_goes_away(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, make_pod("short-lived"))
    wait_for(phase_is(core, namespace, "short-lived", "Running"), timeout=60,
             what="pod short-lived to be Running")

    core.delete_namespaced_pod("short-lived", namespace)  # default grace period: kwok finishes it

    wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=60,
             what="the deleted pod to disappear")


def test_deleting_a_namespace_deletes_what_is_in_it(kube_api):
    core = client.CoreV1Api(kube_api)
    name = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        generate_name="kuberl-ns-delete-"))).metadata.name
    wait_for(lambda: core.list_namespaced_service_account(name).items, timeout=30,
             what="the default service account")
    worker = make_pod("worker")
    worker["spec"]["terminationGracePeriodSeconds"] = 0  # else the controller waits ~5 s more
    core.create_namespaced_pod(name, worker)
    core.create_namespaced_config_map(name, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="config"), data={"k": "v"}))
    wait_for(phase_is(core, name, "worker", "Running"), timeout=60, what="pod worker Running")

    core.delete_namespace(name)

    def gone():
        try:
            core.read_namespace(name)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=60, what=f"the namespace controller to finish deleting {name}")


def test_gang_of_pods_is_scheduled_all_or_nothing(kube_api, namespace):
    """Native gang scheduling (scheduling.k8s.io/v1alpha2 PodGroup, pod.spec.schedulingGroup)."""
    core = client.CoreV1Api(kube_api)
    groups = client.CustomObjectsApi(kube_api)

    def start_gang(group: str, size: int, gpus: int) -> list[str]:
        groups.create_namespaced_custom_object(
            "scheduling.k8s.io", "v1alpha2", namespace, "podgroups", {
                "apiVersion": "scheduling.k8s.io/v1alpha2", "kind": "PodGroup",
                "metadata": {"name": group},
                "spec": {"schedulingPolicy": {"gang": {"minCount": size}}}})
        names = [f"{group}-{i}" for i in range(size)]
        for name in names:
            pod = make_pod(name, gpus=gpus, tolerate_gpu=True)
            pod["spec"]["schedulingGroup"] = {"podGroupName": group}
            core.create_namespaced_pod(namespace, pod)
        return names

    # 5 x 8 GPUs cannot fit on 4 nodes: no member is bound, not even those a node could take.
    too_big = start_gang("too-big", size=5, gpus=8)

    def group_unschedulable():
        group = groups.get_namespaced_custom_object(
            "scheduling.k8s.io", "v1alpha2", namespace, "podgroups", "too-big")
        return next((c for c in group.get("status", {}).get("conditions", [])
                     if c["type"] == "PodGroupScheduled" and c["status"] == "False"), None)

    wait_for(group_unschedulable, timeout=60, what="PodGroup too-big to be unschedulable")
    messages = [next(c.message for c in read_pod(core, namespace, name).status.conditions
                     if c.type == "PodScheduled") for name in too_big]
    assert not any(read_pod(core, namespace, name).spec.node_name for name in too_big)
    assert any("waiting for minCount pods" in m for m in messages), messages

    fits = start_gang("fits", size=2, gpus=4)

    for name in fits:
        wait_for(phase_is(core, namespace, name, "Running"), timeout=60,
                 what=f"gang member {name} to be Running")


def test_kwok_leaves_pods_on_unmanaged_nodes_alone(kube_api, namespace):
    core = client.CoreV1Api(kube_api)
    node = f"runner-{namespace}"
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
        name=node, labels={"kuberl.io/test": "true"})))
    try:
        on_runner = make_pod("on-runner")
        on_runner["spec"]["nodeName"] = node
        on_kwok = make_pod("on-kwok")
        on_kwok["spec"]["nodeName"] = "kwok-cpu-0"
        core.create_namespaced_pod(namespace, on_runner)
        core.create_namespaced_pod(namespace, on_kwok)

        wait_for(phase_is(core, namespace, "on-kwok", "Running"), timeout=60,
                 what="the pod on the kwok node to be Running")

        pod = read_pod(core, namespace, "on-runner")
        assert pod.status.phase == "Pending" and not pod.status.container_statuses
        conditions = core.read_node(node).status.conditions or []
        assert not any(c.type == "Ready" and c.status == "True" for c in conditions)
    finally:
        core.delete_namespaced_pod("on-runner", namespace, grace_period_seconds=0)
        core.delete_node(node)


def test_dev_cluster_cli_runs_a_second_cluster_side_by_side_and_stops_it(k8s_cluster, kube_api,
                                                                          tmp_path):
    """`kuberl dev-cluster up|status|down` (detached processes) next to the session's cluster."""
    state_dir = tmp_path / "second"

    def cli(*args: str) -> subprocess.CompletedProcess:
        # Past `up`'s own 120 s deadline (plus start-up and PKI): killed before it, `up` could not
        # stop what it had started, and its detached processes would outlive the test.
        return subprocess.run(
            [sys.executable, "-m", "kuberl_operator.devcluster", *args,
             f"--state-dir={state_dir}"], capture_output=True, text=True, timeout=300,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))

    up = cli("up", "--gpu-pool=1xNVIDIA-H200:2", "--cpu-nodes=0")
    try:
        assert up.returncode == 0, up.stderr
        status = json.loads(cli("status").stdout)
        assert all(status["alive"].values()) and len(status["alive"]) == 5
        assert status["server"] != k8s_cluster.local.server
        with client.ApiClient(_config_for(state_dir / "kubeconfig")) as other:
            nodes = client.CoreV1Api(other).list_node().items
        assert [(n.metadata.name, n.metadata.labels["nvidia.com/gpu.product"],
                 n.status.capacity[GPU_RESOURCE]) for n in nodes] == [
            ("kwok-gpu-h200-0", "NVIDIA-H200", "2")]
        pids = [pid for pid, _ in json.loads((state_dir / "state.json").read_text())[
            "pids"].values()]
    finally:
        down = cli("down")

    assert down.returncode == 0 and "dev cluster stopped" in down.stdout, down.stderr
    assert not any(_pid_alive(pid) for pid in pids)
    assert cli("status").returncode == 1
    assert client.VersionApi(kube_api).get_code().git_version == "v1.36.3"  # first one still up


def test_cluster_processes_die_with_the_process_that_started_them(tmp_path):
    """A crashed test session (SIGKILL, no teardown) must not leave control-plane processes."""
    state_dir = tmp_path / "orphaned"
    script = (
        "import sys, time\n"
        "from kuberl_operator.devcluster.cluster import LocalCluster\n"
        "from kuberl_operator.devcluster.nodes import GPUPool\n"
        f"LocalCluster({str(state_dir)!r}, gpu_pools=(GPUPool(count=1),), cpu_nodes=0,\n"
        "             log=lambda _m: None).up()\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert parent.stdout.readline().strip() == "up"
        pids = [pid for pid, _ in json.loads(
            (state_dir / "state.json").read_text())["pids"].values()]
        assert all(_pid_alive(pid) for pid in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    wait_for(lambda: not any(_pid_alive(pid) for pid in pids), timeout=30,
             what="the orphaned control plane to die with its parent")


def test_a_session_stopped_with_sigterm_still_tears_its_fixtures_down(tmp_path):
    """`timeout`, a CI runner or `kill` stop pytest with SIGTERM: the plugin makes that a Ctrl-C, so
    fixtures that started processes of their own (the operator, the pod runner's pods) end them."""
    (tmp_path / "test_held.py").write_text(
        "import subprocess, time\n"
        "import pytest\n"
        "@pytest.fixture\n"
        "def child(tmp_path_factory):\n"
        "    proc = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        "    yield proc\n"
        "    proc.kill()\n"
        "    proc.wait()\n"
        "def test_held(child):\n"  # the pid file says: set up, the teardown is due
        f"    open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid))\n"
        "    time.sleep(600)\n")
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "-p", "kuberl_operator.devcluster.pytest_plugin", str(tmp_path / "test_held.py")],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), timeout=60,
                 what="the inner session's fixture to start its process")
        child = int((tmp_path / "pid").read_text())
        session.send_signal(signal.SIGTERM)
        out, _ = session.communicate(timeout=60)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    alive = _pid_alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, f"the fixture's process outlived the session:\n{out}"
    assert "KeyboardInterrupt" in out and session.returncode == 2, out


def _config_for(kubeconfig: Path) -> client.Configuration:
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return configuration
