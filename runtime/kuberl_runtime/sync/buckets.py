"""Buckets: a stream of named tensors cut into fixed-size byte buckets, pulled lazily.

    for pieces, last in cut_buckets(train_engine.named_weights(), bucket_bytes=256 << 20):
        ...   # Piece(entry, data, tensor_offset, length, bucket_offset)

Tensors are laid end to end in the order they come (each starting 16-byte aligned) and the stream
is cut every `bucket_bytes`, so
a tensor larger than a bucket spans several buckets and a bucket may hold many small tensors. The
input is consumed lazily: a tensor is pulled (and, for an FSDP2 DTensor shard, gathered) only when
the bucket being filled reaches it, and dropped once its last byte is packed, so what is held
beyond the model is the bucket plus at most one tensor. Bytes are copied as bytes (uint8 views):
bit-exact for every dtype, and one buffer carries mixed dtypes. No torch.distributed calls here
except `full_tensor()` on DTensor inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix: "bfloat16"

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> Entry:
        return cls(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.torch_dtype).element_size()


class Piece(NamedTuple):
    entry: Entry
    data: torch.Tensor | None  # the tensor's flat uint8 bytes (None once sent over the wire)
    tensor_offset: int  # first byte inside the tensor
    length: int  # bytes
    bucket_offset: int  # where the piece sits in its bucket (a tensor's first piece is ALIGN-aligned)


ALIGN = 16  # a tensor starts on this boundary in its bucket, so receivers can view it in place


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's data (a copy only when it is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 shards are DTensors, gathered here (collective over their mesh)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def cut_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, max_pieces: int | None = None
) -> Iterator[tuple[list[Piece], bool]]:
    """(pieces, is_last) per bucket; each bucket's pieces end within `bucket_bytes`.

    A tensor starts at an ALIGN-aligned bucket offset (a few padding bytes at most), so a receiver
    can view a tensor that lies whole in one bucket without copying it. A tensor of at least half a
    bucket gets buckets of its own (one slice each), which the sender transmits straight from the
    tensor, without packing. `max_pieces` caps the pieces of a bucket. The last bucket may be empty.
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
    it = iter(named_tensors)
    entry, data, offset = None, None, 0
    while True:
        pieces, fill = [], 0
        while True:
            if entry is None:
                item = next(it, None)
                if item is None:
                    yield pieces, True
                    return
                t = full_tensor(item[1])
                entry, data, offset = Entry.of(item[0], t), as_bytes(t), 0
            if max_pieces is not None and len(pieces) >= max_pieces:
                break
            if entry.nbytes == 0:  # nothing to send, only the name, shape and dtype
                pieces.append(Piece(entry, data, 0, 0, fill))
                entry = data = None
                continue
            big = 2 * entry.nbytes >= bucket_bytes
            if big and offset == 0 and pieces:
                break  # a big tensor gets buckets of its own: it travels from where it lies
            start = -(-fill // ALIGN) * ALIGN if offset == 0 else fill  # tensors start aligned
            if start >= bucket_bytes:
                break  # full: the pending tensor continues in the next bucket
            n = min(bucket_bytes - start, entry.nbytes - offset)
            pieces.append(Piece(entry, data, offset, n, start))
            fill, offset = start + n, offset + n
            if offset == entry.nbytes:
                entry = data = None
            if big:
                break
        yield pieces, False


def bucket_extent(pieces) -> int:
    """Bytes a bucket occupies on the wire: its last piece's end, alignment padding included."""
    return max((p[4] + p[3] for p in pieces), default=0)
