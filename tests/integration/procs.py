"""Spawning real processes for the distributed runtime tests: env like the operator's, free ports.

    results = run_ranks(worker, job_env(trainers=2, rollouts=2), timeout=60)
    stop_tree(popen)    # a `kuberl-runtime`/`kuberl local` subprocess and every process it started

`worker(rank_env) -> picklable` runs in its own process (forked from a fork server) with the
operator's environment for its rank; results come back in rank order. An exception in a worker is
returned as ("error", type name, message, exit code) so tests can assert on it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import time
import traceback
from queue import Empty
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> dict[int, int]:
    """The live processes below `pid` (children, grandchildren, ...), from /proc's parent links:
    {pid: start time}, the start time telling a reused pid from the process seen here.

    A pod's processes are not in its process group or session (the launcher gives each its own), so
    signalling the group would miss them."""
    procs = {int(e): st for e in os.listdir("/proc") if e.isdigit() and (st := _stat(e)) is not None}
    found: dict[int, int] = {}
    frontier = {pid}
    while frontier:
        frontier = {child for child, (parent, _) in procs.items() if parent in frontier and child not in found}
        found.update({child: procs[child][1] for child in frontier})
    return found


def stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """End `proc` and every process it started: SIGTERM first (a pod's shutdown, in which
    kuberl-runtime stops its own processes), SIGKILL to whatever is left after `grace_s`.

    For test teardown: a test that fails or times out must not leave training processes behind
    (they would wait for their peers, or for a file the test never writes, long after the session)."""
    if proc.poll() is not None:
        return  # its processes, if any outlived it, have another parent now: nothing to find them by
    tree = descendants(proc.pid)  # before the parent goes, for the same reason
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        tree.update(descendants(proc.pid))
        proc.kill()
        proc.wait()
    for pid, started in tree.items():
        if (_stat(pid) or (0, None))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def job_env(trainers: int, rollouts: int, *, timeout_s: int = 30, port: int | None = None,
            gpu: bool = False) -> list[dict[str, str]]:
    """One env per process, as the operator's build_env writes it (one process per pod on CPU).

    Without `gpu`, CUDA_VISIBLE_DEVICES is empty (as in pods with `gpus: 0`). Forked ranks may inherit
    torch's cached device count from the fork server, so CPU tests also pass backend="gloo".
    """
    port = port or free_port()
    world = trainers + rollouts
    envs = []
    for rank in range(world):
        role, role_rank = ("trainer", rank) if rank < trainers else ("rollout", rank - trainers)
        envs.append({
            "KUBERL_ROLE": role,
            "KUBERL_ROLE_RANK": str(role_rank),
            "KUBERL_ROLE_REPLICAS": str(trainers if role == "trainer" else rollouts),
            "KUBERL_RANK": str(rank),
            "KUBERL_WORLD_SIZE": str(world),
            "KUBERL_TRAINER_WORLD_SIZE": str(trainers),
            "KUBERL_ROLLOUT_REPLICAS": str(rollouts),
            "KUBERL_MASTER_ADDR": "127.0.0.1",
            "KUBERL_MASTER_PORT": str(port),
            "KUBERL_PLACEMENT": "disaggregated" if rollouts else "colocated",
            "KUBERL_RENDEZVOUS_TIMEOUT": str(timeout_s),
            "KUBERL_POD_IP": "127.0.0.1",
            **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}),
        })
    return envs


def _child(fn: Callable[[dict[str, str]], Any], env: dict[str, str], queue, index: int) -> None:
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        # Plain pickle bytes: torch's queue reducer would share tensors through file descriptors
        # that vanish with this process.
        queue.put((index, ("ok", pickle.dumps(fn(env)))))
    except BaseException as e:  # noqa: BLE001 - reported to the test, which asserts on it
        from kuberl_runtime.errors import exit_code_for

        queue.put((index, ("error", type(e).__name__, str(e), exit_code_for(e), traceback.format_exc())))


def _context():
    # A fork server imports torch once per test session; every rank is then a cheap fork of it
    # (spawning 4 fresh interpreters that each import torch costs seconds on 2 busy cores).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor", "kuberl_runtime.distributed", "kuberl_runtime.sync"])
    return ctx


def run_ranks(fn: Callable[[dict[str, str]], Any], envs: list[dict[str, str]], timeout: float = 120) -> list[Any]:
    """Run fn once per env in its own process; return [("ok", value) | ("error", ...)] in env order."""
    ctx = _context()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, env, queue, i), daemon=True) for i, env in enumerate(envs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < len(procs):
            # Once a rank failed, its peers may wait forever in a collective: a short grace, then stop.
            failed = any(r[0] == "error" for r in results.values())
            left = min(deadline - time.monotonic(), 10.0 if failed else timeout)
            try:
                index, value = queue.get(timeout=max(left, 0.1))
            except Empty:
                break
            results[index] = ("ok", pickle.loads(value[1])) if value[0] == "ok" else value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    missing = ("error", "Timeout", "no result (hung or killed)", None, f"rank {{i}} gave no result within {timeout} s")
    return [results.get(i, tuple(x.format(i=i) if isinstance(x, str) else x for x in missing)) for i in range(len(procs))]


def values(results: list[Any]) -> list[Any]:
    """The values of an all-ok run; fails with every error's traceback otherwise."""
    errors = [r for r in results if r[0] != "ok"]
    assert not errors, "\n".join(r[4] for r in errors)
    return [r[1] for r in results]
