"""O1 — the operator at scale (../shared/BENCHMARKS.md): N RLJobs of 4 pods applied at once on the
local control plane with kwok GPU nodes; seconds until every pod exists and every job is Running,
the operator's CPU seconds and peak RSS, reconcile errors, duplicate pods, then seconds until
everything is deleted.

    python bench/operator_scale.py                    # 200 jobs x 4 pods on a fresh local cluster
    python bench/operator_scale.py --jobs 20 --json out.json
    python bench/operator_scale.py --kubeconfig ~/.kube/config   # an existing cluster (CRD installed here)

Duplicates are counted from a pod watch that runs through the whole benchmark: a pod name seen with
two uids while no restart happened is a duplicate. Jobs use 1 GPU per pod; the fresh cluster gets
enough 8-GPU nodes for all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from kuberl_operator import labels
from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.devcluster.pytest_plugin import install_crd

NAMESPACE = "o1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(i: int, pods: int) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLJob", "metadata": {"name": f"o1-{i:04d}"},
            "spec": {"roles": {"trainer": {"replicas": pods, "gpus": 1}},
                     "runtime": {"model": {"path": "/models/m"}, "data": {"path": "/data/p.jsonl"}}}}


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK  # utime + stime
    hwm = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return cpu, hwm


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


class PodWatch(threading.Thread):
    """Every uid seen per pod name in the namespace, from a watch that starts before the first job."""

    def __init__(self, core: client.CoreV1Api, namespace: str, selector: str):
        super().__init__(daemon=True)
        self.core, self.ns, self.selector, self.uids, self.stop_flag = core, namespace, selector, {}, threading.Event()
        self.rv = core.list_namespaced_pod(namespace).metadata.resource_version

    def run(self) -> None:
        while not self.stop_flag.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self.core.list_namespaced_pod, self.ns, resource_version=self.rv,
                                   timeout_seconds=5, label_selector=self.selector):
                    pod = ev["object"]
                    self.rv = pod.metadata.resource_version
                    self.uids.setdefault(pod.metadata.name, set()).add(pod.metadata.uid)
                    if self.stop_flag.is_set():
                        break
            except ApiException as e:
                if e.status == 410:  # expired: relist
                    self.rv = self.core.list_namespaced_pod(self.ns).metadata.resource_version
                else:
                    raise

    def duplicates(self) -> int:
        return sum(len(u) - 1 for u in self.uids.values())


def wait_gc_watches(api: client.ApiClient, subject: "Subject", timeout: float = 120) -> float:
    """Block until the garbage collector deletes the dependents of a deleted `subject` job.

    The GC picks up a freshly installed CRD on its next discovery resync (30 s), so deletion right
    after installing would measure that lag. Returns the seconds it took."""
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns, g, v, plural = subject.namespace, subject.group, subject.version, subject.plural
    t = time.monotonic()
    probe = subject.make_job(9999, 2)
    probe["metadata"]["name"] = "gc-probe"
    owner = custom.create_namespaced_custom_object(g, v, ns, plural, probe)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "gc-probe", "ownerReferences": [{
        "apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": "gc-probe",
        "uid": owner["metadata"]["uid"]}]}})
    custom.delete_namespaced_custom_object(g, v, ns, plural, "gc-probe")
    while time.monotonic() - t < timeout:
        try:
            core.read_namespaced_config_map("gc-probe", ns)
        except ApiException as e:
            if e.status == 404:
                return time.monotonic() - t
            raise
        time.sleep(0.5)
    raise RuntimeError("the garbage collector never handled the probe")


def ensure_namespace(core: client.CoreV1Api, ns: str) -> None:
    try:
        core.create_namespace({"metadata": {"name": ns}})
    except ApiException as e:
        if e.status != 409:
            raise
    while not core.list_namespaced_service_account(ns, field_selector="metadata.name=default").items:
        time.sleep(0.2)


@dataclass
class Subject:
    """One controller under test: how to start it and what its jobs look like."""

    name: str
    namespace: str
    group: str
    version: str
    plural: str
    pod_selector: str
    make_job: Callable[[int, int], dict]
    is_running: Callable[[dict], bool]
    start: Callable[[dict, Path, int], subprocess.Popen]  # (env, log dir, metrics port)
    errors_metric: str
    reconciles_metric: str


def start_kuberl(env: dict, log_dir: Path, port: int) -> subprocess.Popen:
    profile = ["-m", "cProfile", "-o", os.environ["KUBERL_O1_PROFILE"]] if os.environ.get("KUBERL_O1_PROFILE") else []
    return subprocess.Popen([sys.executable, *profile, "-m", "kuberl_operator.cli", "operator", "-n", NAMESPACE,
                             "--standalone", "--metrics-port", str(port)],
                            env=env, stdout=open(log_dir / "kuberl-operator.log", "wb"), stderr=subprocess.STDOUT)


KUBERL = Subject(
    name="kuberl operator", namespace=NAMESPACE, group=GROUP, version=VERSION, plural=PLURAL,
    pod_selector=labels.JOB, make_job=job,
    is_running=lambda j: (j.get("status") or {}).get("phase") == "Running",
    start=start_kuberl, errors_metric="kuberl_operator_reconcile_errors_total",
    reconciles_metric="kuberl_operator_reconciles_total{result=ok}")


def run(api: client.ApiClient, kubeconfig: Path, subject: Subject, jobs: int, pods: int, timeout: float,
        log_dir: Path) -> dict:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns, g, v, plural = subject.namespace, subject.group, subject.version, subject.plural
    metrics_port = free_port()
    op = subject.start(dict(os.environ, KUBECONFIG=str(kubeconfig)), log_dir, metrics_port)
    result: dict = {"controller": subject.name, "jobs": jobs, "pods_per_job": pods}
    watcher = PodWatch(core, ns, subject.pod_selector)
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                scrape(metrics_port)
                break
            except OSError:
                if op.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{subject.name} did not start; see {log_dir}") from None
                time.sleep(0.2)
        time.sleep(1.0)  # let the watches start listing
        cpu0, _ = proc_usage(op.pid)

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: custom.create_namespaced_custom_object(g, v, ns, plural, subject.make_job(i, pods)),
                          range(jobs)))
        t_applied = time.monotonic()
        result["apply_s"] = round(t_applied - t0, 2)

        all_pods = pods_running = all_running = None
        while time.monotonic() - t_applied < timeout:
            pod_items = core.list_namespaced_pod(ns, label_selector=subject.pod_selector).items
            if all_pods is None and len(pod_items) >= jobs * pods:
                all_pods = time.monotonic() - t_applied
            if pods_running is None and sum(p.status.phase == "Running" for p in pod_items) >= jobs * pods:
                pods_running = time.monotonic() - t_applied
            items = custom.list_namespaced_custom_object(g, v, ns, plural)["items"]
            if sum(1 for j in items if subject.is_running(j)) == jobs:
                all_running = time.monotonic() - t_applied
                pods_running = all_running if pods_running is None else pods_running
                break
            time.sleep(0.5)
        result["all_pods_exist_s"] = None if all_pods is None else round(all_pods, 2)
        result["all_pods_running_s"] = None if pods_running is None else round(pods_running, 2)
        result["all_running_s"] = None if all_running is None else round(all_running, 2)
        cpu1, rss = proc_usage(op.pid)
        result["operator_cpu_s_to_running"] = round(cpu1 - cpu0, 2)
        m = scrape(metrics_port)
        result["reconciles"] = int(sum(val for k, val in m.items() if k.startswith(subject.reconciles_metric)))
        result["reconcile_errors"] = int(sum(val for k, val in m.items() if k.startswith(subject.errors_metric)))

        t_del = time.monotonic()
        custom.delete_collection_namespaced_custom_object(g, v, ns, plural)
        deleted = None
        while time.monotonic() - t_del < timeout:
            left_jobs = custom.list_namespaced_custom_object(g, v, ns, plural)["items"]
            left_pods = core.list_namespaced_pod(ns, label_selector=subject.pod_selector).items
            if not left_jobs and not left_pods:
                deleted = time.monotonic() - t_del
                break
            time.sleep(0.5)
        result["all_deleted_s"] = None if deleted is None else round(deleted, 2)
        cpu2, rss = proc_usage(op.pid)
        result["operator_cpu_s_total"] = round(cpu2 - cpu0, 2)
        result["operator_peak_rss_mb"] = round(rss / 2**20, 1)
        result["duplicate_pods"] = watcher.duplicates()
        result["pod_names_seen"] = len(watcher.uids)
    finally:
        watcher.stop_flag.set()
        if op.poll() is None:
            op.send_signal(signal.SIGTERM)
            try:
                op.wait(timeout=20)
            except subprocess.TimeoutExpired:
                op.kill()
    return result


# ------------------------------------------------------------------- the peer: Kubeflow training-operator
PEER_NS = "o1-peer"
PEER_SYSTEM_NS = "kubeflow"  # the training-operator's webhook cert secret lives here (hard-coded upstream)
PEER_SECRET = "training-operator-webhook-cert"
PEER_VWC = "validator.training-operator.kubeflow.org"
PEER_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # hard-coded upstream (pkg/cert)


def pytorchjob(i: int, pods: int) -> dict:
    def replica(n: int) -> dict:
        return {"replicas": n, "restartPolicy": "OnFailure", "template": {"spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "pytorch", "image": "kuberl/fake:latest",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}

    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": f"o1-{i:04d}"},
            "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(pods - 1)}}}


def pytorchjob_running(j: dict) -> bool:
    return any(c.get("type") == "Running" and c.get("status") == "True"
               for c in (j.get("status") or {}).get("conditions") or [])


def prepare_peer(api: client.ApiClient, crd_path: Path) -> None:
    """CRD, and what its webhook cert rotation waits for outside a Deployment: the Secret, a
    ValidatingWebhookConfiguration to inject the CA into (one webhook that matches nothing), and
    the Secret's files where the kubelet would have mounted them."""
    ext, core = client.ApiextensionsV1Api(api), client.CoreV1Api(api)
    adm = client.AdmissionregistrationV1Api(api)
    crd = yaml.safe_load(crd_path.read_text())
    for create, args in ((ext.create_custom_resource_definition, (crd,)),
                         (core.create_namespace, ({"metadata": {"name": PEER_SYSTEM_NS}},)),
                         (core.create_namespaced_secret, (PEER_SYSTEM_NS, {"metadata": {"name": PEER_SECRET}})),
                         (adm.create_validating_webhook_configuration, ({
                             "metadata": {"name": PEER_VWC},
                             "webhooks": [{"name": "unused.training-operator.kubeflow.org",
                                           "admissionReviewVersions": ["v1"], "sideEffects": "None",
                                           "failurePolicy": "Ignore", "clientConfig": {"url": "https://127.0.0.1:1/x"},
                                           "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"],
                                                      "operations": ["DELETE"], "resources": ["nonexistent"]}]}]},))):
        try:
            create(*args)
        except ApiException as e:
            if e.status != 409:
                raise


def mount_peer_certs(api: client.ApiClient, timeout: float = 60) -> None:
    import base64

    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = core.read_namespaced_secret(PEER_SECRET, PEER_SYSTEM_NS).data or {}
        if {"ca.crt", "tls.crt", "tls.key"} <= set(data):
            PEER_CERT_DIR.mkdir(parents=True, exist_ok=True)
            for k in ("ca.crt", "tls.crt", "tls.key"):
                (PEER_CERT_DIR / k).write_bytes(base64.b64decode(data[k]))
            return
        time.sleep(0.2)
    raise RuntimeError("the training-operator never wrote its webhook certs")


def peer_subject(api: client.ApiClient, binary: Path) -> Subject:
    def start(env: dict, log_dir: Path, port: int) -> subprocess.Popen:
        proc = subprocess.Popen([str(binary), "--enable-scheme=pytorchjob", "--namespace", PEER_NS,
                                 f"--metrics-bind-address=127.0.0.1:{port}",
                                 f"--health-probe-bind-address=127.0.0.1:{free_port()}",
                                 f"--webhook-server-port={free_port()}"],
                                env=env, stdout=open(log_dir / "training-operator.log", "wb"),
                                stderr=subprocess.STDOUT, cwd=log_dir)
        mount_peer_certs(api)
        return proc

    return Subject(
        name="kubeflow training-operator v1.8.1", namespace=PEER_NS, group="kubeflow.org", version="v1",
        plural="pytorchjobs", pod_selector="training.kubeflow.org/job-name", make_job=pytorchjob,
        is_running=pytorchjob_running, start=start,
        errors_metric='controller_runtime_reconcile_errors_total{controller=pytorchjob-controller}',
        reconciles_metric='controller_runtime_reconcile_total{controller=pytorchjob-controller,result=success}')


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--pods", type=int, default=4, help="pods per job (1 GPU each)")
    ap.add_argument("--kubeconfig", type=Path, default=None, help="existing cluster; default: start a local one")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--peer-binary", type=Path, default=None,
                    help="Kubeflow training-operator v1 binary (go install "
                         "github.com/kubeflow/training-operator/cmd/training-operator.v1@v1.8.1): run it too")
    ap.add_argument("--peer-crd", type=Path, default=None, help="its kubeflow.org_pytorchjobs.yaml")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kuberl-o1-") as tmp:
        tmp_path = Path(tmp)
        cluster = None
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            from kuberl_operator.devcluster.build import ensure_binaries
            from kuberl_operator.devcluster.cluster import LocalCluster
            from kuberl_operator.devcluster.nodes import GPUPool

            ensure_binaries()
            nodes = math.ceil(args.jobs * args.pods / 8)
            cluster = LocalCluster(tmp_path / "cluster", gpu_pools=(GPUPool(count=nodes),), log=lambda _m: None)
            t = time.monotonic()
            cluster.up(timeout=300)
            print(f"local cluster with {nodes} GPU nodes up in {time.monotonic() - t:.1f}s", file=sys.stderr)
            kubeconfig = cluster.kubeconfig
        api = config.new_client_from_config(config_file=str(kubeconfig))
        results = []
        try:
            subjects = [KUBERL]
            install_crd(api)
            if args.peer_binary:
                prepare_peer(api, args.peer_crd)
                subjects.append(peer_subject(api, args.peer_binary))
            core = client.CoreV1Api(api)
            for subject in subjects:  # warm-up, not measured: the GC learns both CRDs
                ensure_namespace(core, subject.namespace)
                print(f"GC watches {subject.plural} after {wait_gc_watches(api, subject):.1f}s", file=sys.stderr)
            for subject in subjects:
                results.append(run(api, kubeconfig, subject, args.jobs, args.pods, args.timeout, tmp_path))
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            if cluster is not None:
                cluster.down()
    out = {"cpus": os.cpu_count(), "results": results}
    if len(results) == 2 and results[0]["all_running_s"] and results[1]["all_running_s"]:
        out["ours_over_peer_all_running"] = round(results[0]["all_running_s"] / results[1]["all_running_s"], 2)
        out["ours_over_peer_cpu"] = round(results[0]["operator_cpu_s_to_running"]
                                          / max(results[1]["operator_cpu_s_to_running"], 1e-9), 2)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
