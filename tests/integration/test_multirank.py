"""Multi-rank training: 2 trainer ranks (DDP over gloo) match 1 rank on the same global batch.

Same model init, same 8 sequences per optimizer step: one rank takes all 8, two ranks take 4 each
(uneven response lengths, so the exact token-count normalisation across ranks matters). After 3
AdamW steps every weight agrees within 2e-5 (float32 on CPU; the difference is summation order in
the gradient all-reduce, amplified a little by Adam's normalisation) and both ranks hold identical
weights.
"""

from __future__ import annotations

import pytest
import torch
from procs import job_env, run_ranks, values

pytestmark = pytest.mark.integration

SEQS, STEPS, VOCAB = 8, 3, 32
TOLERANCE = 2e-5


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    prompts = [torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g) for _ in range(SEQS)]
    responses = [torch.randint(3, VOCAB, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g) for _ in range(SEQS)]
    advantages = [torch.randn(r.numel(), generator=g) for r in responses]
    return prompts, responses, advantages


def _train(env):
    from kuberl_runtime.algorithms import policy_loss
    from kuberl_runtime.config import ModelConfig, ModelInit, TrainingConfig
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.engines import TorchTrainEngine
    from kuberl_runtime.models import build_policy

    topo = Topology.from_env()
    groups = rendezvous(topo) if topo.world_size > 1 else None
    rank, world = (groups.trainer_rank, topo.trainer_world_size) if groups else (0, 1)
    try:
        cfg = ModelConfig(init=ModelInit(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=64, vocab_size=VOCAB, seed=1), tokenizer="builtin:arithmetic")
        model = build_policy(cfg, VOCAB, torch.device("cpu"), torch.float32)
        training = TrainingConfig(global_batch_size=SEQS, micro_batch_size=2, grad_clip=1.0)
        engine = TorchTrainEngine(model, training, lr=1e-2, pad_token_id=0, total_optimizer_steps=STEPS,
                                  process_group=groups.trainer if groups else None)

        def loss_fn(mb):
            loss, stats = policy_loss(mb.logprobs, mb.logprobs.detach() - 0.05, mb.extras["advantages"] * mb.weight,
                                      mb.mask, aggregation="token-sum")
            return loss, {"loss": loss.detach() / mb.weight[mb.mask].sum()}

        norms = []
        for step in range(STEPS):
            prompts, responses, adv = batch(step)
            mine = slice(rank * SEQS // world, (rank + 1) * SEQS // world)
            m = engine.train_step(prompts[mine], responses[mine], {"advantages": adv[mine]}, loss_fn,
                                  aggregation="token-mean")
            norms.append(m["grad_norm"])
        return norms, {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    finally:
        if groups:
            groups.close()


def test_two_ranks_match_one_rank_on_the_same_global_batch():
    (one_norms, one), = values(run_ranks(_train, job_env(trainers=1, rollouts=0), timeout=120))
    (n0, w0), (n1, w1) = values(run_ranks(_train, job_env(trainers=2, rollouts=0), timeout=120))
    initial = _initial_weights()
    assert any(not torch.equal(one[n], initial[n]) for n in one)  # the steps changed the weights
    assert n0 == n1  # the gradient norm is global: the same on both ranks
    torch.testing.assert_close(torch.tensor(n0), torch.tensor(one_norms), rtol=TOLERANCE, atol=TOLERANCE)
    for name in one:
        assert torch.equal(w0[name], w1[name]), name  # DDP keeps the ranks identical
        torch.testing.assert_close(w0[name], one[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name)


def _initial_weights():
    from kuberl_runtime.config import ModelConfig, ModelInit
    from kuberl_runtime.models import build_policy

    cfg = ModelConfig(init=ModelInit(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64, vocab_size=VOCAB, seed=1), tokenizer="builtin:arithmetic")
    return dict(build_policy(cfg, VOCAB, torch.device("cpu"), torch.float32).named_parameters())
