"""Weight sync between pods: trainer rank 0 broadcasts bucketed weights over the sync group.

Trainer side (every trainer rank calls it: gathering FSDP2 shards is collective over the trainer group):

    sender = WeightSender(groups, bucket_bytes=256 << 20)
    sender.send(train_engine.named_weights(), version=step)      # returns once every rollout loaded it

Rollout side (each rollout process, in its main loop):

    receiver = WeightReceiver(groups)
    while (header := receiver.wait()) is not None:               # None: the trainer said stop
        engine.update_weights(receiver.tensors(header), header.version)
        receiver.finish(header, engine.weights_version)

One sync = a header (version, the version it replaces) + the buckets, each preceded by its small
table of contents (which byte ranges of which tensors it holds) + an acknowledgement. The sender
pulls the weights lazily (`buckets.cut_buckets`) and double-buffers: while bucket k is in flight
(an async broadcast) it gathers and packs bucket k+1; a tensor of half a bucket or more travels
straight from its own memory. Receivers double-buffer too, view whole tensors in the bucket buffer
and receive the slices of big tensors into the tensor's own bytes. Memory beyond the model: two
buckets plus the tensor being gathered (sender), two buckets plus the tensor being assembled
(receiver). The pickled tables of contents and headers stay inside the job's own sync group.
Every rollout answers with the version it now holds; a rollout that refused or missed a version
makes `send` raise `WeightsVersionError` naming it. A rollout that is asked to go back to an older
version refuses (`StaleWeights`) and keeps what it has.

Between syncs the rollouts wait on a store key rather than inside a collective, so a long
training step never trips the process-group timeout, and a vanished trainer is noticed at once.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import Groups, describe_rank
from ..errors import PeerLost
from .buckets import Entry, bucket_extent, cut_buckets
from .tensor_parallel import tp_shard

SYNC_KEY = "kuberl/sync/"  # + sync number -> "weights" | "stop"
VERSION_KEY = "kuberl/weights_version"  # the trainer's current weights version
DEFAULT_BUCKET_BYTES = 256 << 20
TOC_BYTES = 64 << 10  # a bucket's table of contents travels in a buffer of this size
MAX_PIECES = 128  # pieces per bucket at most, so the table of contents fits
POLL_S = 0.02


class WeightsVersionError(PeerLost):
    """A rollout rank does not hold the version the trainer just sent (it refused or missed one)."""


class StaleWeights(Exception):
    """Raised on a rollout asked to load a version that is not newer than the one it holds."""


@dataclass
class Header:
    kind: str  # "weights" | "stop"
    version: int = 0
    base_version: int | None = None  # the version this sync replaces (None: the first sync)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


@dataclass
class BucketToc:
    """What one bucket holds: (entry, None, offset in the tensor, length, offset in the bucket)."""

    pieces: list[tuple[Entry, None, int, int, int]]
    last: bool

    @property
    def nbytes(self) -> int:
        return bucket_extent(self.pieces)


def _direct(toc: BucketToc) -> bool:
    """A bucket that is one slice of one tensor travels without packing (see cut_buckets)."""
    if len(toc.pieces) != 1:
        return False
    entry, _, _, n, at = toc.pieces[0]
    return at == 0 and n > 0


def _spans(toc: BucketToc) -> bool:
    """A direct bucket holding part of a tensor that spans buckets: received into the tensor."""
    entry, _, _, n, _ = toc.pieces[0]
    return _direct(toc) and n < entry.nbytes


class _Channel:
    """What sender and receiver share: the groups, devices and the small control messages."""

    def __init__(self, groups: Groups, device: torch.device | None) -> None:
        if groups.sync is None and groups.is_trainer and groups.rank == 0:
            raise ValueError("no sync group: the job has no rollout replicas (placement colocated?)")
        self.groups = groups
        nccl_only = "gloo" not in groups.backend
        self.device = device or torch.device("cuda" if "nccl" in groups.backend else "cpu")
        self.ctrl_device = torch.device("cuda") if nccl_only else torch.device("cpu")
        self.src = 0  # trainer rank 0, global rank 0 and the sync group's first member
        self._bufs: list[torch.Tensor | None] = [None, None]  # the two bucket buffers
        self._tocs = [torch.zeros(TOC_BYTES, dtype=torch.uint8, device=self.ctrl_device) for _ in range(2)]

    def post_toc(self, k: int, toc: BucketToc | None = None):
        """Async broadcast of bucket k's table of contents in a fixed-size buffer (sent or received)."""
        buf = self._tocs[k % 2]
        if toc is not None:
            data = pickle.dumps(toc)
            if len(data) + 8 > TOC_BYTES:
                raise ValueError(f"a bucket's table of contents takes {len(data)} bytes (limit {TOC_BYTES - 8}): "
                                 "parameter names too long?")
            buf[:8].copy_(torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8))
            buf[8 : 8 + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return dist.broadcast(buf, src=self.src, group=self.groups.sync, async_op=True)

    def read_toc(self, k: int, work) -> BucketToc:
        work.wait()
        raw = self._tocs[k % 2].cpu()
        n = int(raw[:8].view(torch.int64).item())
        return pickle.loads(raw[8 : 8 + n].numpy().tobytes())

    def broadcast_object(self, obj) -> object:
        """A small picklable object from trainer rank 0 to the sync group: its length, then its bytes."""
        group = self.groups.sync
        if self.groups.rank == self.src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.ctrl_device)
            length = torch.tensor([payload.numel()], dtype=torch.int64, device=self.ctrl_device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=self.ctrl_device)
        dist.broadcast(length, src=self.src, group=group)
        if self.groups.rank != self.src:
            payload = torch.empty(int(length.item()), dtype=torch.uint8, device=self.ctrl_device)
        dist.broadcast(payload, src=self.src, group=group)
        return obj if self.groups.rank == self.src else pickle.loads(payload.cpu().numpy().tobytes())

    def gather_versions(self, version: int) -> list[int]:
        """Every sync-group member's version, in sync-group order (trainer rank 0 first)."""
        group = self.groups.sync
        mine = torch.tensor([version], dtype=torch.int64, device=self.ctrl_device)
        out = [torch.zeros(1, dtype=torch.int64, device=self.ctrl_device) for _ in self.groups.sync_ranks]
        dist.all_gather(out, mine, group=group)
        return [int(t.item()) for t in out]


@dataclass
class SyncStats:
    version: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    peak_staged_bytes: int = 0  # largest gathered-but-not-yet-sent data held at once (sender)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class WeightSender(_Channel):
    def __init__(self, groups: Groups, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: torch.device | None = None):
        super().__init__(groups, device)
        self.bucket_bytes = bucket_bytes
        self.version: int | None = None  # the version the rollouts hold
        self.syncs = 0
        self.stats = SyncStats()

    @property
    def is_src(self) -> bool:
        return self.groups.rank == self.src

    def _announce(self, kind: str) -> None:
        self.syncs += 1
        self.groups.store.set(f"{SYNC_KEY}{self.syncs}", kind)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Broadcast the weights as `version`; collective over all trainer ranks and all rollouts.

        Every trainer rank iterates `named_tensors` (FSDP2 gathers are collective over the trainer
        group); only trainer rank 0 sends. Returns once every rollout acknowledged `version`.
        """
        t0 = time.perf_counter()
        status = torch.zeros(1, dtype=torch.int64, device=self.ctrl_device)
        error: BaseException | None = None
        nbytes = buckets = 0
        try:
            if self.is_src:
                self._announce("weights")
                self.broadcast_object(Header("weights", version, self.version, self.bucket_bytes))
            nbytes, buckets = self._send_buckets(named_tensors)
            if self.is_src:
                self._check_acks(version)
                self.groups.store.set(VERSION_KEY, str(version))
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other trainers
            error = e
            status.fill_(1)
        if self.groups.trainer is not None and self.groups.topology.trainer_world_size > 1:
            # The other trainer ranks learn the outcome from rank 0 (they are not in the sync group).
            try:
                dist.broadcast(status, src=0, group=self.groups.trainer)
            except (RuntimeError, dist.DistError) as e:
                error = error or PeerLost(f"lost the trainer group after a weight sync: {e}", role="trainer", rank=0)
        if error is not None:
            if isinstance(error, (RuntimeError, dist.DistError)) and not isinstance(error, PeerLost):
                raise PeerLost(f"weight sync of version {version} failed: {error}") from error
            raise error
        if int(status.item()):
            raise PeerLost(f"weight sync of version {version} failed on trainer rank 0", role="trainer", rank=0)
        self.version = version
        self.stats = SyncStats(version, nbytes, buckets, time.perf_counter() - t0, self.stats.peak_staged_bytes)
        return self.stats

    def _check_acks(self, version: int) -> None:
        versions = self.gather_versions(version)
        behind = [(r, v) for r, v in zip(self.groups.sync_ranks[1:], versions[1:]) if v != version]
        if behind:
            rank, held = behind[0]
            role, rr = describe_rank(rank, self.groups.topology)
            more = f" (and {len(behind) - 1} more rollout ranks)" if len(behind) > 1 else ""
            raise WeightsVersionError(
                f"weight sync of version {version} refused: rollout holds version {held}{more}", role=role, rank=rr
            )

    def _send_buckets(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int]:
        bufs = self._bufs  # kept across syncs: allocated once, on first use (a tiny model needs one)
        works: list = [None, None]
        toc_works: list = [None, None]
        nbytes = k = 0
        for k, (pieces, last) in enumerate(cut_buckets(named_tensors, self.bucket_bytes, MAX_PIECES)):
            held = {id(p.data): p.data.numel() for p in pieces if p.data is not None}
            self.stats.peak_staged_bytes = max(self.stats.peak_staged_bytes, sum(held.values()))
            toc = BucketToc([(p.entry, None, p.tensor_offset, p.length, p.bucket_offset) for p in pieces], last)
            nbytes += sum(p.length for p in pieces)
            if not self.is_src:
                continue  # the other trainer ranks only take part in the gathers
            i = k % 2
            if works[i] is not None:
                works[i][0].wait()  # bucket k-2 has left this buffer
            if _direct(toc) and pieces[0].data.device == self.device:
                # One slice of one big tensor: send it from where it lies, no packing copy.
                p = pieces[0]
                payload = p.data[p.tensor_offset : p.tensor_offset + p.length]
            else:
                if bufs[i] is None or bufs[i].numel() < toc.nbytes:
                    bufs[i] = torch.empty(self.bucket_bytes if not last or k else toc.nbytes,
                                          dtype=torch.uint8, device=self.device)
                for p in pieces:
                    bufs[i][p.bucket_offset : p.bucket_offset + p.length].copy_(
                        p.data[p.tensor_offset : p.tensor_offset + p.length]
                    )
                payload = bufs[i][: toc.nbytes]
            if toc_works[i] is not None:
                toc_works[i].wait()
            toc_works[i] = self.post_toc(k, toc)  # both queued behind bucket k-1, maybe still in flight
            works[i] = ((dist.broadcast(payload, src=self.src, group=self.groups.sync, async_op=True), payload)
                        if toc.nbytes else None)
        for w in works:
            if w is not None:
                w[0].wait()
        for w in toc_works:
            if w is not None:
                w.wait()
        return nbytes, k + 1

    def stop(self) -> None:
        """Tell the rollouts the run is over (trainer rank 0 only); their loops return."""
        if self.is_src:
            self._announce("stop")
            self.broadcast_object(Header("stop", self.version or 0, self.version))


class WeightReceiver(_Channel):
    def __init__(self, groups: Groups, device: torch.device | None = None):
        super().__init__(groups, device)
        if groups.sync is None:
            raise ValueError(f"job rank {groups.rank} is not in the sync group")
        self.syncs = 0
        self.target_version: int | None = None  # the trainer's version as last announced
        self.missed: list[tuple[int | None, int]] = []  # (version held, base of a sync) that differed

    def wait(self, timeout_s: float | None = None) -> Header | None:
        """Block until trainer rank 0 starts the next sync; its header, or None when it says stop."""
        key = f"{SYNC_KEY}{self.syncs + 1}"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                if self.groups.store.check([key]):
                    break
            except Exception as e:
                raise PeerLost(f"lost the trainer's rendezvous store while waiting for weights: {e}",
                               role="trainer", rank=0) from e
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no weight sync within {timeout_s:g} s")
            time.sleep(POLL_S)
        self.syncs += 1
        header = self.broadcast_object(None)
        assert isinstance(header, Header)
        if header.kind == "stop":
            return None
        self.target_version = header.version
        return header

    def tensors(self, header: Header, held_version: int | None = None, *, tp_rank: int = 0,
                tp_size: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive the buckets, yielding each tensor as soon as its last byte arrived.

        With `tp_size > 1`, each tensor is this tensor-parallel rank's slice (`tp_shard`): what an
        engine that shards its linears itself loads.

        A tensor that lies whole in one bucket is yielded as a view into the receive buffer: it is
        valid until the next item is requested (engines copy it into their parameters at once;
        keep a tensor longer only by cloning it). Bucket k+1 arrives while bucket k is unpacked.
        Raises `StaleWeights` after draining the transfer (the collective must complete) when
        `held_version` is not older than the header's version; nothing is yielded then.
        """
        if tp_size > 1:
            for name, t in self.tensors(header, held_version):
                yield name, tp_shard(name, t, tp_rank, tp_size)
            return
        stale = held_version is not None and header.version <= held_version
        if held_version is not None and header.base_version is not None and held_version != header.base_version:
            self.missed.append((held_version, header.base_version))
        bufs = self._bufs  # kept across syncs
        staging: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (bytes, bytes filled)

        def receive(toc: BucketToc, i: int):
            if not toc.nbytes:
                return None
            if _spans(toc) and not stale:
                # A slice of a tensor spanning buckets: land it in the tensor's own bytes, no copy.
                entry, _, offset, n, _ = toc.pieces[0]
                data, filled = staging.get(entry.name, (None, 0))
                if data is None:
                    data = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
                staging[entry.name] = (data, filled)
                return dist.broadcast(data[offset : offset + n], src=self.src, group=self.groups.sync, async_op=True)
            if bufs[i] is None or bufs[i].numel() < toc.nbytes:
                bufs[i] = torch.empty(max(toc.nbytes, 0 if toc.last else header.bucket_bytes),
                                      dtype=torch.uint8, device=self.device)
            return dist.broadcast(bufs[i][: toc.nbytes], src=self.src, group=self.groups.sync, async_op=True)

        # Order on the wire: toc 0, bucket 0, toc 1, bucket 1, ...; the next table of contents is
        # always requested before the current bucket is unpacked, so nothing waits on a round trip.
        toc = self.read_toc(0, self.post_toc(0))
        work, k = receive(toc, 0), 0
        toc_work = None if toc.last else self.post_toc(1)
        while True:
            if work is not None:
                work.wait()
            nxt = nxt_work = None
            if not toc.last:
                nxt = self.read_toc(k + 1, toc_work)
                nxt_work = receive(nxt, (k + 1) % 2)
                toc_work = None if nxt.last else self.post_toc(k + 2)
            buf = bufs[k % 2]
            for entry, _, offset, n, at in toc.pieces if not stale else ():
                if _spans(toc):  # already in place (see receive)
                    data, filled = staging.pop(entry.name)
                    if filled + n == entry.nbytes:
                        yield entry.name, data.view(entry.torch_dtype).view(entry.shape)
                    else:
                        staging[entry.name] = (data, filled + n)
                    continue
                if n == entry.nbytes:  # whole in this bucket: no copy
                    view = buf[at : at + n] if n else torch.empty(0, dtype=torch.uint8, device=self.device)
                    yield entry.name, view.view(entry.torch_dtype).view(entry.shape)
                    continue
                data, filled = staging.pop(entry.name, (None, 0))
                if data is None:
                    data = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
                data[offset : offset + n].copy_(buf[at : at + n])
                if filled + n == entry.nbytes:
                    yield entry.name, data.view(entry.torch_dtype).view(entry.shape)
                else:
                    staging[entry.name] = (data, filled + n)
            if toc.last:
                break
            toc, work, k = nxt, nxt_work, k + 1
        if stale:
            raise StaleWeights(f"refusing weights version {header.version}: holding version {held_version}")

    def finish(self, header: Header, held_version: int) -> None:
        """Acknowledge a sync with the version this rollout now holds (trainer rank 0 checks it)."""
        self.gather_versions(held_version)
