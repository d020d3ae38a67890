"""Fixtures of the e2e tier: the pod runner (pods really run, as local processes), the operator as
a subprocess, the RLJob CRD, and namespaces only the e2e operator watches.

- ``pod_runner`` (session): a ``PodRunner`` registered as node ``e2e-runner`` of the session cluster.
  Pods land there only with ``RUNNER_TOLERATION`` and ``RUNNER_SELECTOR`` (the e2e jobs carry both),
  so other tiers' pods never run as processes. Logs: ``pod_runner.work / "logs"``.
- ``e2e_operator`` (module): ``kuberl operator`` watching namespaces ``kuberl-e2e-*`` and reading
  progress through the runner's proxy every second; its log is in the module's tmp dir.
- ``e2e_namespace``: a fresh ``kuberl-e2e-*`` namespace, deleted after the test.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from e2e.pod_runner import RUNNER_KEY, PodRunner, free_port
from kuberl_operator.devcluster.pytest_plugin import die_with_parent, install_crd, wait_for

RUNNER_NODE = "e2e-runner"
RUNNER_TOLERATION = {"key": RUNNER_KEY, "operator": "Exists", "effect": "NoSchedule"}
RUNNER_SELECTOR = {RUNNER_KEY: RUNNER_NODE}
NAMESPACE_PREFIX = "kuberl-e2e-"


@pytest.fixture(scope="session")
def e2e_api(k8s_cluster):
    api_client = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    with api_client:
        yield api_client


@pytest.fixture(scope="session")
def pod_runner(k8s_cluster, tmp_path_factory):
    runner_client = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    runner = PodRunner(runner_client, RUNNER_NODE, tmp_path_factory.mktemp("pod-runner")).start()
    core = client.CoreV1Api(runner_client)

    def ready():
        node = core.read_node(RUNNER_NODE)
        not_ready_taints = [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]
        return not not_ready_taints and any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)

    try:
        wait_for(ready, timeout=60, what=f"node {RUNNER_NODE} Ready without not-ready taints")
        yield runner
    finally:
        runner.stop()
        runner_client.close()


class OperatorProcess:
    def __init__(self, proc: subprocess.Popen, log_path: Path, liveness_port: int):
        self.proc, self.log_path, self.liveness_port = proc, log_path, liveness_port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2).status == 200
        except OSError:
            return False


@pytest.fixture(scope="module")
def e2e_operator(k8s_cluster, e2e_api, pod_runner, tmp_path_factory):
    install_crd(e2e_api)
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    liveness = free_port()
    cmd = [sys.executable, "-m", "kuberl_operator.cli", "operator", "--standalone",
           "--namespace", f"{NAMESPACE_PREFIX}*", "--metrics-port", "0",
           "--liveness", f"http://127.0.0.1:{liveness}/healthz",
           "--progress-interval", "1", "--progress-url-template", pod_runner.progress_url_template]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=k8s_cluster.env(), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
    op = OperatorProcess(proc, log_path, liveness)
    try:
        wait_for(op.healthy, timeout=60, what="the operator's liveness endpoint")
        yield op
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def e2e_namespace(e2e_api):
    core = client.CoreV1Api(e2e_api)
    name = core.create_namespace({"metadata": {"generateName": NAMESPACE_PREFIX}}).metadata.name
    wait_for(lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
             timeout=30, what=f"the default service account in {name}")
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as e:
        if e.status != 404:
            raise
