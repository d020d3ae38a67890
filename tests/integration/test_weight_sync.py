"""Bucketed weight sync over real gloo groups: bit-identical on every rollout, versioned, stale refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
from procs import job_env, run_ranks, values

from kuberl_runtime.sync import cut_buckets, tp_kind, tp_shard
from kuberl_runtime.sync.buckets import ALIGN, bucket_extent

# One sync per bucket size: smaller than the big tensors (and odd), a few tensors per bucket, all in one.
BUCKETS = [77, 1000, 1 << 20]


def make_weights(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {
        "embed.weight": torch.randn(16, 16, generator=g),  # 1 KiB: spans many small buckets
        "layers.0.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layers.0.q_proj.bias": torch.randn(16, generator=g).to(torch.float16),
        "layers.0.norm.weight": torch.randn(16, generator=g, dtype=torch.float64),
        "step": torch.tensor([version], dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }


def digest(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        n: f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for n, t in weights.items()
    }


class DictEngine:
    """Stands in for a rollout engine: keeps what it is sent."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.weights_version = 0

    def update_weights(self, named_tensors, version: int) -> None:
        for name, t in named_tensors:
            self.weights[name] = t.clone()
        self.weights_version = version


def _worker(env):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.sync import StaleWeights, WeightReceiver, WeightSender

    groups = rendezvous(Topology.from_env(), backend="gloo")  # CPU buffers, also on a GPU machine
    try:
        if groups.is_trainer:
            sender = WeightSender(groups)
            log = []
            for version, bucket in enumerate(BUCKETS, start=1):
                sender.bucket_bytes = bucket
                weights = make_weights(version)
                if version == len(BUCKETS):  # FSDP2-style: DTensor shards, gathered per bucket
                    mesh = DeviceMesh.from_group(groups.trainer, "cpu")
                    weights = {n: distribute_tensor(t, mesh, [Shard(0)]) if t.numel() and t.shape[0] % 2 == 0 else t
                               for n, t in weights.items()}
                stats = sender.send(weights.items(), version)
                log.append((stats.version, stats.buckets, stats.bytes))
            try:
                sender.send(make_weights(1).items(), version=1)  # going back: every rollout must refuse
                log.append("stale accepted")
            except Exception as e:  # noqa: BLE001
                log.append((type(e).__name__, str(e)))
            sender.stop()
            return log
        receiver = WeightReceiver(groups)
        engine, held, seen = DictEngine(), None, []
        while (header := receiver.wait(timeout_s=60)) is not None:
            # The last sync lands as tensor-parallel slices: rollout rank r is TP rank r of 2.
            tp = {"tp_rank": groups.topology.role_rank, "tp_size": 2} if header.version == len(BUCKETS) else {}
            try:
                engine.update_weights(receiver.tensors(header, held, **tp), header.version)
                held = engine.weights_version
                seen.append((header.version, digest(engine.weights)))
            except StaleWeights as e:
                seen.append(("refused", str(e)))
            receiver.finish(header, engine.weights_version)
        return seen
    finally:
        groups.close()


@pytest.mark.integration
def test_every_rollout_gets_bit_identical_weights_and_stale_versions_are_refused():
    t0, t1, r0, r1 = values(run_ranks(_worker, job_env(trainers=2, rollouts=2), timeout=90))
    # The trainer's view: one sync per bucket size, bucket counts as planned.
    for version, bucket in enumerate(BUCKETS, start=1):
        total = sum(t.numel() * t.element_size() for t in make_weights(version).values())
        got_version, buckets, sent = t0[version - 1]
        assert (got_version, sent) == (version, total)
        assert total / bucket < buckets <= total / bucket + len(make_weights(version)) + 1  # + alignment
    # Trainer rank 0 names the refusing rollout; trainer rank 1 fails too (it learns from rank 0).
    assert t0[-1][0] == "WeightsVersionError" and "rollout rank 0" in t0[-1][1] and "holds version 3" in t0[-1][1]
    assert t1[-1][0] == "PeerLost"
    for tp_rank, seen in enumerate((r0, r1)):
        assert [v for v, _ in seen[:-1]] == [1, 2, 3]
        for version, got in seen[:-1]:
            want = make_weights(version)
            if version == len(BUCKETS):  # sliced on receipt: q_proj split by rows, the rest whole
                want = {n: tp_shard(n, t, tp_rank, 2) for n, t in want.items()}
                assert got["layers.0.q_proj.weight"].startswith("torch.bfloat16(8, 16)")
            assert got == digest(want)  # bit for bit, every tensor, every dtype
        assert seen[-1][0] == "refused" and "version 1" in seen[-1][1]


@pytest.mark.parametrize("bucket", [16, 23, 64, 77, 10_000])
def test_buckets_cover_the_stream_exactly_once_and_stay_bounded(bucket):
    weights = make_weights(0)
    pulled = []

    def lazily():  # records when each tensor is pulled: only when its bucket is being filled
        for name, t in weights.items():
            pulled.append(name)
            yield name, t

    covered = {n: 0 for n in weights}
    buckets = list(cut_buckets(lazily(), bucket))
    assert [last for _, last in buckets] == [False] * (len(buckets) - 1) + [True]
    for pieces, _ in buckets:
        assert bucket_extent(pieces) <= bucket  # memory bound: one bucket
        ends = 0
        for p in pieces:
            assert p.bucket_offset >= ends  # no overlap inside the bucket
            if p.tensor_offset == 0 and p.length:
                assert p.bucket_offset % ALIGN == 0  # a tensor starts aligned: viewable in place
            assert p.tensor_offset == covered[p.entry.name]  # in order, no gap, no overlap
            covered[p.entry.name] += p.length
            ends = p.bucket_offset + p.length
    assert covered == {n: t.numel() * t.element_size() for n, t in weights.items()}
    assert pulled == list(weights)


@pytest.mark.parametrize("size", [2, 4])
def test_tensor_parallel_slices_compute_the_full_layers(size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    up_w, up_b = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    down_w, down_b = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    full = torch.relu(x @ up_w.T + up_b) @ down_w.T + down_b
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    assert (tp_kind(up + ".weight"), tp_kind(down + ".weight"), tp_kind("model.norm.weight")) == (
        "column", "row", "replicated")
    partial = []
    for r in range(size):  # column-parallel up, row-parallel down: each rank holds a slice
        h = torch.relu(x @ tp_shard(up + ".weight", up_w, r, size).T + tp_shard(up + ".bias", up_b, r, size))
        partial.append(h @ tp_shard(down + ".weight", down_w, r, size).T)
        assert tp_shard(down + ".bias", down_b, r, size) is down_b  # row-parallel bias: added once, whole
    torch.testing.assert_close(sum(partial) + down_b, full)  # the all-reduce of the row-parallel output
    assert torch.equal(torch.cat([tp_shard(up + ".weight", up_w, r, size) for r in range(size)]), up_w)
    with pytest.raises(ValueError, match="does not split over"):
        tp_shard(up + ".weight", torch.zeros(6, 8), 0, 4)


def _cuda_worker(env):
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.sync import WeightReceiver, WeightSender

    cuda = torch.device("cuda", 0)
    # Both ranks share the one GPU, which NCCL refuses: gloo moves the CUDA buffers instead.
    groups = rendezvous(Topology.from_env(), backend="gloo")
    try:
        if groups.is_trainer:
            sender = WeightSender(groups, bucket_bytes=1000, device=cuda)
            sender.send([(n, t.to(cuda)) for n, t in make_weights(7).items()], version=7)
            sender.stop()
            return None
        receiver = WeightReceiver(groups, device=cuda)
        engine, header = DictEngine(), receiver.wait(timeout_s=60)
        engine.update_weights(receiver.tensors(header), header.version)
        receiver.finish(header, engine.weights_version)
        assert receiver.wait(timeout_s=60) is None
        assert all(t.is_cuda for t in engine.weights.values())
        return digest({n: t.cpu() for n, t in engine.weights.items()})
    finally:
        groups.close()


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_buffers_arrive_bit_identical():
    _, got = values(run_ranks(_cuda_worker, job_env(trainers=1, rollouts=1, gpu=True), timeout=120))
    assert got == digest(make_weights(7))
