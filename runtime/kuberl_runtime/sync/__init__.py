"""Weight sync from the trainer to disaggregated rollout engines (see `broadcast` for the protocol)."""

from .broadcast import (
    DEFAULT_BUCKET_BYTES,
    Header,
    VERSION_KEY,
    StaleWeights,
    SyncStats,
    WeightReceiver,
    WeightSender,
    WeightsVersionError,
)
from .buckets import Entry, Piece, cut_buckets
from .tensor_parallel import tp_kind, tp_shard

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Entry",
    "Piece",
    "cut_buckets",
    "Header",
    "VERSION_KEY",
    "StaleWeights",
    "SyncStats",
    "WeightReceiver",
    "WeightSender",
    "WeightsVersionError",
    "tp_kind",
    "tp_shard",
]
