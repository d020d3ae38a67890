"""pytest fixtures for tests against a real control plane (etcd, kube-apiserver, scheduler,
controller-manager) with kwok-simulated GPU nodes.

The repository's root conftest.py loads this plugin (``pytest_plugins``), so every test can use:

- ``k8s_cluster`` (session): a ``ClusterHandle`` with ``kubeconfig`` (Path), ``env()`` (os.environ
  plus ``KUBECONFIG`` and kubectl/helm on ``PATH``, for subprocesses such as the operator),
  ``bin_dir``, ``existing`` and ``local`` (the ``LocalCluster``). It starts one cluster per session
  (per xdist worker), about 5 s once the binaries exist; binaries missing from the cache are built
  before the first test. With ``KUBERL_E2E_EXISTING_CLUSTER=1`` it uses the cluster ``KUBECONFIG``
  points at instead; tests that need kwok's simulation should then skip with ``needs_kwok(handle)``.
  All processes end with the session, and get SIGKILL if pytest itself dies (PR_SET_PDEATHSIG).
  A SIGTERM to pytest stops the session like Ctrl-C, so every fixture still tears down.
- ``kube_api``: a ``kubernetes.client.ApiClient`` for that cluster.
- ``namespace``: a fresh namespace (default service account present), deleted after the test.
- ``wait_for(predicate, timeout, what)``: poll until ``predicate()`` is truthy and return it.
- ``install_crd(api_client)``: create (or replace) the RLJob CRD and wait until it is Established.
- ``die_with_parent``: a ``preexec_fn`` for processes a test starts (an operator, say): SIGKILL when
  pytest dies without tearing down (SIGKILL, the OOM killer), as the cluster's own processes get.

The cluster (defaults, see nodes.py): 4 GPU nodes ``kwok-gpu-h100-80gb-hbm3-{0..3}`` with
``nvidia.com/gpu: 8``, labels ``nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3``,
``nvidia.com/gpu.memory=81559``, ``nvidia.com/gpu.count=8`` and the taint
``nvidia.com/gpu=present:NoSchedule``; 1 CPU-only node ``kwok-cpu-0``. Feature gates
``GenericWorkload`` and ``GangScheduling`` are on and ``scheduling.k8s.io/v1alpha2`` (Workload,
PodGroup; pods join a group with ``spec.schedulingGroup.podGroupName``) is served.

Pod lifecycle on kwok nodes: a bound pod becomes Running at once; a deleted pod disappears at once.
To end a pod, annotate it (at creation or while it runs; constants in ``nodes``):

- ``kwok.kuberl.io/fail: "<reason>"`` -> phase Failed, each container
  ``state.terminated.reason=<reason>``; with ``kwok.kuberl.io/exit-code: "137"`` (default "1"),
  optional ``kwok.kuberl.io/message``, and ``kwok.kuberl.io/container: "<name>"`` to fail only that
  container (the others end with 137/Error).
- ``kwok.kuberl.io/succeed: "true"`` -> phase Succeeded, every container exit code 0/Completed.
- ``kwok.kuberl.io/delay: "30s"`` -> wait that long after Running before failing/succeeding.

Nodes kwok does not manage: kwok only manages nodes annotated ``kwok.x-k8s.io/node: fake``
(``nodes.KWOK_NODE_SELECTOR``). A node created without that annotation, and every pod bound to it,
is left alone: its status, Lease and pod phases are up to whoever created it (the e2e pod runner),
and pods deleted there keep their deletionTimestamp until that owner removes them. Such an owner
must keep the node's Ready condition and its Lease in kube-node-lease fresh, or the node-lifecycle
controller taints the node ``node.kubernetes.io/unreachable`` and later evicts its pods.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .build import ensure_binaries, locate_binaries
from .cluster import LocalCluster, die_with_parent  # noqa: F401 - for the tests' own processes

EXISTING_CLUSTER_ENV = "KUBERL_E2E_EXISTING_CLUSTER"


def use_existing_cluster() -> bool:
    return os.environ.get(EXISTING_CLUSTER_ENV) == "1" and bool(os.environ.get("KUBECONFIG"))


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.2):
    """Return the first truthy result of ``predicate()``; fail with ``what`` after ``timeout`` s.

    Exceptions from the predicate count as "not yet" and the last one is shown on timeout.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = predicate()
            if result:
                return result
            last = result
        except Exception as exc:  # noqa: BLE001 - shown in the timeout message
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"last result: {last!r}")
        time.sleep(interval)


def install_crd(api_client, timeout: float = 30.0) -> None:
    """Create the RLJob CRD from ``kuberl crd``'s rendering, or replace the one there (a cluster
    reused across runs may hold an older schema), and wait until the API server serves it."""
    import yaml
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kuberl_operator.crd import render_crd

    ext = client.ApiextensionsV1Api(api_client)
    crd = yaml.safe_load(render_crd())
    name = crd["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as e:
        if e.status != 409:
            raise
        crd["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(name).metadata.resource_version
        ext.replace_custom_resource_definition(name, crd)

    def established():
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    wait_for(established, timeout=timeout, what="the RLJob CRD to be established")
    # Established comes a moment before the resource's storage is ready: a LIST then answers 429
    # "storage is (re)initializing", which an operator started right away logs as an ERROR.
    custom = client.CustomObjectsApi(api_client)
    group, version, plural = crd["spec"]["group"], crd["spec"]["versions"][0]["name"], crd["spec"]["names"]["plural"]
    wait_for(lambda: custom.list_cluster_custom_object(group, version, plural, limit=1) is not None,
             timeout=timeout, what=f"the API server to serve {plural}.{group}")


@dataclass
class ClusterHandle:
    """What tests get from ``k8s_cluster``."""

    kubeconfig: Path
    existing: bool
    local: LocalCluster | None = None

    @property
    def bin_dir(self) -> Path:
        """Where kubectl and helm live (the build cache; may be empty on an existing cluster)."""
        return locate_binaries().bin_dir

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and the binaries on PATH, for subprocesses."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env


def _terminated(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the session at once
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}: tearing down the fixtures")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout`, a CI runner or `kill` stop a session with SIGTERM, which ends Python at once: no
    # fixture teardown, so the operators and the e2e pod runner's pods (their own sessions) lived on
    # after it. Handled like Ctrl-C instead: pytest stops and every fixture tears down.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build before any test starts so a cold build (minutes) is not charged to one test's timeout.
    if use_existing_cluster() or session.config.option.collectonly:
        return
    if any("k8s_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")

        def log(message: str) -> None:
            if reporter is not None:
                reporter.write_line(f"[kuberl build] {message}")

        ensure_binaries(log=log)


def needs_kwok(handle: ClusterHandle) -> None:
    """Skip the calling test on an existing cluster: it relies on kwok's simulated lifecycle."""
    if handle.existing:
        pytest.skip("needs the local cluster's kwok nodes (KUBERL_E2E_EXISTING_CLUSTER=1 is set)")


_startup: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _startup:
        terminalreporter.write_line(f"[kuberl dev cluster] {line}")


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory):
    if use_existing_cluster():
        yield ClusterHandle(Path(os.environ["KUBECONFIG"]), existing=True)
        return
    cluster = LocalCluster(tmp_path_factory.mktemp("kuberl-cluster"), tie_to_parent=True,
                           log=lambda _m: None)
    started = time.monotonic()
    try:
        cluster.up()
        _startup.append(f"up in {time.monotonic() - started:.1f}s at {cluster.server} "
                        f"({len(cluster.nodes)} nodes, state in {cluster.state_dir})")
        yield ClusterHandle(cluster.kubeconfig, existing=False, local=cluster)
    finally:
        stopping = time.monotonic()
        cluster.down()
        _startup.append(f"down in {time.monotonic() - stopping:.1f}s")


@pytest.fixture
def kube_api(k8s_cluster: ClusterHandle):
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    with api_client:
        yield api_client


@pytest.fixture
def namespace(kube_api, request: pytest.FixtureRequest):
    """A fresh namespace whose default service account exists (pods can be created at once)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(kube_api)
    created = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        generate_name="kuberl-test-", labels={"kuberl.io/test": "true"})))
    name = created.metadata.name
    wait_for(lambda: core.list_namespaced_service_account(
        name, field_selector="metadata.name=default").items,
        timeout=30, what=f"the default service account in namespace {name}")
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
