"""TorchTrainEngine on one GPU: FSDP2 (one-rank group, bf16 compute over fp32 master weights) against
the plain engine, and the GRPO recipe with the FSDP2 policy (rollout keeps a full copy)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from kuberl_runtime.config import ModelConfig, RuntimeConfig, TrainingConfig
from kuberl_runtime.engines import TorchTrainEngine
from kuberl_runtime.models import build_policy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
INIT = {"hiddenSize": 128, "numLayers": 2, "numHeads": 4, "numKvHeads": 2, "intermediateSize": 256}


@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD


def model(dtype=torch.float32):
    return build_policy(ModelConfig(init=INIT, tokenizer="builtin:arithmetic"), 45, torch.device("cuda"), dtype)


def batch(n=16):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 45, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, 45, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g) for _ in range(n)]
    return prompts, responses


def test_fsdp2_logprobs_and_step_match_the_plain_engine(group):
    cfg = TrainingConfig(globalBatchSize=1, microBatchSize=4, logprobChunkSize=64, gradientCheckpointing=True)
    fsdp = TorchTrainEngine(model(), cfg, lr=1e-3, pad_token_id=0, process_group=group, fsdp=True)
    plain = TorchTrainEngine(model(), cfg, lr=1e-3, pad_token_id=0)
    assert fsdp.fsdp and not plain.fsdp
    prompts, responses = batch()
    a = torch.cat(fsdp.forward(prompts, responses).logprobs)
    b = torch.cat(plain.forward(prompts, responses).logprobs)
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # bf16 compute vs float32

    def loss_fn(mb):
        return -(mb.logprobs * mb.weight)[mb.mask].sum(), {"lp": mb.logprobs.detach()[mb.mask].mean()}

    m = fsdp.train_step(prompts, responses, {}, loss_fn)
    assert torch.isfinite(torch.tensor(m["grad_norm"])) and m["grad_norm"] > 0
    full = dict(fsdp.named_weights())
    assert set(full) == {n for n, _ in plain.module.named_parameters()}
    assert all(not hasattr(t, "full_tensor") for t in full.values())
    after = torch.cat(fsdp.forward(prompts, responses).logprobs)
    assert after.mean() > a.mean()  # the step raised the log-probs it was asked to raise


def test_grpo_recipe_with_fsdp2_policy(group, tmp_path):
    from kuberl_runtime.recipes import Job
    from kuberl_runtime.recipes.grpo import grpo

    cfg = RuntimeConfig.model_validate({
        "model": {"init": INIT, "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 4, "numExamples": 64}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 4, "klCoef": 0.01},
        "rollout": {"maxNewTokens": 4},
        "training": {"totalSteps": 3, "globalBatchSize": 4, "microBatchSize": 8, "lr": 1e-3},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2},
    })
    job = Job.build(cfg, group=group)
    grpo(job)
    assert job.last_metrics["train/kl"] >= 0 and job.progress.document().step == 3
    assert job.checkpointer.complete_steps() == [2, 3]
