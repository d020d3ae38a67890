"""A test-only stand-in for the kubelet: runs the pods bound to its node as local processes.

    python -m e2e.pod_runner --node e2e-runner --work-dir /tmp/kuberl-e2e
    # -> registers Node e2e-runner (tainted kuberl.io/pod-runner=e2e-runner:NoSchedule) and prints
    #    the --progress-url-template to give `kuberl operator`

It is NOT a kubelet and isolates nothing. What it does, so that RLJob pods can really run here:

- registers its own Node (Ready, CPU/memory capacity, label and taint ``kuberl.io/pod-runner=<node>``
  so only pods that tolerate it land there; no kwok annotation, so kwok leaves it alone) and renews
  its Lease so the node-lifecycle controller keeps it;
- watches pods bound to that node and starts the first container's command + args as a local
  process in its own session (process group), with the pod's env: ``valueFrom.fieldRef``
  (metadata.name/namespace/uid, spec.nodeName, status.podIP/hostIP = 127.0.0.1) resolved, Service
  DNS names (``*.svc``, ``*.svc.cluster.local``) mapped to 127.0.0.1;
- maps volumes to local directories: configMap -> files in the pod's sandbox, emptyDir -> a sandbox
  dir, persistentVolumeClaim -> the bound PV's hostPath (else ``<work>/pvc/<ns>/<claim>``, shared by
  every pod using the claim), hostPath -> itself, projected (service-account token) -> an empty
  dir. A mount path has no meaning to a host process, so
  paths under a mountPath are rewritten to the local dir in env values, the working dir and the
  string values of YAML files from configMaps, and a mount inside another mount's path becomes a
  symlink there (so relative paths from the working dir reach it);
- gives pods distinct local ports where a real pod has its own IP: kuberl's ``KUBERL_MASTER_PORT``
  becomes one free port per (namespace, subdomain, ``KUBERL_RESTART``), and each pod gets its own
  HTTP port (``KUBERL_HTTP_PORT`` and ``logging.port`` in its copy of the ``KUBERL_CONFIG`` file);
  a small proxy at ``http://127.0.0.1:<proxy>/<namespace>/<pod>/<path>`` reaches each pod's HTTP
  port (``progress_url_template`` is what the operator's ``--progress-url-template`` needs);
- gives each pod a termination-message file (``<sandbox>/termination-log``, named by
  ``KUBERL_TERMINATION_LOG``: a host process cannot write ``/dev/termination-log``);
- reports status: Running (podIP 127.0.0.1, container running; Ready per its httpGet readinessProbe,
  probed every second against the pod's HTTP port, or at once without a probe), then Succeeded/Failed
  with the exit code (128+N for signal N), reason Completed/Error and the termination message as the
  kubelet reads it: the file's last 4096 bytes, or, only when the file is empty, the container failed
  and its policy is ``FallbackToLogsOnError``, the log's last 80 lines / 2048 bytes;
- on deletion (deletionTimestamp set) sends SIGTERM to the process group, SIGKILL after the grace
  period (capped at ``max_grace_s``), then removes the pod (grace 0); ``stop()`` kills every process
  and deletes the node. Pod processes also die with the runner when it is killed outright
  (PR_SET_PDEATHSIG): a test session that dies leaves no training processes behind.

Each pod's output goes to ``<work>/logs/<namespace>_<pod>_<seq>_<uid8>.log``; the pid (= process
group) of its latest process is in ``<work>/pids/<namespace>_<pod>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kuberl_operator.devcluster.cluster import die_with_parent

RUNNER_KEY = "kuberl.io/pod-runner"  # node label and taint key; value = node name
LOCALHOST = "127.0.0.1"
SERVICE_DNS = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?$")
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS")
LEASE_S = 40
RENEW_S = 5.0
TERMINATION_MESSAGE_BYTES = 4096  # the kubelet's limits: of the file, and of the log's tail
TERMINATION_LOG_TAIL_BYTES = 2048
TERMINATION_LOG_TAIL_LINES = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # Popen: killed by signal N -> -N


@dataclass
class Running:
    """One pod's process and what its status reports need."""

    namespace: str
    name: str
    uid: str
    container: str
    proc: subprocess.Popen
    log_path: Path
    termination_log: Path
    http_port: int
    started_at: str
    fallback_to_logs: bool
    probe_path: str | None = None  # readinessProbe.httpGet.path; None: ready while running
    ready: bool = False
    deleting: bool = False
    reported: bool = False
    status_lock: threading.Lock = field(default_factory=threading.Lock)  # prober vs reaper


class PodRunner:
    def __init__(self, api_client: client.ApiClient, node: str, work_dir: Path, *, cpu: str = "16",
                 memory: str = "64Gi", max_grace_s: float = 10.0):
        self.core = client.CoreV1Api(api_client)
        self.leases = client.CoordinationV1Api(api_client)
        self.node, self.work = node, Path(work_dir)
        self.cpu, self.memory, self.max_grace_s = cpu, memory, max_grace_s
        self.pods: dict[str, Running] = {}  # by uid
        self.handled: set[str] = set()  # uids started (or refused) once: a pod never runs twice
        self.terminating: set[str] = set()
        self.master_ports: dict[tuple, int] = {}
        self.started = itertools.count()  # log file names sort in start order
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.proxy = ThreadingHTTPServer((LOCALHOST, 0), _proxy_handler(self))

    @property
    def progress_url_template(self) -> str:
        """The operator's --progress-url-template: trainer rank 0's /progress through the proxy."""
        return f"http://{LOCALHOST}:{self.proxy.server_address[1]}/{{namespace}}/{{pod}}/progress"

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> PodRunner:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "pids").mkdir(parents=True, exist_ok=True)
        self._register_node()
        for target in (self._renew_lease, self._watch_pods, self._reap, self._probe, self.proxy.serve_forever):
            t = threading.Thread(target=target, daemon=True, name=f"pod-runner-{target.__name__}")
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        """Kill every process (SIGKILL to its group), stop the threads and delete the node."""
        with self.lock:  # a pod starting meanwhile sees `stopping` when it registers (see _start)
            self.stopping.set()
            running = list(self.pods.values())
        for r in running:
            _killpg(r.proc, signal.SIGKILL)
            r.proc.wait()
        self.proxy.shutdown()
        try:
            self.core.delete_node(self.node)
        except ApiException as e:
            if e.status != 404:
                raise

    def processes(self) -> dict[str, int]:
        """pid of each pod process still alive, by "namespace/name"."""
        with self.lock:
            return {f"{r.namespace}/{r.name}": r.proc.pid for r in self.pods.values() if r.proc.poll() is None}

    # ------------------------------------------------------------------------------ the node
    def _register_node(self) -> None:
        body = {"metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node,
                                                             "kubernetes.io/os": "linux", RUNNER_KEY: self.node}},
                "spec": {"taints": [{"key": RUNNER_KEY, "value": self.node, "effect": "NoSchedule"}]}}
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": "110", "ephemeral-storage": "100Gi"}
        self.core.patch_node_status(self.node, {"status": {
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": LOCALHOST}, {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "PodRunnerReady",
                            "message": "e2e pod runner", "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "nodeInfo": {"kubeletVersion": "e2e-pod-runner", "architecture": "amd64", "operatingSystem": "linux",
                         "containerRuntimeVersion": "local://", "kernelVersion": "", "osImage": "",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}}})

    def _renew_lease(self) -> None:
        while not self.stopping.is_set():
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            body = {"metadata": {"name": self.node},
                    "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_S, "renewTime": stamp}}
            try:
                try:
                    self.leases.patch_namespaced_lease(self.node, "kube-node-lease", body)
                except ApiException as e:
                    if e.status != 404:
                        raise
                    self.leases.create_namespaced_lease("kube-node-lease", body)
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; the lease lasts 40 s
                print(f"pod-runner: lease renewal failed: {e}", flush=True)
            self.stopping.wait(RENEW_S)

    # ------------------------------------------------------------------------------ pods
    def _watch_pods(self) -> None:
        while not self.stopping.is_set():
            try:
                # A watch without resourceVersion starts with an ADDED event per existing pod.
                for event in watch.Watch().stream(self.core.list_pod_for_all_namespaces, timeout_seconds=30,
                                                  field_selector=f"spec.nodeName={self.node}"):
                    if self.stopping.is_set():
                        return
                    self._on_pod(event["type"], event["object"])
            except Exception as e:  # noqa: BLE001 - the watch restarts; handling is idempotent by uid
                if not self.stopping.is_set():
                    print(f"pod-runner: watch restarted after {e!r}", flush=True)
                    self.stopping.wait(1.0)

    def _on_pod(self, kind: str, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        with self.lock:
            running = self.pods.get(uid)
            new = uid not in self.handled
            self.handled.add(uid)
        if kind == "DELETED" or pod.metadata.deletion_timestamp:
            with self.lock:
                if uid in self.terminating:
                    return
                self.terminating.add(uid)
            grace = pod.metadata.deletion_grace_period_seconds
            threading.Thread(target=self._terminate, args=(pod, running, grace), daemon=True).start()
        elif new and pod.status.phase not in ("Succeeded", "Failed"):
            try:
                self._start(pod)
            except Exception as e:  # noqa: BLE001 - reported as the pod's failure, like a failed container start
                print(f"pod-runner: cannot start {pod.metadata.namespace}/{pod.metadata.name}: {e!r}", flush=True)
                self._patch_status(pod.metadata.namespace, pod.metadata.name, {
                    "phase": "Failed", "reason": "StartError", "message": f"pod runner: {e}"})

    def _terminate(self, pod: client.V1Pod, running: Running | None, grace: int | None) -> None:
        if running is not None:
            running.deleting = True
            if running.proc.poll() is None:
                _killpg(running.proc, signal.SIGTERM)
                try:
                    running.proc.wait(timeout=min(grace if grace is not None else 30, self.max_grace_s))
                except subprocess.TimeoutExpired:
                    pass
            _killpg(running.proc, signal.SIGKILL)  # also whatever the process left in its group
            running.proc.wait()
            with self.lock:
                self.pods.pop(running.uid, None)
        if pod.metadata.deletion_timestamp:
            try:
                self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                                                body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                            preconditions={"uid": pod.metadata.uid}))
            except ApiException as e:
                if e.status not in (404, 409):
                    raise

    def _start(self, pod: client.V1Pod) -> None:
        ns, name, uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        if len(pod.spec.containers) != 1 or pod.spec.init_containers:
            raise ValueError("runs exactly one container and no init containers")
        c = pod.spec.containers[0]
        if not c.command:
            raise ValueError(f"container {c.name} has no command (images are not run here)")
        sandbox = self.work / "pods" / f"{ns}_{name}_{uid[:8]}"
        mounts = self._mount_volumes(pod, c, sandbox)
        env = self._env(pod, c, mounts)
        http_port = free_port()
        env["KUBERL_HTTP_PORT"] = str(http_port)
        termination_log = sandbox / "termination-log"
        termination_log.parent.mkdir(parents=True, exist_ok=True)
        termination_log.write_bytes(b"")  # the kubelet creates it empty; a new file per start
        env["KUBERL_TERMINATION_LOG"] = str(termination_log)
        if "KUBERL_MASTER_PORT" in env:
            key = (ns, pod.spec.subdomain, env.get("KUBERL_RESTART"))
            with self.lock:
                env["KUBERL_MASTER_PORT"] = str(self.master_ports.setdefault(key, free_port()))
        if env.get("KUBERL_CONFIG") and Path(env["KUBERL_CONFIG"]).is_file():
            path = Path(env["KUBERL_CONFIG"])
            doc = yaml.safe_load(path.read_text()) or {}
            doc.setdefault("logging", {})["port"] = http_port
            path.write_text(yaml.safe_dump(doc, sort_keys=True))
        cwd = Path(_translate(c.working_dir, mounts)) if c.working_dir else sandbox / "root"
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = self.work / "logs" / f"{ns}_{name}_{next(self.started):04d}_{uid[:8]}.log"
        argv = [_expand(a, env) for a in [*c.command, *(c.args or [])]]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=die_with_parent)  # tied to the watch thread: the runner's life
        (self.work / "pids" / f"{ns}_{name}").write_text(f"{proc.pid}\n")  # for kill -- -PID by hand
        probe = c.readiness_probe.http_get if c.readiness_probe is not None else None
        running = Running(ns, name, uid, c.name, proc, log_path, termination_log, http_port, now(),
                          c.termination_message_policy == "FallbackToLogsOnError",
                          probe_path=(probe.path or "/") if probe is not None else None, ready=probe is None)
        with self.lock:
            self.pods[uid] = running
            stopped = self.stopping.is_set()
        if stopped:  # stop() had already listed the processes to kill
            _killpg(proc, signal.SIGKILL)
            proc.wait()
            return
        with running.status_lock:
            self._patch_status(ns, name, {
                "phase": "Running", "podIP": LOCALHOST, "podIPs": [{"ip": LOCALHOST}], "hostIP": LOCALHOST,
                "hostIPs": [{"ip": LOCALHOST}], "startTime": running.started_at,
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": running.started_at}
                               for t in ("PodReadyToStartContainers", "Initialized")]
                + _ready_conditions(running.ready),
                "containerStatuses": [self._running_status(running)]})

    def _probe(self) -> None:
        """HTTP readiness probes, every second, against the pod's HTTP port (its only local port)."""
        while not self.stopping.wait(1.0):
            with self.lock:
                probed = [r for r in self.pods.values() if r.probe_path and not r.deleting and not r.reported]
            for r in probed:
                try:
                    with urllib.request.urlopen(f"http://{LOCALHOST}:{r.http_port}{r.probe_path}", timeout=1) as resp:
                        ready = 200 <= resp.status < 400
                except OSError:  # refused, timed out, or an HTTPError (4xx/5xx)
                    ready = False
                with r.status_lock:
                    if ready == r.ready or r.reported or r.deleting or r.proc.poll() is not None:
                        continue
                    r.ready = ready
                    self._patch_status(r.namespace, r.name, {"conditions": _ready_conditions(ready),
                                                             "containerStatuses": [self._running_status(r)]})

    def _reap(self) -> None:
        """Report each exited process once: Succeeded or Failed with its exit code."""
        while not self.stopping.wait(0.2):
            with self.lock:
                done = [r for r in self.pods.values()
                        if not r.deleting and not r.reported and r.proc.poll() is not None]
            for r in done:
                with r.status_lock:
                    r.reported = True
                    self._report_exit(r)
                _killpg(r.proc, signal.SIGKILL)  # children the container left behind die with it

    def _report_exit(self, r: Running) -> None:
        """Succeeded or Failed with the exit code (128+N for signal N), like the kubelet."""
        code = exit_code(r.proc.returncode)
        terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "startedAt": r.started_at, "finishedAt": now(),
                                      "containerID": f"local://{r.proc.pid}"}
        if r.proc.returncode < 0:
            terminated["signal"] = -r.proc.returncode
        message = _termination_message(r, failed=code != 0)
        if message:
            terminated["message"] = message
        phase = "Succeeded" if code == 0 else "Failed"
        ready = [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now()}
                 for t in ("ContainersReady", "Ready")]
        self._patch_status(r.namespace, r.name, {
            "phase": phase, "conditions": ready,
            "containerStatuses": [self._container_status(r, {"terminated": terminated}, ready=False)]})

    def _running_status(self, r: Running) -> dict:
        return self._container_status(r, {"running": {"startedAt": r.started_at}}, ready=r.ready)

    def _container_status(self, r: Running, state: dict, ready: bool) -> dict:
        return {"name": r.container, "ready": ready, "started": "running" in state, "restartCount": 0,
                "image": "local", "imageID": "local", "containerID": f"local://{r.proc.pid}", "state": state}

    def _patch_status(self, ns: str, name: str, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status})
        except ApiException as e:
            if e.status != 404:
                raise

    # ------------------------------------------------------------------------------ env and volumes
    def _env(self, pod: client.V1Pod, c: client.V1Container, mounts: dict[str, Path]) -> dict[str, str]:
        fields = {"metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
                  "metadata.uid": pod.metadata.uid, "spec.nodeName": self.node, "status.podIP": LOCALHOST,
                  "status.hostIP": LOCALHOST, "spec.serviceAccountName": pod.spec.service_account_name or ""}
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        # The runner's own Python environment plays the container image: its scripts come first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env["HOSTNAME"] = pod.spec.hostname or pod.metadata.name
        for e in c.env or []:
            if e.value_from is None:
                value = _expand(e.value or "", env)
            elif e.value_from.field_ref is not None:
                value = fields[e.value_from.field_ref.field_path]
            elif e.value_from.config_map_key_ref is not None:
                ref = e.value_from.config_map_key_ref
                value = self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace).data[ref.key]
            else:
                raise ValueError(f"env {e.name}: only value, fieldRef and configMapKeyRef are supported")
            env[e.name] = LOCALHOST if SERVICE_DNS.match(value) else _translate(value, mounts)
        return env

    def _mount_volumes(self, pod: client.V1Pod, c: client.V1Container, sandbox: Path) -> dict[str, Path]:
        """mountPath -> local directory, for every volume mount of the container."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Path] = {}
        for m in c.volume_mounts or []:
            v = volumes[m.name]
            if v.config_map is not None:
                local = sandbox / "volumes" / m.name
                local.mkdir(parents=True, exist_ok=True)
                cm = self.core.read_namespaced_config_map(v.config_map.name, pod.metadata.namespace)
                items = {i.key: i.path for i in v.config_map.items or []} or {k: k for k in cm.data or {}}
                for key, rel in items.items():
                    (local / rel).write_text(cm.data[key])
            elif v.persistent_volume_claim is not None:
                local = self._claim_dir(pod.metadata.namespace, v.persistent_volume_claim.claim_name)
            elif v.host_path is not None:
                local = Path(v.host_path.path)
            elif v.empty_dir is not None or v.projected is not None:  # projected: the SA token, left empty
                local = sandbox / "volumes" / m.name
            else:
                raise ValueError(f"volume {m.name}: only configMap, emptyDir, persistentVolumeClaim and hostPath")
            local.mkdir(parents=True, exist_ok=True)
            mounts[m.mount_path] = local / (m.sub_path or "")
        for inner in sorted(mounts, key=len):  # a mount inside another: a symlink where it would appear
            outer = max((m for m in mounts if inner.startswith(m.rstrip("/") + "/")), key=len, default=None)
            if outer is not None:
                link = Path(_translate(inner, {outer: mounts[outer]}))
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(mounts[inner], target_is_directory=True)
        for m in c.volume_mounts or []:  # YAML files from configMaps may name paths under other mounts
            if volumes[m.name].config_map is not None:
                for f in mounts[m.mount_path].glob("*.yaml"):
                    f.write_text(yaml.safe_dump(_translate_doc(yaml.safe_load(f.read_text()), mounts), sort_keys=True))
        return mounts

    def _claim_dir(self, ns: str, claim: str) -> Path:
        """The bound PV's hostPath, else one directory per claim under the work dir."""
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, ns)
            if pvc.spec.volume_name:
                pv = self.core.read_persistent_volume(pvc.spec.volume_name)
                if pv.spec.host_path is not None:
                    return Path(pv.spec.host_path.path)
        except ApiException as e:
            if e.status != 404:
                raise
        return self.work / "pvc" / ns / claim


def _termination_message(r: Running, failed: bool) -> str:
    """What the kubelet reports: the file's tail; the log's tail only for an empty file of a failed
    container under FallbackToLogsOnError (a success never falls back)."""
    try:
        data = r.termination_log.read_bytes()[-TERMINATION_MESSAGE_BYTES:]
    except FileNotFoundError:  # the process removed it: like an empty file
        data = b""
    if not data and failed and r.fallback_to_logs:
        lines = r.log_path.read_bytes().splitlines(keepends=True)[-TERMINATION_LOG_TAIL_LINES:]
        data = b"".join(lines)[-TERMINATION_LOG_TAIL_BYTES:]
    return data.decode(errors="replace")


def _ready_conditions(ready: bool) -> list[dict]:
    return [{"type": t, "status": str(ready), "lastTransitionTime": now()} for t in ("ContainersReady", "Ready")]


def _translate(value: str, mounts: dict[str, Path]) -> str:
    """A path under a mountPath -> the same path under the local dir (longest mountPath wins)."""
    for mount in sorted(mounts, key=len, reverse=True):
        stripped = mount.rstrip("/")
        if value == stripped or value.startswith(stripped + "/"):
            return str(mounts[mount]) + value[len(stripped):]
    return value


def _translate_doc(doc: Any, mounts: dict[str, Path]) -> Any:
    if isinstance(doc, dict):
        return {k: _translate_doc(v, mounts) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_translate_doc(v, mounts) for v in doc]
    return _translate(doc, mounts) if isinstance(doc, str) else doc


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references; $$(VAR) stays literal."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _proxy_handler(runner: PodRunner):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = self.path.split("/", 3)
            with runner.lock:
                port = next((r.http_port for r in runner.pods.values() if len(parts) == 4
                             and (r.namespace, r.name) == (parts[1], parts[2]) and r.proc.poll() is None), None)
            if port is None:
                self.send_error(404, "no running pod of that name on this node")
                return
            try:
                with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/{parts[3]}", timeout=3) as resp:
                    status, body = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            except OSError as e:
                self.send_error(502, str(e))
                return
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.pod_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", default="e2e-runner", help="name of the Node to register")
    parser.add_argument("--work-dir", default="/tmp/kuberl-pod-runner", help="sandboxes, PVC dirs and logs")
    parser.add_argument("--cpu", default="16")
    parser.add_argument("--memory", default="64Gi")
    args = parser.parse_args()
    config.load_kube_config()
    # Ctrl-C / SIGTERM stop the runner. Handlers, not a blocked mask and sigwait: a blocked mask is
    # inherited by the threads and by every pod process they start, which then never saw the
    # SIGTERM of a deletion and ran on until the SIGKILL after the grace period.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runner = PodRunner(client.ApiClient(), args.node, Path(args.work_dir), cpu=args.cpu, memory=args.memory).start()
    print(f"pod runner: node {args.node} Ready; pod logs in {Path(args.work_dir) / 'logs'}\n"
          f"  pods need: tolerations [{{key: {RUNNER_KEY}, operator: Exists}}], "
          f"nodeSelector {{{RUNNER_KEY}: {args.node}}}\n"
          f"  kuberl operator --progress-url-template '{runner.progress_url_template}'", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        runner.stop()


if __name__ == "__main__":
    main()
