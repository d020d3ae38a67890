"""Which engines a job runs: the fast GPU path where it applies, the transformers/torch engines elsewhere.

    use_fast_rollout(cfg, device, model)              -> True: FastRolloutEngine, False: HFRolloutEngine
    use_fast_train(cfg, device, model, world_size)    -> True: FastTrainEngine,   False: TorchTrainEngine

`rollout.engine` and `training.engine` pick; their defaults (builtin, auto) mean "fast where it
applies": a CUDA device, a Qwen2 or Llama model, and for training one unsharded trainer process
(FSDP2 shards are not a model the fast step can run, and it has no CPU offload). `fast` forces the
fast engine (also on CPU, eagerly: tests and debugging) and fails with a ConfigError where it cannot
run; `hf` / `torch` force the plain engines. Both functions read only configs, never weights.
"""

from __future__ import annotations

import torch
from torch import nn

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.errors import ConfigError

from .fast_model import FastModel


def use_fast_rollout(cfg: RuntimeConfig, device: torch.device, model: nn.Module) -> bool:
    choice = cfg.rollout.engine
    if choice in ("hf", "vllm"):  # vllm: the caller builds that engine
        return False
    why = FastModel.unsupported(model)
    if choice == "fast":
        if why:
            raise ConfigError(f"rollout.engine fast: {why}; use builtin or hf", field="runtime.rollout.engine")
        return True
    return device.type == "cuda" and why is None


def use_fast_train(cfg: RuntimeConfig, device: torch.device, model: nn.Module, world_size: int) -> bool:
    choice = cfg.training.engine
    if choice == "torch":
        return False
    why = FastModel.unsupported(model)
    if why is None and world_size > 1:
        why = f"{world_size} trainer ranks shard the model with FSDP2, and the fast step runs one unsharded rank"
    if why is None and cfg.training.cpu_offload:
        why = "cpuOffload needs the torch engine"
    if choice == "fast":
        if why:
            raise ConfigError(f"training.engine fast: {why}; use auto or torch", field="runtime.training.engine")
        return True
    return device.type == "cuda" and why is None
