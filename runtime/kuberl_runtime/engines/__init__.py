"""Engines: generation (`RolloutEngine`) and training (`TrainEngine`) behind small interfaces.

The loop only calls `rollout.generate(prompts, params)`, `rollout.update_weights(named, version)`,
`rollout.sleep()/wake()` and the train engine's `forward`, `train_step` and `named_weights`, so a
remote rollout client or a faster GPU engine drops in by implementing the same protocol.

Two implementations of each: the fast GPU path (FastRolloutEngine: static KV cache and CUDA-graph
decode; FastTrainEngine: bf16 + float32 masters, fused AdamW, packing) and the plain ones
(HFRolloutEngine on any transformers model; TorchTrainEngine: plain torch / DDP / FSDP2).
`use_fast_rollout` / `use_fast_train` (fast_path.py) say which a job gets.
"""

from .base import Generation, RolloutEngine, SamplingParams, TrainEngine
from .fast_path import use_fast_rollout, use_fast_train
from .fast_rollout import FastRolloutEngine
from .fast_train_engine import FastTrainEngine
from .hf_rollout import HFRolloutEngine
from .torch_train import ForwardOut, MicroBatch, TorchTrainEngine, pad_right, token_weights

__all__ = [
    "FastRolloutEngine",
    "FastTrainEngine",
    "ForwardOut",
    "Generation",
    "HFRolloutEngine",
    "MicroBatch",
    "RolloutEngine",
    "SamplingParams",
    "TorchTrainEngine",
    "TrainEngine",
    "use_fast_rollout",
    "use_fast_train",
    "pad_right",
    "token_weights",
]
