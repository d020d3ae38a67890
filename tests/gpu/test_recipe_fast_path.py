"""The recipes on a GPU: a default job gets the fast engines (CUDA graphs, compiled layers, bf16 with
float32 masters), trains, agrees with the torch engine on its first step, and resumes bit-exactly.

Run through the device tool (tests/unit/test_fast_path.py checks the same wiring on CPU):
    PYTHONPATH=runtime:operator python -m pytest --noconftest -m gpu tests/gpu/test_recipe_fast_path.py
"""

from __future__ import annotations

import pytest
import torch

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.engines import FastRolloutEngine, FastTrainEngine
from kuberl_runtime.recipes import Job, run
from kuberl_runtime.tracking import Tracker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def dense_reward(prompt: str, completion: str, row: dict) -> float:
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def config(tmp_path, *, steps=3, **sections) -> RuntimeConfig:
    doc = {
        "model": {
            "init": {"hiddenSize": 128, "numLayers": 3, "numHeads": 8, "numKvHeads": 2, "intermediateSize": 256},
            "tokenizer": "builtin:arithmetic",
        },
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 99, "numExamples": 256}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 8},
        "rollout": {"maxNewTokens": 12},
        "training": {"totalSteps": steps, "globalBatchSize": 8, "microBatchSize": 8, "lr": 1e-4},
        "reward": {"function": f"{__name__}:dense_reward"},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return RuntimeConfig.model_validate(doc)


class Recorder(Tracker):
    def __init__(self, cfg):
        super().__init__(cfg.logging, enabled=False)
        self.steps: list[tuple[int, dict[str, float]]] = []

    def log(self, step, metrics):
        self.steps.append((step, {k: v for k, v in metrics.items() if not k.startswith("time/") and "per_s" not in k}))


def run_recorded(cfg):
    rec = Recorder(cfg)
    run(cfg, tracker=rec)
    return rec.steps


def test_a_default_gpu_job_gets_the_fast_engines(tmp_path):
    job = Job.build(config(tmp_path))
    assert job.device.type == "cuda" and job.dtype == torch.bfloat16
    policy = job.train_engine(job.build_policy(), lr=1e-4)
    rollout = job.rollout_engine(policy)
    assert isinstance(policy, FastTrainEngine) and isinstance(rollout, FastRolloutEngine)
    assert rollout.use_cuda_graph and rollout.model is policy.model
    assert all(p.dtype == torch.float32 for p in policy.module.parameters())


@pytest.mark.parametrize("algorithm", [{}, {"name": "ppo", "samplesPerPrompt": 1, "klCoef": 0.01}], ids=["grpo", "ppo"])
def test_fast_recipe_trains_and_resumes_bit_exactly(tmp_path, algorithm):
    straight = run_recorded(config(tmp_path / "a", algorithm=algorithm))
    assert all(torch.isfinite(torch.tensor(v)) for _, m in straight for v in m.values())
    assert any(m["train/grad_norm"] > 0 for _, m in straight)
    run_recorded(config(tmp_path / "b", steps=2, algorithm=algorithm))
    resumed = run_recorded(config(tmp_path / "b", algorithm=algorithm))
    assert_same(resumed, straight[2:])
    # Step 4 depends on the state after step 3's update: lost masters or Adam moments would show.
    more_a = run_recorded(config(tmp_path / "a", steps=4, algorithm=algorithm))
    more_b = run_recorded(config(tmp_path / "b", steps=4, algorithm=algorithm))
    assert_same(more_a, more_b)


def assert_same(a, b):
    """Equal steps and metrics; within 1e-4 (flash-attention backward may add in any order on GPU)."""
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-7), k


def test_first_step_agrees_with_the_torch_engine(tmp_path):
    """Same rollouts (transformers engine, same seed) and the same bf16 weights: step 1's loss
    statistics agree within bf16 noise (the engines differ in kernels and in float32 masters)."""
    runs = [run_recorded(config(tmp_path / e, steps=1, rollout={"engine": "hf"}, training={"engine": e}))
            for e in ("torch", "fast")]  # fmt: skip
    (_, a), (_, b) = runs[0][0], runs[1][0]
    assert b["reward/mean"] == a["reward/mean"]
    for k in ("train/entropy", "train/grad_norm"):
        assert b[k] == pytest.approx(a[k], rel=0.05), k
