"""Helpers for the operator's integration tests: start the real `kuberl operator`, build RLJobs,
read what a user would see (the job, its pods, Events, the operator's metrics)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from kuberl_operator import labels
from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.devcluster.pytest_plugin import die_with_parent, install_crd, wait_for  # noqa: F401 - install_crd re-exported to the tests
from kuberl_runtime.contract import Progress

Obj = dict[str, Any]
FIELD_MANAGER = "kuberl-test"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operator.md"
SYSTEM_NS = "kuberl-system"
SERVICE_ACCOUNT = "kuberl-operator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OperatorProcess:
    """A `kuberl operator` subprocess; its log is kept in a file for failure messages."""

    proc: subprocess.Popen
    metrics_port: int
    liveness_port: int
    log_path: Path

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics as {(name, sorted labels): value}."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def reconciles(self) -> float:
        return self.metrics().get(("kuberl_operator_reconciles_total", (("result", "ok"),)), 0.0)

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2).status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------- RBAC
def documented_rbac_rules(doc: Path = DOCS) -> list[Obj]:
    """The PolicyRules of docs/operator.md's RBAC table (API group | resources | verbs | why)."""
    section = doc.read_text().split("## RBAC", 1)[1].split("\n## ", 1)[0]
    rules = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        group = cells[0].strip("`").replace('""', "")
        resources = re.findall(r"`([^`]+)`", cells[1])
        verbs = [v.strip() for v in cells[2].split(",")]
        rules.append({"apiGroups": [group], "resources": resources, "verbs": verbs})
    return rules


def service_account_kubeconfig(api_client: client.ApiClient, admin_kubeconfig: Path, out: Path,
                               rules: list[Obj], name: str | None = None) -> Path:
    """A kubeconfig for a ServiceAccount (the operator's, or `name`) bound cluster-wide to exactly `rules`."""
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    sa = name or SERVICE_ACCOUNT

    def ensure(create, *args):
        try:
            create(*args)
        except ApiException as e:
            if e.status != 409:
                raise

    ensure(core.create_namespace, {"metadata": {"name": SYSTEM_NS}})
    ensure(core.create_namespaced_service_account, SYSTEM_NS, {"metadata": {"name": sa}})
    role = {"metadata": {"name": sa}, "rules": rules}
    try:
        rbac.create_cluster_role(role)
    except ApiException as e:
        if e.status != 409:
            raise
        rbac.replace_cluster_role(sa, role)
    ensure(rbac.create_cluster_role_binding, {
        "metadata": {"name": sa},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": SYSTEM_NS}]})
    token = wait_for(lambda: core.create_namespaced_service_account_token(
        sa, SYSTEM_NS, {"spec": {"expirationSeconds": 3600}}).status.token,
        timeout=30, what="a service account token")
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]
    out.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": sa}}],
        "current-context": "operator"}))
    return out


def start_operator(k8s_cluster, log_path: Path, progress_interval: float = 1.0,
                   kubeconfig: Path | None = None) -> OperatorProcess:
    metrics_port, liveness_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "kuberl_operator.cli", "operator", "--all-namespaces", "--standalone",
           "--metrics-port", str(metrics_port), "--liveness", f"http://127.0.0.1:{liveness_port}/healthz",
           "--progress-interval", str(progress_interval),
           "--progress-url-template", "http://127.0.0.1:{port}/progress"]
    log = open(log_path, "ab")
    env = k8s_cluster.env()
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    op = OperatorProcess(proc, metrics_port, liveness_port, log_path)

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"operator exited with {proc.returncode}:\n{op.log()[-4000:]}")
        return op.healthy()

    wait_for(up, timeout=60, what="the operator's liveness endpoint")
    return op


# ----------------------------------------------------------------------------------------- jobs
def rljob(name: str, trainer: Obj | None = None, run_policy: Obj | None = None, **spec: Any) -> Obj:
    """A small valid RLJob: trainer 2 x 1 GPU unless told otherwise."""
    body: Obj = {
        "roles": {"trainer": {"replicas": 2, "gpus": 1, **(trainer or {})}},
        "runtime": {"model": {"path": "/models/m"}, "data": {"path": "/data/prompts.jsonl"}},
        "runPolicy": {"backoffSeconds": 0, **(run_policy or {})},
    }
    for k, v in spec.items():
        body[k] = {**body[k], **v} if isinstance(v, dict) and isinstance(body.get(k), dict) else v
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLJob", "metadata": {"name": name}, "spec": body}


class Cluster:
    """What a user can see in one namespace, through the API."""

    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.ns = namespace
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def create(self, job: Obj) -> Obj:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, job,
                                                           field_manager=FIELD_MANAGER)

    def job(self, name: str) -> Obj:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> Obj:
        return self.job(name).get("status") or {}

    def patch_spec(self, name: str, spec: Obj) -> Obj:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec},
                                                          field_manager=FIELD_MANAGER)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def exists(self, name: str) -> bool:
        try:
            self.job(name)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def pods(self, job: str) -> list[client.V1Pod]:
        return sorted(self.core.list_namespaced_pod(self.ns, label_selector=labels.job_selector(job)).items,
                      key=lambda p: p.metadata.name)

    def live_pods(self, job: str) -> list[client.V1Pod]:
        return [p for p in self.pods(job) if p.metadata.deletion_timestamp is None]

    def native_podgroups(self, job: str) -> list[str]:
        """Names of the job's Kubernetes PodGroups (scheduling.k8s.io) that are not being deleted."""
        items = self.custom.list_namespaced_custom_object("scheduling.k8s.io", "v1alpha2", self.ns, "podgroups",
                                                          label_selector=labels.job_selector(job))["items"]
        return sorted(g["metadata"]["name"] for g in items if not g["metadata"].get("deletionTimestamp"))

    def fail_pod(self, pod: str, reason: str = "OOMKilled", exit_code: int = 137) -> None:
        """kwok turns a Running pod with these annotations Failed (see docs/dev-cluster.md)."""
        self.core.patch_namespaced_pod(pod, self.ns, {"metadata": {"annotations": {
            "kwok.kuberl.io/fail": reason, "kwok.kuberl.io/exit-code": str(exit_code)}}})

    def succeed_pod(self, pod: str) -> None:
        self.core.patch_namespaced_pod(pod, self.ns, {"metadata": {"annotations": {"kwok.kuberl.io/succeed": "true"}}})

    def events(self, job: str) -> list[client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(self.ns).items
                if e.involved_object.kind == "RLJob" and e.involved_object.name == job]

    def event_reasons(self, job: str) -> list[str]:
        return [e.reason for e in sorted(self.events(job), key=lambda e: e.metadata.creation_timestamp)]

    def wait_event(self, job: str, reason: str, timeout: float = 60) -> list[str]:
        return wait_for(lambda: reason in (r := self.event_reasons(job)) and r, timeout=timeout,
                        what=f"a {reason} Event on RLJob {job}")

    # predicates for wait_for --------------------------------------------------------------------
    def phase_is(self, name: str, phase: str):
        def check():
            s = self.status(name)
            return s if s.get("phase") == phase else None
        return check

    def all_running(self, name: str, count: int):
        def check():
            pods = self.live_pods(name)
            return pods if len(pods) == count and all(p.status.phase == "Running" for p in pods) else None
        return check


def condition(status: Obj, type_: str) -> Obj | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


class ProgressServer:
    """A tiny HTTP server on loopback that plays trainer rank 0's /progress contract. `reads` counts
    the documents served."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.reads = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path != "/progress":
                    self.send_error(404)
                    return
                body = json.dumps(outer.progress.model_dump(mode="json", by_alias=True)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.reads += 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> ProgressServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
