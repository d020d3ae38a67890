"""Reference and critic servers on a GPU pick the engine a single trainer rank picks (the fast one
where it supports the model) and answer over HTTP what the colocated engines of `Job` compute."""

from __future__ import annotations

import pytest
import torch

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.recipes.common import Job
from kuberl_runtime.recipes.ppo import value_loss_fn
from kuberl_runtime.remote_roles import RemoteCritic, RemoteReference
from kuberl_runtime.critic_server import CriticService
from kuberl_runtime.role_servers import ReferenceService, RoleServer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def make_cfg(tmp_path) -> RuntimeConfig:
    return RuntimeConfig.model_validate({
        "model": {"init": {"architecture": "qwen2", "hiddenSize": 128, "numLayers": 2, "numHeads": 4,
                           "numKvHeads": 2, "intermediateSize": 256}, "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 9, "numExamples": 16}},
        "algorithm": {"name": "ppo", "samplesPerPrompt": 1, "klCoef": 0.1},
        "training": {"totalSteps": 2, "globalBatchSize": 8, "microBatchSize": 4, "lr": 1e-4, "criticLr": 1e-4},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "resume": False},
    })  # fmt: skip


def batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 20, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, 20, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g) for _ in range(n)]
    return prompts, responses


def test_reference_and_critic_servers_on_a_gpu_equal_the_colocated_engines(tmp_path):
    cfg = make_cfg(tmp_path)
    device = torch.device("cuda", torch.cuda.current_device())
    job = Job.build(cfg)
    prompts, responses = batch()

    ref = ReferenceService(cfg, device)
    ref.start()
    local_ref = job.reference_engine()
    assert type(ref.engine) is type(local_ref)
    server = RoleServer(ref, host="127.0.0.1").start()
    try:
        got = RemoteReference([f"127.0.0.1:{server.port}"]).forward(prompts, responses).logprobs
    finally:
        server.close()
    want = local_ref.forward(prompts, responses).logprobs
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float().cpu(), rtol=0, atol=1e-5)

    critic = CriticService(cfg, device)
    critic.start()
    local_critic = job.train_engine(job.build_critic(), lr=cfg.training.critic_lr)
    assert type(critic.engine) is type(local_critic)
    server = RoleServer(critic, host="127.0.0.1").start()
    try:
        remote = RemoteCritic([f"127.0.0.1:{server.port}"])
        values = remote.forward(prompts, responses).values
        extras = {"old_values": values, "returns": [torch.ones_like(v) for v in values]}
        got_stats = remote.train_step(prompts, responses, extras)
        after = remote.forward(prompts, responses).values
    finally:
        server.close()
    want_values = local_critic.forward(prompts, responses).values
    for g, w in zip(values, want_values):
        torch.testing.assert_close(g, w.float().cpu(), rtol=0, atol=1e-5)
    want_stats = local_critic.train_step(prompts, responses, extras, value_loss_fn(cfg.algorithm))
    assert got_stats["value_loss"] == pytest.approx(want_stats["value_loss"], rel=1e-5)
    for g, w in zip(after, local_critic.forward(prompts, responses).values):
        torch.testing.assert_close(g, w.float().cpu(), rtol=0, atol=1e-5)
