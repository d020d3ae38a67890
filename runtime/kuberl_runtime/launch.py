"""Multi-process jobs on one machine, and the entry of non-trainer roles.

    kuberl local examples/ppo-disaggregated.yaml     # `kuberl local` hands multi-process jobs here
    run_local_processes(rljob_dict)                  # -> exit code of the job

Every role replica becomes a local process with the environment the operator would inject into
its pod (role, ranks, world sizes, the rendezvous address 127.0.0.1:<free port>), running the same
code as `kuberl-runtime` in a pod: trainers run the recipe, rollout processes serve generation and
receive weight syncs. Output lines are prefixed with the process's role and rank. The first process
to fail fails the job: its role, rank and exit code are printed, the others get a few seconds to
exit on their own (so a trainer can say which peer it lost), then are terminated; the failure's
exit code is returned (128 + N for a process killed by signal N; of the processes that failed by
then, one that did not merely lose a peer, 75), 0 when all succeed. `supervise` is that loop; a
trainer pod with several GPUs runs it too (`kuberl-runtime` starts one process per GPU).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import contract

GRACE_S = 10.0  # after the first failure, how long the others may take to exit by themselves
TERM_S = 5.0  # after SIGTERM, before SIGKILL
PR_SET_PDEATHSIG = 1
try:  # looked up here: the forked child, before exec, should only call it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def run_role(cfg, topology: contract.Topology) -> None:
    """What a non-trainer pod runs (called by `kuberl-runtime` for KUBERL_ROLE != trainer)."""
    if topology.role == "rollout":
        from .rollout_server import serve_rollout

        serve_rollout(cfg, topology)
        return
    from .role_servers import serve_role  # critic, reference, reward

    serve_role(cfg, topology)


# ------------------------------------------------------------------------------- local launcher


@dataclass
class Proc:
    role: str
    role_rank: int  # the pod index (trainer processes of one pod share it)
    rank: int  # job-wide rank
    env: dict[str, str]
    popen: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        if self.role == "trainer":
            return f"trainer rank {self.rank}"
        # Rollout ranks count engine replicas: a pod of N engines holds ranks index*N .. index*N+N-1.
        local, per_pod = int(self.env.get("LOCAL_RANK", 0)), int(self.env.get(contract.ENV_LOCAL_WORLD_SIZE, 1))
        return f"{self.role} rank {self.role_rank * per_pod + local}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_processes(doc: dict[str, Any], config_path: str, *, master_port: int, job: str = "local",
                   gpu_count: int = 0) -> list[Proc]:
    """One Proc per process, in job-wide rank order, with the env the operator's build_env writes."""
    spec = doc.get("spec") or {}
    roles = spec.get("roles") or {}
    placement = spec.get("placement", "colocated")
    layout, rank = [], 0
    for role in contract.ROLES:
        rs = roles.get(role) if role != "trainer" else roles.get("trainer") or {}
        if rs is None or (role == "rollout" and placement != "disaggregated"):
            continue
        replicas = int(rs.get("replicas", 1))
        if replicas < 1:
            continue
        per_pod = contract.processes_per_pod(role, int(rs.get("gpus", 1)), int(rs.get("tensorParallelSize", 1)))
        layout.append((role, replicas, per_pod, rank))
        rank += replicas * per_pod
    world = rank
    count = {role: replicas * per_pod for role, replicas, per_pod, _ in layout}
    procs = []
    for role, replicas, per_pod, first in layout:
        for index in range(replicas):
            for local in range(per_pod):
                r = first + index * per_pod + local
                env = {
                    contract.ENV_CONFIG: config_path,
                    contract.ENV_JOB: job,
                    contract.ENV_NAMESPACE: "local",
                    contract.ENV_ROLE: role,
                    contract.ENV_ROLE_RANK: str(index),
                    contract.ENV_ROLE_REPLICAS: str(replicas),
                    contract.ENV_RANK: str(first + index * per_pod),
                    contract.ENV_LOCAL_WORLD_SIZE: str(per_pod),
                    contract.ENV_WORLD_SIZE: str(world),
                    contract.ENV_TRAINER_WORLD_SIZE: str(count.get("trainer", 0)),
                    contract.ENV_ROLLOUT_REPLICAS: str(count.get("rollout", 0)),
                    contract.ENV_CRITIC_REPLICAS: str(count.get("critic", 0)),
                    contract.ENV_REFERENCE_REPLICAS: str(count.get("reference", 0)),
                    contract.ENV_REWARD_REPLICAS: str(count.get("reward", 0)),
                    contract.ENV_MASTER_ADDR: "127.0.0.1",
                    contract.ENV_MASTER_PORT: str(master_port),
                    contract.ENV_PLACEMENT: placement,
                    contract.ENV_GPUS: str((roles.get(role) or {}).get("gpus", 1)),
                    contract.ENV_RESTART: "0",
                    contract.ENV_POD_IP: "127.0.0.1",
                    "LOCAL_RANK": str(local),
                    "KUBERL_HTTP_PORT": "0",  # rollout servers: any free port, published in the store
                    "PYTHONUNBUFFERED": "1",
                }
                procs.append(Proc(role, index, r, env))
    _assign_gpus(procs, roles, gpu_count)
    return procs


def _assign_gpus(procs: list[Proc], roles: dict[str, Any], gpu_count: int) -> None:
    """CUDA_VISIBLE_DEVICES per process, as its pod would see GPUs: none for a role with `gpus: 0`,
    distinct ones otherwise (one per trainer process, tensorParallelSize per rollout engine process,
    `gpus` per pod of the other roles). When this machine has too few GPUs for all of them, every
    process runs on the CPU (two ranks on one GPU break NCCL)."""
    def gpus_of(p: Proc) -> int:
        rs = roles.get(p.role) or {}
        return int(rs.get("gpus", 1)) // int(p.env[contract.ENV_LOCAL_WORLD_SIZE])

    want = [1 if p.role == "trainer" else gpus_of(p) for p in procs]
    want = [w if int((roles.get(p.role) or {}).get("gpus", 1)) > 0 else 0 for p, w in zip(procs, want)]
    enough = sum(want) <= gpu_count
    first = 0
    for p, n in zip(procs, want):
        if n and enough:
            p.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(first, first + n))
            first += n
        else:
            p.env["CUDA_VISIBLE_DEVICES"] = ""


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{prefix}] {line}")
        out.flush()
    stream.close()


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # Popen reports death by signal N as -N


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_local_processes(doc: dict[str, Any], *, metrics_file: str | None = None, out=None,
                        grace_s: float = GRACE_S) -> int:
    """Run an RLJob (its YAML document as a dict) as local processes; returns the job's exit code."""
    out = out or sys.stderr
    runtime = dict((doc.get("spec") or {}).get("runtime") or {})
    # Trainer rank 0 serves /progress on logging.port: a free port, so local jobs never collide.
    progress_port = free_port()
    runtime["logging"] = {**(runtime.get("logging") or {}), "port": progress_port}
    with tempfile.TemporaryDirectory(prefix="kuberl-local-") as tmp:
        config_path = str(Path(tmp) / "config.yaml")
        Path(config_path).write_text(yaml.safe_dump(runtime, sort_keys=True))
        name = ((doc.get("metadata") or {}).get("name")) or "local"
        procs = plan_processes(doc, config_path, master_port=free_port(), job=name, gpu_count=_gpu_count())
        roles = ", ".join(f"{sum(p.role == r for p in procs)} {r}" for r in dict.fromkeys(p.role for p in procs))
        gpus = sorted({p.env["CUDA_VISIBLE_DEVICES"] for p in procs} - {""})
        if not gpus and _gpu_count():
            out.write("kuberl local: too few GPUs for one per process (or gpus: 0): running on the CPU\n")
        out.write(f"kuberl local: {len(procs)} processes ({roles}); progress at "
                  f"http://127.0.0.1:{progress_port}/progress\n")
        procs[0].env[contract.ENV_HTTP_PORT] = str(progress_port)  # trainer rank 0: the /progress above
        args = [sys.executable, "-m", "kuberl_runtime.launch"] + (["--metrics-file", metrics_file] if metrics_file else [])
        code, _ = supervise(procs, args, out=out, grace_s=grace_s)
    return code


def _die_with(parent: int):
    """preexec_fn: the child gets SIGKILL when `parent` (this process) dies, however it dies. (Linux
    ties it to the thread that starts the child: supervise() runs in one that waits for them all.)"""
    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the call above
            os._exit(1)
    return preexec if _prctl is not None else None


def supervise(procs: list[Proc], args: list[str], *, out, grace_s: float = GRACE_S,
              label: str = "kuberl local") -> tuple[int, Proc | None]:
    """Start `args` once per Proc (its env over os.environ, output lines prefixed "role-rank"), wait
    for all; the first failure stops the rest. (exit code, the first process that failed or None).
    Also what `kuberl-runtime` runs in a trainer pod with one process per GPU.

    The processes die with this one: killed outright (SIGKILL, the OOM killer) it cannot stop them,
    and they would otherwise run on, or wait for their peers until a timeout, with nobody to report to."""
    pumps = []
    try:
        for p in procs:
            p.popen = subprocess.Popen(args, env={**os.environ, **p.env}, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                       preexec_fn=_die_with(os.getpid()))
            t = threading.Thread(target=_pump, args=(p.popen.stdout, p.name.replace(" rank ", "-"), out), daemon=True)
            t.start()
            pumps.append(t)
        return _watch(procs, out, grace_s, label)
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)


def _watch(procs: list[Proc], out, grace_s: float, label: str) -> tuple[int, Proc | None]:
    while True:
        first = next((p for p in procs if p.popen.poll() not in (None, 0)), None)
        if first is not None:
            out.write(f"{label}: {first.name} (pid {first.popen.pid}) {_describe_exit(first.popen.returncode)}; "
                      "stopping the job\n")
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(q.popen.poll() is None for q in procs):
                time.sleep(0.1)
            # The cause: a process that lost a peer (75) may have exited before the peer whose
            # failure it saw; one that failed otherwise within the grace period is the likelier cause.
            failed = [p for p in procs if p.popen.poll() not in (None, 0)]
            cause = min(failed, key=lambda q: (q.popen.returncode == contract.EXIT_PEER_LOST, q is not first))
            return _exit_code(cause.popen.returncode), cause
        if all(p.popen.poll() == 0 for p in procs):
            return 0, None
        time.sleep(0.1)


def _stop(procs: list[Proc]) -> None:
    """SIGTERM every process still running (its whole session), SIGKILL what outlives TERM_S."""
    alive = [p for p in procs if p.popen is not None and p.popen.poll() is None]
    for p in alive:
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + TERM_S
    for p in alive:
        try:
            p.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait()


def _child_main(argv: list[str]) -> None:
    """A launched process: `kuberl-runtime`'s main, plus the local-only --metrics-file for rank 0."""
    from . import errors
    from .main import load_config, run_trainer

    metrics_file = argv[argv.index("--metrics-file") + 1] if "--metrics-file" in argv else None
    try:
        topology = contract.Topology.from_env()
        cfg = load_config(os.environ.get(contract.ENV_CONFIG))
        if topology.role == "trainer":
            run_trainer(cfg, topology, metrics_file=metrics_file)
        else:
            run_role(cfg, topology)
    except BaseException as exc:  # noqa: BLE001 - the same classification as kuberl-runtime
        if not isinstance(exc, (errors.RuntimeFailure, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
        print(f"kuberl-runtime: {errors.describe(exc)}", file=sys.stderr, flush=True)
        sys.exit(errors.exit_code_for(exc))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
