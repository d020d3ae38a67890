"""PPO's folded value pass (recipes/ppo.py): with one critic step per batch, the critic's update
computes the values GAE needs, and the step equals the one with a separate no-grad value pass.

- One critic step, both ways, through TorchTrainEngine and FastTrainEngine over several
  micro-batches: same values, advantages, returns, critic metrics and critic weights after it.
- The recipe, folded and not, through both train engines: every step's metrics and the policy's and
  critic's checkpointed weights and optimizer state agree.
- Folding is used only where it is exact: epochsPerBatch > 1, several mini-batches, a critic pod or
  a group-relative advantage keep the separate pass (the recipe says which it runs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kuberl_runtime.algorithms import get_advantage
from kuberl_runtime.config import AlgorithmConfig, RuntimeConfig, TrainingConfig
from kuberl_runtime.engines import FastTrainEngine, TorchTrainEngine
from kuberl_runtime.models import Critic
from kuberl_runtime.recipes import Job
from kuberl_runtime.recipes.common import pad, unpad
from kuberl_runtime.recipes.ppo import critic_step_with_gae, ppo, value_loss_fn, value_pass_folds

from recipe_runs import Recorder, Steps, runtime_config

CPU = torch.device("cpu")
FOLD_NOTE = "no separate value pass"


def tiny_critic(seed: int = 0) -> Critic:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    critic = Critic(lm.base_model, cfg.hidden_size)
    critic.config = cfg
    # A random head: values differ from 0 from the start, so GAE and the value clip see them.
    torch.nn.init.normal_(critic.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    return critic


def rollout_batch(n: int = 7, seed: int = 0):
    """Prompts and responses of varied lengths, and (B, T) token rewards: a score on each last token
    and a small per-token KL-like term elsewhere."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 50, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, 50, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g) for _ in range(n)]
    rewards = [0.05 * torch.randn(r.numel(), generator=g) for r in responses]
    for r in rewards:
        r[-1] += torch.rand((), generator=g)
    return prompts, responses, rewards


def engines(kind: str):
    """Two identical critic engines of `kind`, both cutting the batch into several micro-batches."""
    cfg = TrainingConfig(microBatchSize=2, gradClip=1.0)
    critic = tiny_critic()
    if kind == "torch":
        return [TorchTrainEngine(copy.deepcopy(critic), cfg, pad_token_id=0, lr=1e-2) for _ in range(2)]
    return [FastTrainEngine(copy.deepcopy(critic), cfg, pad_token_id=0, lr=1e-2, micro_batch_tokens=24)
            for _ in range(2)]


def micro_batches(engine, prompts, responses) -> int:
    if isinstance(engine, FastTrainEngine):
        return len(engine.step.collate(prompts, responses).micro)
    return len(list(engine._micro_batches(prompts, responses)))


@pytest.mark.parametrize("value_clip", [0.2, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("kind", ["torch", "fast"])
def test_one_critic_step_with_gae_in_its_loss_equals_the_separate_value_pass(kind, value_clip):
    algo = AlgorithmConfig(name="ppo", samplesPerPrompt=1, gamma=0.97, lam=0.9, valueClip=value_clip)
    gae = get_advantage("gae")
    prompts, responses, rewards = rollout_batch()
    separate, folded = engines(kind)
    assert micro_batches(separate, prompts, responses) >= 3
    before = [p.detach().clone() for p in separate.module.parameters()]

    def advantages(values):
        return gae(token_rewards=pad(rewards), mask=pad([torch.ones(r.numel()) for r in responses]).bool(),
                   values=pad(values), group_size=1, gamma=algo.gamma, lam=algo.lam, normalize_std=True)  # fmt: skip

    # The separate pass, as the recipe runs it when it cannot fold: values, GAE, then the update.
    values_a = separate.forward(prompts, responses).values
    adv_a, ret_a = advantages(values_a)
    stats_a = separate.train_step(
        prompts, responses, {"returns": unpad(ret_a, responses), "old_values": values_a}, value_loss_fn(algo)
    )
    # Folded: the update first, GAE's returns inside its loss; the batch's advantages after it.
    values_b, stats_b = critic_step_with_gae(folded, prompts, responses, rewards, algo)
    adv_b, ret_b = advantages(values_b)

    assert any(v.abs().max() > 0.1 for v in values_a)  # the random head: GAE depends on the values
    for a, b in zip(values_a, values_b, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    torch.testing.assert_close(adv_b, adv_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret_b, ret_a, rtol=0, atol=1e-6)
    assert stats_b.keys() == stats_a.keys() and "value_loss" in stats_a
    for k in stats_a:
        assert stats_b[k] == pytest.approx(stats_a[k], rel=1e-6, abs=1e-7), k
    moved = 0.0
    for p0, a, b in zip(before, separate.module.parameters(), folded.module.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        moved = max(moved, float((a.detach() - p0).abs().max()))
    assert moved > 1e-3  # lr 1e-2: the step moved the weights far more than the tolerance


# ------------------------------------------------------------------------------------ the recipe


def dense_reward(prompt: str, completion: str, row: dict) -> float:
    """Share of digits in the completion: varies between samples, so every step has a gradient."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def config(tmp_path, train_engine: str, algorithm: dict | None = None, **training) -> RuntimeConfig:
    doc = {
        "model": {
            "init": {"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "numKvHeads": 2, "intermediateSize": 48},
            "tokenizer": "builtin:arithmetic",
        },
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 9, "numExamples": 64}},
        "algorithm": {"name": "ppo", "samplesPerPrompt": 2, "klCoef": 0.05, "gamma": 0.97, "lam": 0.9,
                      **(algorithm or {})},
        "rollout": {"maxNewTokens": 6, "engine": "hf"},
        "training": {"totalSteps": 3, "globalBatchSize": 4, "microBatchSize": 2, "lr": 1e-3, "criticLr": 1e-2,
                     "engine": train_engine, **training},
        "reward": {"function": f"{__name__}:dense_reward"},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 100},
    }
    return runtime_config(doc)


def run_ppo(cfg: RuntimeConfig, **kwargs) -> tuple[Job, Steps]:
    rec = Recorder(cfg)
    job = Job.build(cfg, tracker=rec, device=CPU)
    ppo(job, **kwargs)
    return job, rec.steps


def saved(job: Job, tmp_path, name: str) -> dict[str, torch.Tensor]:
    """The last checkpoint (policy, critic, their optimizers) as flat name -> tensor."""
    step = job.checkpointer.complete_steps()[-1]
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(job.checkpointer.root / f"step-{step:06d}", out)
    return dict(_flat(torch.load(out, weights_only=False)))


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("train_engine", ["torch", "fast"])
def test_the_recipe_folded_equals_the_recipe_with_a_separate_value_pass(tmp_path, capsys, train_engine):
    job_a, steps_a = run_ppo(config(tmp_path / "separate", train_engine), fold_value_pass=False)
    assert FOLD_NOTE not in capsys.readouterr().out
    job_b, steps_b = run_ppo(config(tmp_path / "folded", train_engine))
    assert FOLD_NOTE in capsys.readouterr().out
    assert [s for s, _ in steps_a] == [s for s, _ in steps_b] == [1, 2, 3]
    assert steps_a[-1][1]["critic/values_mean"] != 0.0  # the critic learned: later steps' GAE used its values
    for (step, a), (_, b) in zip(steps_a, steps_b, strict=True):
        keys = {k for k in a if not k.startswith("time/") and k != "rollout/tokens_per_s"}
        assert keys == {k for k in b if not k.startswith("time/") and k != "rollout/tokens_per_s"}
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (step, k)
    state_a, state_b = saved(job_a, tmp_path, "separate"), saved(job_b, tmp_path, "folded")
    assert state_a.keys() == state_b.keys()
    assert any(k.startswith("critic.") for k in state_a) and any(k.startswith("model.") for k in state_a)
    for k, v in state_a.items():
        torch.testing.assert_close(state_b[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "training, algorithm, remote_critic, folds",
    [
        ({}, {}, False, True),
        ({"epochsPerBatch": 2}, {}, False, False),  # the second epoch's values are not the pass's
        ({"miniBatchSize": 2}, {}, False, False),  # the second mini-batch sees a stepped critic
        ({}, {"advantage": "rloo"}, False, False),  # no GAE: nothing reads the values
        ({}, {}, True, False),  # a critic pod runs value_loss_fn with the targets sent to it
    ],
)
def test_the_value_pass_folds_only_with_one_critic_step_per_batch(tmp_path, training, algorithm, remote_critic, folds):
    cfg = config(tmp_path, "torch", algorithm, **training)
    job = Job.build(cfg, device=CPU, critic=object() if remote_critic else None)
    assert value_pass_folds(job) is folds


@pytest.mark.parametrize("training", [{"epochsPerBatch": 2}, {"miniBatchSize": 2}], ids=["epochs", "minibatches"])
def test_several_critic_steps_per_batch_keep_the_separate_value_pass(tmp_path, capsys, training):
    _, steps = run_ppo(config(tmp_path, "torch", totalSteps=1, **training))
    assert FOLD_NOTE not in capsys.readouterr().out
    assert [s for s, _ in steps] == [1] and "critic/value_loss" in steps[0][1]
