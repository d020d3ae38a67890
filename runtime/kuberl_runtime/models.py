"""Building the models of a run: the policy, the critic (policy backbone + value head), the reference.

    policy = build_policy(cfg.model, tokenizer.vocab_size, device, dtype)
    critic = build_critic(cfg.model, tokenizer.vocab_size, device, dtype)      # PPO only
    ref = build_reference(cfg.model, tokenizer.vocab_size, device, dtype)      # KL only

A model comes from exactly one of `model.path` (a local directory, never a download),
`model.hubId` (downloaded; needs network) or `model.init` (a seeded random init from an
architecture config: demos, tests, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kuberl_runtime.config import ModelConfig, ModelInit
from kuberl_runtime.errors import ConfigError


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs (tensor cores, half the memory), float32 on CPUs (no fast bf16 matmul)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _arch_config(init: ModelInit, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[init.architecture]
    return cls(
        vocab_size=init.vocab_size or vocab_size,
        hidden_size=init.hidden_size,
        num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_heads,
        num_key_value_heads=init.num_kv_heads,
        intermediate_size=init.intermediate_size,
        max_position_embeddings=init.max_position_embeddings,
        tie_word_embeddings=init.tie_word_embeddings,
    )


def _attn(cfg: ModelConfig) -> str:
    return "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation


def build_policy(cfg: ModelConfig, vocab_size: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A causal LM (transformers AutoModelForCausalLM) on `device` in `dtype`, in train mode."""
    from transformers import AutoModelForCausalLM

    if cfg.init is not None:
        # A private RNG stream: the init is the same whatever ran before, and the run's own RNG
        # (sampling, shuffling) is not advanced by building models.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init.seed)
            model = AutoModelForCausalLM.from_config(
                _arch_config(cfg.init, vocab_size), attn_implementation=_attn(cfg), dtype=dtype
            )
    else:
        source, remote = (cfg.hub_id, True) if cfg.hub_id else (cfg.path, False)
        if not remote and not (Path(source) / "config.json").is_file():
            raise ConfigError(
                f"model directory {source!r} does not exist or has no config.json "
                "(mount the checkpoint volume, or set hubId or init)",
                field="runtime.model.path",
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                local_files_only=not remote,
                revision=cfg.revision if remote else None,
                dtype=dtype,
                attn_implementation=_attn(cfg),
                trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load a causal LM from {source!r}: {e}",
                field="runtime.model.hubId" if remote else "runtime.model.path",
            ) from e
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than "
            f"the tokenizer's ({vocab_size})",
            field="runtime.model.tokenizer",
        )
    return model.to(device).train()


class Critic(nn.Module):
    """The policy's backbone with a scalar value head: hidden states (B, L, H) -> values (B, L)."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        # A zero head starts every value at 0: the first advantages are then the plain returns,
        # instead of returns minus noise from a random projection.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


def build_critic(cfg: ModelConfig, vocab_size: int, device: torch.device, dtype: torch.dtype) -> Critic:
    """A critic initialised from the policy's weights (as verl and TRL do); LM head dropped."""
    lm = build_policy(cfg, vocab_size, device, dtype)
    critic = Critic(lm.base_model, lm.config.hidden_size).to(device=device, dtype=dtype)
    critic.config = lm.config
    return critic.train()


def build_reference(cfg: ModelConfig, vocab_size: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the initial policy: the anchor of the KL penalty."""
    return build_policy(cfg, vocab_size, device, dtype).requires_grad_(False).eval()
