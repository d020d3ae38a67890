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
