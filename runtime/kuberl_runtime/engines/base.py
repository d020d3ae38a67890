"""The engine interfaces: what the RL loop needs from generation and from training.

Sequences travel as lists of 1-D token tensors (no padding): engines pad or pack internally as
their kernels prefer, and nothing upstream pays for padding it did not ask for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class Generation:
    """Completions of a batch of prompts, one entry per sequence (prompt i sampled n times -> n rows)."""

    prompt_ids: list[torch.Tensor]  # (P_i,) int64
    response_ids: list[torch.Tensor]  # (R_i,) int64, EOS included when generated
    response_logprobs: list[torch.Tensor]  # (R_i,) float32: log-prob of each sampled token under the sampler
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_tokens(self) -> int:
        return int(sum(r.numel() for r in self.response_ids))


class RolloutEngine(Protocol):
    """Generates completions; receives new weights after every update."""

    weights_version: int

    def generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> Generation: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def sleep(self) -> None:
        """Release what generation holds (KV cache, graphs) so training can use the memory."""

    def wake(self) -> None:
        """Re-acquire what sleep() released, before generating again."""


class TrainEngine(Protocol):
    """Holds a model and its optimizer; computes log-probs/values and takes optimizer steps."""

    def forward_logprobs(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-sequence (R_i,) log-probs of the responses (no grad), chunked over the vocabulary."""
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Full (unsharded) weights in the rollout engine's naming, bucket by bucket for FSDP."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
