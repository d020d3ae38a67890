"""Rendezvous and process groups of a multi-process job, from the environment the operator injects.

    topo = Topology.from_env()
    groups = rendezvous(topo)            # every process of the job calls this once
    groups.trainer                       # FSDP2/DDP group over all trainer ranks (None elsewhere)
    groups.sync                          # {trainer rank 0} + all rollout ranks: weight broadcasts
    groups.store                         # the job's TCPStore (hosted by trainer rank 0)
    groups.close()

Job-wide ranks follow the operator's process layout: trainer processes first (0 .. T-1), then the
rollout replicas (T .. T+R-1), then critic/reference/reward pods. Trainer rank 0 hosts a TCPStore at
KUBERL_MASTER_ADDR:KUBERL_MASTER_PORT; every process checks in there under its rank before the
process group forms, so a peer that never arrives is named (role and rank) when the rendezvous
timeout expires, instead of hanging in torch's own rendezvous. Failures raise `errors.PeerLost`
(exit code 75: the operator restarts the gang).

Backends: gloo on CPU; on GPU machines "cpu:gloo,cuda:nccl", so CUDA buckets travel over NCCL and
small CPU control messages over gloo, with the same code.

Every group (the world, the trainer group, the sync group) gets the same collective timeout,
`collective_timeout(topo)`: how long a collective waits for a peer that is gone or stuck before it
fails (gloo raises "Timed out waiting ...ms"; NCCL's watchdog aborts), the same for every group and
settable per job (KUBERL_COLLECTIVE_TIMEOUT), where torch gives new_group's groups its backend default.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .contract import ENV_RENDEZVOUS_TIMEOUT, Topology
from .errors import PeerLost

ARRIVED = "kuberl/arrived/"  # + job-wide rank -> "role:role_rank"
FAILED = "kuberl/rendezvous_failed"  # trainer rank 0's verdict when the rendezvous times out
FAILED_PEER = "kuberl/rendezvous_failed_peer"  # "role:rank" of the first missing process
FAILED_ACK = "kuberl/rendezvous_failed_ack/"  # + rank: that process has read the verdict
FAILED_GRACE_S = 5.0
POLL_S = 0.05


def describe_rank(rank: int, topo: Topology) -> tuple[str, int]:
    """(role, rank within the role) of a job-wide rank, from the layout the operator uses."""
    if rank < topo.trainer_world_size:
        return "trainer", rank
    for role in ("rollout", "critic", "reference", "reward"):
        first = topo.first_rank_of(role)
        if rank < first + topo.replicas_of(role):
            return role, rank - first
    return "critic/reference/reward", rank - topo.first_rank_of("critic")  # env without the role counts


def collective_timeout(topo: Topology, rendezvous_timeout_s: float | None = None) -> float:
    """Seconds a collective on the job's groups waits for its peers: KUBERL_COLLECTIVE_TIMEOUT (1800 by
    default), but never less than the rendezvous timeout.

    A rank may legitimately sit outside collectives while its peers wait inside one, for as long as
    the work between two collectives takes on it: the longest generation of a step, trainer rank 0's
    requests to the critic pod (the checkpoint's /save) while the other ranks wait for the answer
    in a broadcast, a rank still waiting for role servers to come up. Server discovery is bounded by
    the rendezvous timeout and each HTTP request to a rollout or role pod by this timeout, so a
    shorter collective timeout than the rendezvous one would fail a job that is only slow.
    """
    rendezvous_s = float(topo.rendezvous_timeout_s if rendezvous_timeout_s is None else rendezvous_timeout_s)
    return max(float(topo.collective_timeout_s), rendezvous_s)


def default_backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class Groups:
    """The process groups of this process; `None` for groups it is not a member of."""

    topology: Topology
    rank: int  # job-wide rank of this process
    store: dist.Store
    trainer: dist.ProcessGroup | None
    sync: dist.ProcessGroup | None
    backend: str
    timeout_s: float  # the rendezvous timeout: also bounds waiting for rollout and role servers to come up
    collective_timeout_s: float  # every group's timeout (`collective_timeout`)

    @property
    def is_trainer(self) -> bool:
        return self.rank < self.topology.trainer_world_size

    @property
    def trainer_rank(self) -> int:
        """Rank within the trainer group (-1 outside it)."""
        return self.rank if self.is_trainer else -1

    @property
    def sync_ranks(self) -> list[int]:
        """Job-wide ranks of the sync group: trainer rank 0, then the rollout ranks in order."""
        t = self.topology.trainer_world_size
        return [0, *range(t, t + self.topology.rollout_replicas)]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _connect_store(topo: Topology, rank: int, timeout_s: float) -> dist.Store:
    is_master = rank == 0
    try:
        return dist.TCPStore(
            topo.master_addr,
            topo.master_port,
            world_size=None,
            is_master=is_master,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            use_libuv=True,
        )
    except Exception as e:  # torch raises RuntimeError / DistStoreError / TimeoutError here
        if is_master:
            raise PeerLost(
                f"cannot host the rendezvous store on port {topo.master_port}: {e}", role="trainer", rank=0
            ) from e
        raise PeerLost(
            f"rendezvous store at {topo.master_addr}:{topo.master_port} not reachable within "
            f"{timeout_s:g} s (set {ENV_RENDEZVOUS_TIMEOUT} to wait longer)",
            role="trainer",
            rank=0,
        ) from e


def _wait_for_peers(store: dist.Store, topo: Topology, rank: int, world: int, timeout_s: float) -> None:
    """Poll every rank's check-in key until all are there; name the missing ones on timeout.

    Trainer rank 0 decides: on timeout it publishes its verdict in the store and keeps the store up
    until the processes that did arrive have read it, so every one of them fails with the same
    message (naming the missing peers) instead of "lost the store".
    """
    deadline = time.monotonic() + timeout_s
    missing = list(range(world))
    while True:
        try:
            missing = [r for r in missing if not store.check([f"{ARRIVED}{r}"])]
            if rank != 0 and store.check([FAILED]):
                store.set(f"{FAILED_ACK}{rank}", "1")
                role, rr = store.get(FAILED_PEER).decode().split(":")
                raise PeerLost(store.get(FAILED).decode(), role=role, rank=int(rr))
        except PeerLost:
            raise
        except Exception as e:
            raise PeerLost(f"lost the rendezvous store during rendezvous: {e}", role="trainer", rank=0) from e
        if not missing:
            return
        if rank == 0 and time.monotonic() >= deadline:
            names = [describe_rank(r, topo) for r in missing]
            who = ", ".join(f"{role} rank {rr} (job rank {r})" for (role, rr), r in zip(names, missing))
            role, rr = names[0]
            message = (
                f"rendezvous timed out after {timeout_s:g} s: {len(missing)} of {world} processes never "
                f"arrived: {who} (set {ENV_RENDEZVOUS_TIMEOUT} to wait longer)"
            )
            store.set(FAILED_PEER, f"{role}:{rr}")
            store.set(FAILED, message)
            arrived = [r for r in range(1, world) if r not in missing]
            grace = time.monotonic() + FAILED_GRACE_S
            while time.monotonic() < grace and not all(store.check([f"{FAILED_ACK}{r}"]) for r in arrived):
                time.sleep(POLL_S)
            raise PeerLost(message, role=role, rank=rr)
        if rank != 0 and time.monotonic() >= deadline + FAILED_GRACE_S:
            raise PeerLost(f"rendezvous timed out after {timeout_s:g} s", role="trainer", rank=0)
        time.sleep(POLL_S)


def rendezvous(
    topo: Topology,
    *,
    local_rank: int = 0,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> Groups:
    """Join the job: check in at the store, form the world, the trainer group and the sync group.

    Collective: every process of the job must call it. `local_rank` is the process index inside a
    trainer pod that starts one process per GPU (job-wide rank = KUBERL_RANK + local_rank).
    """
    rank = topo.rank + local_rank
    world = topo.world_size
    timeout_s = float(timeout_s if timeout_s is not None else topo.rendezvous_timeout_s)
    collective = timedelta(seconds=collective_timeout(topo, timeout_s))
    backend = backend or default_backend()
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside the world of {world} processes (KUBERL_RANK/KUBERL_WORLD_SIZE)")
    role, role_rank = describe_rank(rank, topo)

    store = _connect_store(topo, rank, timeout_s)
    store.set(f"{ARRIVED}{rank}", f"{role}:{role_rank}:{os.getpid()}")
    _wait_for_peers(store, topo, rank, world, timeout_s)

    try:
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("kuberl/pg", store),
            rank=rank,
            world_size=world,
            timeout=collective,
        )
        # new_group is collective over the whole world: every rank creates every group, in order.
        # Without a timeout a group gets torch's default for the backend (30 min for gloo and for both legs
        # of cpu:gloo,cuda:nccl), not the world's.
        trainer = dist.new_group(list(range(topo.trainer_world_size)), timeout=collective)
        t = topo.trainer_world_size
        sync_ranks = [0, *range(t, t + topo.rollout_replicas)]
        sync = dist.new_group(sync_ranks, timeout=collective) if topo.rollout_replicas else None
    except (RuntimeError, dist.DistError) as e:
        raise PeerLost(f"forming the process groups failed: {e}", role=role, rank=role_rank) from e
    return Groups(
        topology=topo,
        rank=rank,
        store=store,
        trainer=trainer if rank < t else None,
        sync=sync if rank in sync_ranks and sync is not None else None,
        backend=backend,
        timeout_s=timeout_s,
        collective_timeout_s=collective.total_seconds(),
    )
