"""The committed CRD in a real kube-apiserver: it installs, the examples pass server-side
validation, bad specs fail with the CEL/schema messages, defaults apply, `kubectl explain` shows the
descriptions and `kubectl get` the printer columns.

Uses the session's local control plane (`k8s_cluster`); no operator runs here, so nothing but the
API server touches the RLJobs.
"""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.crd import CRD_FILE
from kuberl_operator.devcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def kubectl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["kubectl", *args], env=cluster.env(), capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def crd_installed(k8s_cluster):
    """The committed crds/ file, applied the way a user applies it."""
    kubectl(k8s_cluster, "apply", "--server-side", "--force-conflicts", "--field-manager=kuberl-crd-test",
            "-f", CRD_FILE)
    established = "{.status.conditions[?(@.type=='Established')].status}"
    wait_for(lambda: kubectl(k8s_cluster, "get", f"crd/{PLURAL}.{GROUP}", "-o", f"jsonpath={established}",
                             check=False).stdout == "True", timeout=30, what="the RLJob CRD to be established")
    # Discovery of the new type can lag a moment behind Established.
    wait_for(lambda: kubectl(k8s_cluster, "get", PLURAL, "-A", check=False).returncode == 0,
             timeout=30, what="rljobs to be served")
    return k8s_cluster


@pytest.fixture
def rljobs(kube_api, crd_installed):
    return client.CustomObjectsApi(kube_api)


def minimal(name: str = "job", **spec) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RLJob", "metadata": {"name": name},
        "spec": {"runtime": {"model": {"path": "/models/m"}, "data": {"path": "/data/p.jsonl"}}, **spec},
    }


def create(rljobs, namespace, body, dry_run=True):
    return rljobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body,
                                                  dry_run="All" if dry_run else None, field_validation="Strict")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_accepted(rljobs, namespace, path):
    for doc in yaml.safe_load_all(path.read_text()):
        created = create(rljobs, namespace, doc)
        assert contains(created["spec"], doc["spec"])  # nothing pruned; only defaults added


def contains(big, small) -> bool:
    """Every value of `small` is in `big` at the same place (dicts compared key by key)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(big) == len(small) and all(map(contains, big, small))
    return big == small


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"roles": {"rollout": {"replicas": 2}}},
         "spec.roles.rollout.replicas: Invalid value: must be 0 when placement is colocated"),
        ({"placement": "disaggregated"},
         "spec.roles.rollout.replicas: Invalid value: must be at least 1 when placement is disaggregated"),
        ({"roles": {"critic": {"replicas": 1}}},
         "spec.roles.critic: Invalid value: needs runtime.algorithm.name ppo (only PPO trains a critic)"),
        ({"roles": {"trainer": {"gpus": 6, "tensorParallelSize": 4}}},
         "spec.roles.trainer.gpus: Invalid value: must be divisible by tensorParallelSize"),
        ({"placement": "hybrid"}, 'spec.placement: Unsupported value: "hybrid": supported values: "colocated", '
                                  '"disaggregated"'),
        ({"roles": {"trainer": {"replicas": -1}}}, "spec.roles.trainer.replicas: Invalid value: -1"),
        ({"roles": {"trainer": {"replica": 2}}}, "unknown field \"spec.roles.trainer.replica\""),
        ({"runtime": {"model": {"path": "/m"}, "data": {"path": "/d"}, "logging": {"port": 29500}}},
         "spec.runtime.logging.port: Invalid value: must not be 29500: trainer rank 0 serves the rendezvous store"),
    ],
)
def test_bad_specs_are_rejected_with_the_rule_message(rljobs, namespace, spec, message):
    body = minimal(**spec)
    with pytest.raises(ApiException) as e:
        create(rljobs, namespace, body)
    assert e.value.status in (400, 422)
    assert message in json.loads(e.value.body)["message"], e.value.body


def disaggregated_on_port(port: int, name: str = "job") -> dict:
    """A job whose rollout pods run 8 one-GPU engines on port .. port + 7."""
    body = minimal(name, placement="disaggregated", roles={"rollout": {"replicas": 2, "gpus": 8}})
    body["spec"]["runtime"]["logging"] = {"port": port}
    return body


def test_engine_ports_past_65535_are_rejected_at_the_boundary(rljobs, namespace):
    create(rljobs, namespace, disaggregated_on_port(65528))  # the last engine on 65535
    with pytest.raises(ApiException) as e:
        create(rljobs, namespace, disaggregated_on_port(65529))
    message = json.loads(e.value.body)["message"]
    assert ("spec.runtime.logging.port: Invalid value: must leave room for the rollout pods' engine ports: engine "
            "replica i of a rollout pod serves on port + i, which must be at most 65535") in message, message


def test_children_of_the_largest_valid_port_are_accepted(kube_api, rljobs, namespace):
    """What the CRD accepts at the boundary builds pods and a Service the API server takes (dry run)."""
    from kuberl_operator.api import parse_spec
    from kuberl_operator.builders import JobRef, build_pods, build_service

    created = create(rljobs, namespace, disaggregated_on_port(65528, "edge"), dry_run=False)
    job = JobRef("edge", namespace, created["metadata"]["uid"])
    spec = parse_spec(created["spec"])
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_service(namespace, build_service(job, spec), dry_run="All")
    pods = build_pods(job, spec, restart=0)
    ports = {p["containerPort"] for pod in pods for p in pod["spec"]["containers"][0]["ports"]}
    assert max(ports) == 65535
    for pod in pods:
        core.create_namespaced_pod(namespace, pod, dry_run="All")


def test_missing_runtime_is_rejected(rljobs, namespace):
    body = minimal()
    del body["spec"]["runtime"]
    with pytest.raises(ApiException) as e:
        create(rljobs, namespace, body)
    assert "spec.runtime: Required value" in json.loads(e.value.body)["message"]


def test_scalar_defaults_are_applied_by_the_server(rljobs, namespace):
    created = create(rljobs, namespace, minimal(roles={"trainer": {}}))
    spec = created["spec"]
    assert spec["placement"] == "colocated" and spec["suspend"] is False
    assert spec["roles"]["trainer"] == {**spec["roles"]["trainer"], "replicas": 1, "gpus": 1,
                                        "gpuResource": "nvidia.com/gpu", "shmSize": "16Gi"}


def test_managed_by_is_immutable(rljobs, namespace):
    create(rljobs, namespace, minimal("owned", managedBy="kueue.x-k8s.io/multikueue"), dry_run=False)
    with pytest.raises(ApiException) as e:
        rljobs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "owned",
                                              {"spec": {"managedBy": "kuberl.io/operator"}})
    assert "spec.managedBy: Invalid value: field is immutable" in json.loads(e.value.body)["message"]
    rljobs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "owned", {"spec": {"suspend": True}})


def test_kubectl_explain_shows_the_descriptions(crd_installed):
    def explained():
        out = kubectl(crd_installed, "explain", "rljob.spec.roles", check=False).stdout
        return out if "Pods per role" in out else None

    out = wait_for(explained, timeout=30, what="kubectl explain to see the RLJob schema")  # OpenAPI publishes async
    for text in ("trainer", "Policy training; rank 0 drives the loop.", "rollout",
                 "Generation pods (disaggregated placement only)."):
        assert text in out
    trainer = kubectl(crd_installed, "explain", "rljob.spec.roles.trainer.gpuProduct").stdout
    assert "nvidia.com/gpu.product" in trainer


def test_printer_columns_and_status_subresource(rljobs, namespace, crd_installed):
    create(rljobs, namespace, minimal("shown"), dry_run=False)
    status = {"phase": "Running", "restarts": 2, "progress": {"step": 7, "totalSteps": 100, "rewardMean": "0.42"}}
    rljobs.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "shown", {"status": status})
    # A status written through the main resource is ignored: the status subresource owns it.
    rljobs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "shown", {"status": {"phase": "Failed"}})

    out = kubectl(crd_installed, "get", "rlj", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "STEP", "REWARD", "RESTARTS", "AGE"]
    assert out[1].split()[:5] == ["shown", "Running", "7", "0.42", "2"]
    wide = kubectl(crd_installed, "get", "rljobs", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "STEP", "TOTAL", "REWARD", "RESTARTS", "PLACEMENT", "AGE"]
    assert wide[1].split()[:7] == ["shown", "Running", "7", "100", "0.42", "2", "colocated"]
