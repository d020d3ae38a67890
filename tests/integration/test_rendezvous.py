"""Rendezvous on real gloo process groups: groups form from the operator's env; missing peers are named."""

from __future__ import annotations

import pytest
from procs import job_env, run_ranks, values

pytestmark = pytest.mark.integration


def _form_groups(env):
    import torch
    import torch.distributed as dist

    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous

    groups = rendezvous(Topology.from_env())
    try:
        out = {"rank": groups.rank, "trainer": None, "sync": None}
        x = torch.ones(1)
        dist.all_reduce(x)  # the world: every process
        out["world_sum"] = int(x.item())
        if groups.trainer is not None:
            t = torch.tensor([float(groups.rank + 1)])
            dist.all_reduce(t, group=groups.trainer)
            out["trainer"] = int(t.item())
        if groups.sync is not None:
            s = torch.tensor([42.0 if groups.rank == 0 else 0.0])
            dist.broadcast(s, src=0, group=groups.sync)
            out["sync"] = int(s.item())
        return out
    finally:
        groups.close()


def test_groups_form_from_the_operator_env():
    got = values(run_ranks(_form_groups, job_env(trainers=2, rollouts=2), timeout=60))
    assert [g["rank"] for g in got] == [0, 1, 2, 3]
    assert all(g["world_sum"] == 4 for g in got)
    # trainer group = ranks 0 and 1 (1 + 2 = 3); rollouts are not in it
    assert [g["trainer"] for g in got] == [3, 3, None, None]
    # sync group = trainer rank 0 + both rollouts; trainer rank 1 is not in it
    assert [g["sync"] for g in got] == [42, None, 42, 42]


def _join(env):
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous

    rendezvous(Topology.from_env()).close()


def test_a_peer_that_never_arrives_is_named():
    # Three processes in the job; trainer rank 1 never starts.
    envs = job_env(trainers=2, rollouts=1, timeout_s=2)
    results = run_ranks(_join, [envs[0], envs[2]], timeout=60)
    for r in results:
        assert r[0] == "error" and r[1] == "PeerLost", r
        assert "trainer rank 1" in r[2] and "never arrived" in r[2] and "after 2 s" in r[2]
        assert r[3] == 75  # EXIT_PEER_LOST: the operator restarts the gang


def test_a_missing_store_names_trainer_rank_0():
    envs = job_env(trainers=1, rollouts=1, timeout_s=1)
    (r,) = run_ranks(_join, [envs[1]], timeout=60)
    assert r[0] == "error" and r[1] == "PeerLost", r
    assert "not reachable within 1 s" in r[2] and "trainer rank 0" in r[2]
    assert r[3] == 75


def _collectives_nobody_joins(env):
    """Trainer rank 0 starts a collective on the trainer group and one on the sync group; trainer rank 1
    and the rollout stay alive but never join (stuck peers). Returns rank 0's groups' collective
    timeout and, for each collective, what it raised as the entry point classifies it."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.errors import describe, exit_code_for

    groups = rendezvous(Topology.from_env(), backend="gloo")
    wait = timedelta(seconds=120)
    try:
        if groups.rank != 0:
            groups.store.wait(["test/done"], wait)
            groups.store.set(f"test/left/{groups.rank}", "1")
            return None
        try:
            works = [dist.all_reduce(torch.ones(4), group=groups.trainer, async_op=True),  # waits to receive
                     dist.broadcast(torch.ones(4), src=0, group=groups.sync, async_op=True)]  # waits to send
            outcomes = []
            for work in works + [None]:
                try:
                    work.wait() if work else dist.all_reduce(torch.ones(1), group=groups.trainer)  # the next one
                    outcomes.append("completed")
                except RuntimeError as e:
                    outcomes.append((str(e), exit_code_for(e), describe(e)))
            return groups.collective_timeout_s, outcomes
        finally:
            groups.store.set("test/done", "1")
            groups.store.wait(["test/left/1", "test/left/2"], wait)  # the store lives on rank 0
    finally:
        groups.close()


def test_a_collective_a_peer_never_joins_fails_at_the_collective_timeout_as_peer_lost():
    # KUBERL_COLLECTIVE_TIMEOUT (10 s here, above the rendezvous timeout) applies to every group; before,
    # the trainer and sync groups had torch's default, 30 minutes for gloo.
    envs = [{**env, "KUBERL_COLLECTIVE_TIMEOUT": "10"} for env in job_env(trainers=2, rollouts=1, timeout_s=8)]
    (timeout_s, (trainer, sync, after)), rank1, rollout = values(run_ranks(_collectives_nobody_joins, envs, timeout=90))
    assert timeout_s == 10 and rank1 is None and rollout is None
    assert "Timed out waiting 10000ms for recv operation to complete" in trainer[0], trainer  # gloo's own text
    assert "Timed out waiting 10000ms for send operation to complete" in sync[0], sync
    assert after[0] == "Application timeout caused pair closure", after  # the group is unusable after it
    for message, code, line in (trainer, sync, after):
        assert code == 75  # EXIT_PEER_LOST: the operator restarts the gang
        assert line.startswith("lost a peer process (RuntimeError: ") and line.endswith(
            "a collective waited past its timeout: another pod of the job failed, hangs or is unreachable "
            "(its own failure is the cause), or was only slow: then raise KUBERL_COLLECTIVE_TIMEOUT"), line
