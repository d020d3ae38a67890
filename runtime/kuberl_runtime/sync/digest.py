"""Weight digests: prove that a rollout runs exactly the trainer's weights, tensor by tensor.

    KUBERL_SYNC_DIGEST_DIR=/tmp/digests kuberl local job.yaml

With the variable set, trainer rank 0 writes `trainer-v<version>.json` with the SHA-256 of every
tensor it sent (hashed from the train engine's own tensors, before packing), and every rollout
writes `rollout-<rank>-v<version>.json` hashed from its engine's parameters after loading. Equal
files mean a bit-exact transfer. Costs a hash of the model per sync; off by default.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

ENV_DIGEST_DIR = "KUBERL_SYNC_DIGEST_DIR"


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{hashlib.sha256(data).hexdigest()}"


def digest_dir() -> Path | None:
    d = os.environ.get(ENV_DIGEST_DIR)
    return Path(d) if d else None


def tee_digests(named: Iterable[tuple[str, torch.Tensor]], into: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (name, tensor) through, recording each tensor's digest (FSDP2 shards: the gathered whole)."""
    for name, t in named:
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        into[name] = tensor_digest(t)
        yield name, t


def write_digest(who: str, version: int, digests: dict[str, str]) -> None:
    d = digest_dir()
    if d is None:
        return
    d.mkdir(parents=True, exist_ok=True)
    doc = {"who": who, "version": version, "pid": os.getpid(), "tensors": digests}
    tmp = d / f".{who}-v{version}.json.tmp"
    tmp.write_text(json.dumps(doc, sort_keys=True))
    tmp.replace(d / f"{who}-v{version}.json")  # readers never see a half-written file
