"""Tensor-parallel slicing: the piece of a full weight that tensor-parallel rank r of n holds.

    shard = tp_shard("model.layers.0.self_attn.q_proj.weight", full, rank=1, size=2)

Megatron's rule for transformer blocks: column-parallel linears (q/k/v, gate/up, and the
vocabulary-parallel embedding and LM head) split their output dimension (dim 0 of the weight and
the bias); row-parallel linears (o_proj, down_proj) split their input dimension (dim 1 of the
weight) and keep the bias whole; everything else (norms) is replicated. A column-parallel layer
followed by a row-parallel one then needs a single all-reduce, which is why engines lay out
attention and MLP this way. Names follow transformers' Llama/Qwen2 modules; other names can be
mapped with `rules`.
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["column", "row", "replicated"]

DEFAULT_RULES: dict[str, Kind] = {
    "q_proj": "column",
    "k_proj": "column",
    "v_proj": "column",
    "qkv_proj": "column",
    "gate_proj": "column",
    "up_proj": "column",
    "gate_up_proj": "column",
    "embed_tokens": "column",
    "lm_head": "column",
    "o_proj": "row",
    "down_proj": "row",
}


def tp_kind(name: str, rules: dict[str, Kind] | None = None) -> Kind:
    """column | row | replicated, from the module name before `.weight` / `.bias`."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    return (rules or DEFAULT_RULES).get(module, "replicated")


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int, rules: dict[str, Kind] | None = None) -> torch.Tensor:
    """Rank `rank`'s slice of `full` (a view; contiguous copy only where the slice is strided)."""
    if size == 1:
        return full
    kind = tp_kind(name, rules)
    is_bias = name.endswith(".bias")
    if kind == "replicated" or (kind == "row" and is_bias):
        return full
    dim = 0 if kind == "column" else 1
    if full.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(full.shape)} does not split over {size} ranks")
    return full.chunk(size, dim=dim)[rank].contiguous()
