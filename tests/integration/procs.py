"""Spawning real processes for the distributed runtime tests: env like the operator's, free ports.

    results = run_ranks(worker, job_env(trainers=2, rollouts=2), timeout=60)

`worker(rank_env) -> picklable` runs in its own process (forked from a fork server) with the
operator's environment for its rank; results come back in rank order. An exception in a worker is
returned as ("error", type name, message, exit code) so tests can assert on it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from queue import Empty
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
