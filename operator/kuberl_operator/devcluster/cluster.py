"""``LocalCluster``: etcd, kube-apiserver, controller-manager, scheduler and kwok on 127.0.0.1.

    cluster = LocalCluster(state_dir)
    cluster.up()            # builds binaries if needed, returns once nodes are Ready
    cluster.kubeconfig      # admin kubeconfig (system:masters)
    cluster.down()

Every process listens on a random free port, so two clusters can run side by side. A cluster that
belongs to a test session is tied to its parent (own process group, PR_SET_PDEATHSIG, atexit) and
dies with it; a detached cluster (`kuberl dev-cluster up`) records its pids in ``state.json`` for a
later ``down``.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .build import K8S_VERSION, Binaries, ensure_binaries
from .certs import generate_pki, write_kubeconfig
from .nodes import DEFAULT_GPU_POOLS, KWOK_NODE_SELECTOR, GPUPool, build_nodes

# Native gang scheduling (Workload/PodGroup, scheduling.k8s.io/v1alpha2) is alpha in 1.36.
DEFAULT_FEATURE_GATES = {"GenericWorkload": True, "GangScheduling": True}
DEFAULT_RUNTIME_CONFIG = {"scheduling.k8s.io/v1alpha2": "true"}
SERVICE_CIDR = "10.96.0.0/16"
STAGE_FILES = ("node-initialize.yaml", "pod-ready.yaml", "pod-delete.yaml", "pod-fail.yaml",
               "pod-succeed.yaml")
START_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(RuntimeError):
    """The cluster did not come up; the message carries the failing component's log tail."""


def default_state_dir() -> Path:
    return Path(os.environ.get("KUBERL_DEV_CLUSTER_DIR",
                               Path.home() / ".cache" / "kuberl" / "dev-cluster")).expanduser()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1
try:  # looked up here, not in the forked child: a child of a threaded process should call, not load
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the process that started it dies (strictly: the
    thread that started it; start children from one that lasts, as the main thread does)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pid_runs(pid: int, binary: str) -> bool:
    """True when ``pid`` is alive and is still the binary we started (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return cmdline == binary


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting for a (foreign) parent to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not any(line.startswith("State:") and "Z" in line.split()[1:2]
                   for line in status.splitlines())


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class LocalCluster:
    """A local control plane with kwok-simulated GPU nodes, kept under ``state_dir``."""

    state_dir: Path = field(default_factory=default_state_dir)
    gpu_pools: tuple[GPUPool, ...] = DEFAULT_GPU_POOLS
    cpu_nodes: int = 1
    feature_gates: dict[str, bool] = field(default_factory=lambda: dict(DEFAULT_FEATURE_GATES))
    runtime_config: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_RUNTIME_CONFIG))
    tie_to_parent: bool = True
    log: callable = print

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    # ---- paths -------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    # ---- lifecycle ---------------------------------------------------------------------------
    def up(self, timeout: float = 120.0) -> "LocalCluster":
        """Start every component in order and return once all nodes are Ready."""
        if self.is_running():
            raise ClusterError(f"a dev cluster already runs from {self.state_dir}; "
                               "run `kuberl dev-cluster down` first or pick another state dir")
        binaries = ensure_binaries(log=lambda m: self.log(f"[build] {m}"))
        self._reset_state_dir()
        self.pki = generate_pki(self.state_dir / "pki")
        self.ports = {name: free_port() for name in
                      ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")}
        if self.tie_to_parent:
            atexit.register(self.down)
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._start("etcd", self._etcd_args(binaries))
            self._wait_http("etcd", f"http://127.0.0.1:{self.ports['etcd']}/health", deadline)
            self._start("kube-apiserver", self._apiserver_args(binaries))
            self._wait_http("kube-apiserver", f"{self.server}/readyz", deadline, tls=True)
            write_kubeconfig(self.kubeconfig, self.server, self.pki)
            self._start("kube-controller-manager", self._controller_manager_args(binaries))
            self._start("kube-scheduler", self._scheduler_args(binaries))
            self._start("kwok", self._kwok_args(binaries))
            self._write_state()
            self._create_nodes(deadline)
        except BaseException:
            self.down()
            raise
        self.log(f"dev cluster up in {time.monotonic() - started:.1f}s: {self.server}, "
                 f"{len(self.nodes)} nodes, kubeconfig {self.kubeconfig}")
        return self

    def down(self) -> None:
        """Stop every process (reverse start order), including those of a detached cluster."""
        recorded = self._read_state().get("pids", {})
        targets: list[tuple[int, subprocess.Popen | None]] = []
        for name in reversed(START_ORDER):
            proc = self.processes.pop(name, None)
            if proc is not None:
                targets.append((proc.pid, proc))
            elif name in recorded:
                pid, binary = recorded[name]
                if _pid_runs(pid, binary):
                    targets.append((pid, None))
        for pid, proc in targets:
            self._stop(pid, proc)
        if self.state_file.exists():
            self.state_file.unlink()
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)

    def is_running(self) -> bool:
        recorded = self._read_state().get("pids", {})
        return any(_pid_runs(pid, binary) for pid, binary in recorded.values())

    # ---- process handling --------------------------------------------------------------------
    def _reset_state_dir(self) -> None:
        for child in ("etcd", "pki", "logs", "kwok.yaml", "kubeconfig", "state.json"):
            path = self.state_dir / child
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, args: list[str]) -> None:
        log_file = open(self.log_dir / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.state_dir, start_new_session=True,
            preexec_fn=die_with_parent if self.tie_to_parent else None)
        log_file.close()
        self.log(f"started {name} (pid {self.processes[name].pid})")

    def _stop(self, pid: int, proc: subprocess.Popen | None, grace: float = 10.0) -> None:
        # Each component leads its own process group; signal the group so helpers die too.
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if proc is not None:
                    if proc.poll() is not None:
                        return
                elif not _pid_alive(pid):
                    return
                time.sleep(0.05)

    def _check_alive(self, name: str) -> None:
        for proc_name, proc in self.processes.items():
            if proc.poll() is not None:
                raise ClusterError(
                    f"{proc_name} exited with code {proc.returncode} while waiting for {name}; "
                    f"last lines of {self.log_dir / proc_name}.log:\n"
                    f"{_log_tail(self.log_dir / f'{proc_name}.log')}")

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def _wait_http(self, name: str, url: str, deadline: float, tls: bool = False) -> None:
        context = self._ssl_context() if tls else None
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with urllib.request.urlopen(url, timeout=5, context=context) as response:
                    if response.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ClusterError(f"{name} not ready at {url} before the deadline ({last}); last lines "
                           f"of its log:\n{_log_tail(self.log_dir / f'{name}.log')}")

    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ports": self.ports,
            "pids": {name: [proc.pid, proc.args[0]] for name, proc in self.processes.items()},
            "version": K8S_VERSION,
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    # ---- component flags ---------------------------------------------------------------------
    def _gates(self) -> list[str]:
        if not self.feature_gates:
            return []
        return ["--feature-gates=" + ",".join(
            f"{gate}={str(on).lower()}" for gate, on in sorted(self.feature_gates.items()))]

    def _etcd_args(self, b: Binaries) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [str(b["etcd"]), "--name=kuberl", f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=kuberl={peer}", "--log-level=warn",
                "--unsafe-no-fsync=true",
                # A single member elects itself after one election timeout (default 1 s).
                "--heartbeat-interval=10", "--election-timeout=100",
                "--quota-backend-bytes=4294967296"]

    def _apiserver_args(self, b: Binaries) -> list[str]:
        pki = self.pki
        args = [
            str(b["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.state_dir / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            # Nodes are simulated: the node-lifecycle controller never sees a kubelet remove the
            # not-ready taint that this plugin adds at creation, so nothing would schedule.
            "--disable-admission-plugins=TaintNodesByCondition",
            # As OpenShift enables it: an owner reference with blockOwnerDeletion needs `update` on
            # the owner's finalizers subresource, so the operator's documented RBAC is checked for it.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            # On loopback the "kubernetes" service endpoints would point at 127.0.0.1; skip them.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        args += self._gates()
        if self.runtime_config:
            args.append("--runtime-config=" + ",".join(
                f"{k}={v}" for k, v in sorted(self.runtime_config.items())))
        return args

    def _controller_manager_args(self, b: Binaries) -> list[str]:
        pki = self.pki
        return [
            str(b["kube-controller-manager"]),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.state_dir / 'pki' / 'controller-manager'}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
            *self._gates(),
        ]

    def _scheduler_args(self, b: Binaries) -> list[str]:
        return [
            str(b["kube-scheduler"]),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.state_dir / 'pki' / 'scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
            *self._gates(),
        ]

    def _kwok_args(self, b: Binaries) -> list[str]:
        config = self.state_dir / "kwok.yaml"
        stages = resources.files(__package__) / "stages"
        config.write_text("\n---\n".join(
            (stages / name).read_text() for name in STAGE_FILES))
        return [
            str(b["kwok"]),
            f"--kubeconfig={self.kubeconfig}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_SELECTOR}",
            "--node-ip=10.0.0.1",
            "--cidr=10.244.0.0/16",
            "--node-lease-duration-seconds=40",
            "-v=WARN",
        ]

    # ---- nodes -------------------------------------------------------------------------------
    def _create_nodes(self, deadline: float) -> None:
        from kubernetes import client, config as kube_config

        self.nodes = build_nodes(self.gpu_pools, self.cpu_nodes)
        api_client = kube_config.new_client_from_config(config_file=str(self.kubeconfig))
        with api_client:
            core = client.CoreV1Api(api_client)
            for node in self.nodes:
                core.create_node(node)
            names = {n["metadata"]["name"] for n in self.nodes}
            while True:
                self._check_alive("nodes to become Ready")
                ready = {n.metadata.name for n in core.list_node().items
                         if any(c.type == "Ready" and c.status == "True"
                                for c in (n.status.conditions or []))}
                # The default service account shows that the controller-manager works.
                has_sa = bool(core.list_namespaced_service_account(
                    "default", field_selector="metadata.name=default").items)
                if names <= ready and has_sa:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"nodes not Ready before the deadline: {sorted(names - ready)}; "
                        f"default service account present: {has_sa}; kwok log:\n"
                        f"{_log_tail(self.log_dir / 'kwok.log')}")
                time.sleep(0.2)


def describe(state_dir: Path | None = None) -> dict:
    """The recorded state of a (possibly detached) cluster, with liveness per component."""
    cluster = LocalCluster(state_dir or default_state_dir(), log=lambda _m: None)
    state = cluster._read_state()
    state["alive"] = {name: _pid_runs(pid, binary)
                      for name, (pid, binary) in state.get("pids", {}).items()}
    return state
