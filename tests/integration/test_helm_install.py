"""The Helm chart against the real local control plane: server-side validation, GitOps idempotence,
install/upgrade/uninstall with the operator pod Running under kwok, and the chart's RBAC exercised by
the real operator running here with the chart ServiceAccount's token (TokenRequest API).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kuberl_operator.devcluster.pytest_plugin import die_with_parent, needs_kwok, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kuberl"
KOPF_CRDS = CHART / "crds" / "kopf-peerings.yaml"
KUBE_VERSION = "1.36.3"
CRD_NAME = "rljobs.kuberl.io"
CRD_FILE = "kuberl.io_rljobs.yaml"


@pytest.fixture(autouse=True)
def _local_cluster_only(k8s_cluster):
    needs_kwok(k8s_cluster)


def run(env: dict, *cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, input=stdin, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def template(env: dict, release: str, namespace: str, *sets: str) -> str:
    args = ["helm", "template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    return run(env, *args).stdout


def create_namespace(core: client.CoreV1Api, labels: dict | None = None) -> str:
    ns = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        generate_name="kuberl-helm-", labels={"kuberl.io/test": "true", **(labels or {})})))
    return ns.metadata.name


@pytest.fixture
def namespaces(kube_api):
    """Make extra namespaces on demand; all deleted after the test."""
    core = client.CoreV1Api(kube_api)
    made: list[str] = []

    def make(labels: dict | None = None) -> str:
        made.append(create_namespace(core, labels))
        return made[-1]

    yield make
    for ns in made:
        core.delete_namespace(ns)


def adopt_crd(env: dict, release: str, namespace: str) -> None:
    """Let `helm install` adopt an RLJob CRD another test applied with kubectl (docs/install.md)."""
    if run(env, "kubectl", "get", "crd", CRD_NAME, check=False).returncode != 0:
        return
    run(env, "kubectl", "annotate", "crd", CRD_NAME, "--overwrite", f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}")
    run(env, "kubectl", "label", "crd", CRD_NAME, "--overwrite", "app.kubernetes.io/managed-by=Helm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_account_kubeconfig(env: dict, admin_kubeconfig: Path, namespace: str, sa: str, out: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the TokenRequest API."""
    token = run(env, "kubectl", "-n", namespace, "create", "token", sa, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in cluster:
        ca = Path(cluster.pop("certificate-authority"))
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    out.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa}}],
        "current-context": "c",
    }))
    return out


def rljob(name: str) -> dict:
    return {"apiVersion": "kuberl.io/v1alpha1", "kind": "RLJob", "metadata": {"name": name},
            "spec": {"roles": {"trainer": {"replicas": 2, "gpus": 8}},
                     "runtime": {"model": {"path": "/models/tiny"},
                                 "data": {"path": "/data/train.jsonl", "promptKey": "question"},
                                 "algorithm": {"name": "grpo", "samplesPerPrompt": 4},
                                 "training": {"totalSteps": 10}}}}


def pods_running(core: client.CoreV1Api, namespace: str, job: str, count: int):
    def check():
        pods = core.list_namespaced_pod(namespace, label_selector=f"kuberl.io/job={job}").items
        return pods if len(pods) == count and all(p.status.phase == "Running" for p in pods) else None
    return check


class Operator:
    """`kuberl operator` as a subprocess with the given kubeconfig; its log is kept for assertions."""

    def __init__(self, kubeconfig: Path, log: Path, *args: str):
        self.health = free_port()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kuberl_operator.cli", "operator", "--metrics-port=0",
             f"--liveness=http://127.0.0.1:{self.health}/healthz", *args],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent)

    def jobs_seen(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2) as resp:
            return json.loads(resp.read())["jobs"]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


def operator_reconciles(kube_api, kubeconfig: Path, tmp_path: Path, job_ns: str, *args: str) -> None:
    """Run the real operator with `kubeconfig`; an RLJob must become Running pods with no 403 logged."""
    core = client.CoreV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    name = f"rbac-{secrets.token_hex(3)}"
    op = Operator(kubeconfig, tmp_path / f"operator-{name}.log", *args)
    try:
        # The operator's start (imports, kopf's first list calls) takes 5-15 s on a busy machine.
        wait_for(lambda: op.jobs_seen() is not None, timeout=60, what="the operator's health endpoint")
        custom.create_namespaced_custom_object("kuberl.io", "v1alpha1", job_ns, "rljobs", rljob(name))
        wait_for(pods_running(core, job_ns, name, 2), timeout=60, what=f"2 Running pods of {name}")
        wait_for(lambda: custom.get_namespaced_custom_object_status(
            "kuberl.io", "v1alpha1", job_ns, "rljobs", name).get("status", {}).get("phase") == "Running",
            timeout=30, what=f"{name} status.phase Running")
        # The job was reconciled by this process (not by another operator): it tracks its phase.
        # (kopf caches probe results for 10 s, so this takes up to 10 s on any machine.)
        wait_for(lambda: op.jobs_seen() >= 1, timeout=60, what="the operator to report the job",
                 interval=1.0)
    finally:
        log = op.stop()
    forbidden = [line for line in log.splitlines() if "forbidden" in line.lower()]
    assert forbidden == [], "\n".join(forbidden[:5])


def can_i(env: dict, sa: str, *what: str) -> bool:
    result = run(env, "kubectl", "auth", "can-i", *what, f"--as={sa}", check=False)
    return result.stdout.strip() == "yes"


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets", [
    (),
    ("watchNamespaces={NS}", "podDisruptionBudget.enabled=true", "crds.keep=false",
     "nodeSelector.kubernetes\\.io/os=linux", "extraEnv[0].name=A", "extraEnv[0].value=b"),
    ("replicas=2", "podDisruptionBudget.enabled=true"),
], ids=["defaults", "namespaced", "peering"])
def test_rendered_chart_passes_server_side_dry_run(k8s_cluster, namespaces, sets):
    env = k8s_cluster.env()
    release_ns, watched = namespaces(), namespaces()
    if any(s.startswith("replicas=") for s in sets):
        run(env, "kubectl", "apply", "--server-side", "-f", str(KOPF_CRDS))  # what Helm's crds/ step does
        wait_for(lambda: run(env, "kubectl", "get", "clusterkopfpeerings", check=False).returncode == 0,
                 timeout=30, what="the kopf peering CRDs to be served")
    manifest = template(env, "dry", release_ns, *[s.replace("NS", watched) for s in sets])
    result = run(env, "kubectl", "apply", "--dry-run=server", "-f", "-", stdin=manifest)
    objects = [line for line in result.stdout.splitlines() if line.strip()]
    assert objects and all("(server dry run)" in line for line in objects), result.stdout
    assert len(objects) == len([d for d in yaml.safe_load_all(manifest) if d])


def test_applying_the_rendered_chart_twice_is_a_no_op(k8s_cluster, namespaces):
    env = k8s_cluster.env()
    ns = namespaces()
    release = f"gitops-{secrets.token_hex(3)}"
    manifest = template(env, release, ns, "crds.enabled=false")
    try:
        run(env, "kubectl", "apply", "-f", "-", stdin=manifest)
        second = run(env, "kubectl", "apply", "-f", "-", stdin=manifest).stdout.splitlines()
        assert second and all(line.endswith(" unchanged") for line in second), second
        diff = run(env, "kubectl", "diff", "-f", "-", stdin=manifest, check=False)
        assert diff.returncode == 0 and diff.stdout == "", diff.stdout
        # Server-side apply (Argo CD's ServerSideApply=true) is just as quiet.
        run(env, "kubectl", "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=manifest)
        diff = run(env, "kubectl", "diff", "--server-side", "-f", "-", stdin=manifest, check=False)
        assert diff.returncode == 0 and diff.stdout == "", diff.stdout
    finally:
        run(env, "kubectl", "delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=manifest, check=False)


def test_crd_template_applies_twice_without_changes(k8s_cluster):
    """The CRD as the chart renders it (the generated one plus metadata) converges in one apply."""
    env = k8s_cluster.env()
    crd = run(env, "helm", "template", "kuberl", str(CHART), "--kube-version", KUBE_VERSION,
              "-s", "templates/crd.yaml").stdout
    run(env, "kubectl", "apply", "--server-side", "--force-conflicts", "--field-manager=helm-test", "-f", "-",
        stdin=crd)
    run(env, "kubectl", "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    diff = run(env, "kubectl", "diff", "--server-side", "--field-manager=helm-test", "-f", "-", stdin=crd,
               check=False)
    assert diff.returncode == 0 and diff.stdout == "", diff.stdout[:2000]


def test_install_upgrade_uninstall_and_the_rbac_under_the_real_operator(k8s_cluster, kube_api, namespaces,
                                                                       tmp_path):
    env = k8s_cluster.env()
    core = client.CoreV1Api(kube_api)
    apps = client.AppsV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    # The chart's pod passes the Pod Security Standards' restricted profile.
    release_ns = namespaces({"pod-security.kubernetes.io/enforce": "restricted"})
    job_ns = namespaces()
    release = f"kuberl-{secrets.token_hex(3)}"
    sa = f"system:serviceaccount:{release_ns}:{release}"
    adopt_crd(env, release, release_ns)

    # install: the operator Deployment's pod Running (kwok, on the untainted CPU node)
    run(env, "helm", "install", release, str(CHART), "-n", release_ns, "--wait", "--timeout", "90s")
    try:
        pods = wait_for(lambda: [p for p in core.list_namespaced_pod(
            release_ns, label_selector=f"app.kubernetes.io/instance={release}").items
            if p.status.phase == "Running"], timeout=60, what="the operator pod Running")
        assert pods[0].spec.node_name == "kwok-cpu-0"
        assert pods[0].spec.containers[0].args[-2:] == ["--all-namespaces", "--standalone"]

        # RBAC: enough for the operator to do its job ...
        kubeconfig = service_account_kubeconfig(env, k8s_cluster.kubeconfig, release_ns, release,
                                                tmp_path / "sa.kubeconfig")
        operator_reconciles(kube_api, kubeconfig, tmp_path, job_ns, "--all-namespaces", "--standalone")
        # ... and nothing more: these are refused, through the API and as the token itself.
        assert can_i(env, sa, "create", "pods", "-n", job_ns)  # the check itself can say yes
        assert not can_i(env, sa, "delete", "nodes")
        assert not can_i(env, sa, "get", "secrets", "-n", job_ns)
        assert not can_i(env, sa, "patch", "rljobs.kuberl.io", "-n", job_ns)  # never writes a job's spec
        assert not can_i(env, sa, "create", "deployments.apps", "-n", job_ns)
        refused = run(dict(env, KUBECONFIG=str(kubeconfig)), "kubectl", "delete", "node", "kwok-cpu-0",
                      "--dry-run=server", check=False)
        assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr

        # upgrade: two replicas with peering, a new default runtime image
        run(env, "helm", "upgrade", release, str(CHART), "-n", release_ns, "--reuse-values", "--set",
            "replicas=2", "--set", "runtimeImage.tag=0.2.0", "--wait", "--timeout", "90s")
        deployment = apps.read_namespaced_deployment(release, release_ns)
        container = deployment.spec.template.spec.containers[0]
        assert f"--peering={release}" in container.args
        assert {e.name: e.value for e in container.env}["KUBERL_DEFAULT_RUNTIME_IMAGE"].endswith(":0.2.0")
        assert custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", release)
        assert can_i(env, sa, "patch", "clusterkopfpeerings.kopf.dev")
        wait_for(lambda: deployment.spec.replicas == 2 and apps.read_namespaced_deployment(
            release, release_ns).status.ready_replicas == 2, timeout=60, what="2 ready operator replicas")
        history = json.loads(run(env, "helm", "history", release, "-n", release_ns, "-o", "json").stdout)
        assert [h["status"] for h in history] == ["superseded", "deployed"]
    finally:
        # uninstall: everything goes but the CRD (crds.keep), so the RLJobs survive
        run(env, "helm", "uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s")
    assert run(env, "kubectl", "get", "crd", CRD_NAME, check=False).returncode == 0
    assert custom.list_namespaced_custom_object("kuberl.io", "v1alpha1", job_ns, "rljobs")["items"]
    assert not apps.list_namespaced_deployment(release_ns).items
    assert run(env, "kubectl", "get", "clusterrole", f"{release}-cluster", check=False).returncode != 0
    assert not can_i(env, sa, "create", "pods", "-n", job_ns)


def test_namespaced_install_rbac_under_the_real_operator(k8s_cluster, kube_api, namespaces, tmp_path):
    env = k8s_cluster.env()
    release_ns, job_ns, other_ns = namespaces(), namespaces(), namespaces()
    release = f"kuberl-ns-{secrets.token_hex(3)}"
    sa = f"system:serviceaccount:{release_ns}:{release}"
    # crds.enabled=false: the CRD is managed apart from the release (docs/install.md).
    run(env, "kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / CRD_FILE))
    run(env, "kubectl", "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    run(env, "helm", "install", release, str(CHART), "-n", release_ns, "--set", "crds.enabled=false",
        "--set", f"watchNamespaces={{{job_ns}}}", "--wait", "--timeout", "90s")
    try:
        kubeconfig = service_account_kubeconfig(env, k8s_cluster.kubeconfig, release_ns, release,
                                                tmp_path / "sa.kubeconfig")
        operator_reconciles(kube_api, kubeconfig, tmp_path, job_ns, f"--namespace={job_ns}", "--standalone")
        assert can_i(env, sa, "create", "pods", "-n", job_ns)
        assert not can_i(env, sa, "create", "pods", "-n", other_ns)
        assert not can_i(env, sa, "list", "rljobs.kuberl.io", "--all-namespaces")
        assert not can_i(env, sa, "delete", "nodes")
    finally:
        run(env, "helm", "uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s")
