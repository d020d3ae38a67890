"""Recipes end to end on a tiny model: GRPO (with and without a reference), PPO with a critic,
custom recipes by module:function, and the metrics every recipe reports."""

from __future__ import annotations

import pytest
import torch

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.recipes import Job, resolve_recipe

from recipe_runs import run_recorded, runtime_config


def tiny_config(tmp_path, **sections) -> RuntimeConfig:
    doc = {
        "model": {
            "init": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "numKvHeads": 1, "intermediateSize": 32},
            "tokenizer": "builtin:arithmetic",
        },
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 4, "numExamples": 64}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 4},
        "rollout": {"maxNewTokens": 3},
        "training": {"totalSteps": 3, "globalBatchSize": 4, "microBatchSize": 8, "lr": 1e-3},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2},
    }
    return runtime_config(doc, **sections)


BASE_METRICS = {"reward/mean", "reward/std", "rollout/response_length", "rollout/tokens_per_s", "train/policy_loss",
                "train/entropy", "train/grad_norm", "train/lr", "time/generate_s", "time/score_s", "time/train_s",
                "time/sync_s", "time/step_s"}


def test_grpo_runs_reports_metrics_and_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path)
    job, steps = run_recorded(cfg)
    assert [s for s, _ in steps] == [1, 2, 3]
    assert BASE_METRICS <= set(steps[-1][1])
    assert all(torch.isfinite(torch.tensor(v)) for _, m in steps for v in m.values())
    assert job.checkpointer.complete_steps() == [2, 3]  # every interval and the last step
    doc = job.progress.document()
    assert doc.state == "succeeded" and doc.step == 3 and doc.last_checkpoint_step == 3


def test_grpo_with_a_reference_reports_kl_and_several_optimizer_steps(tmp_path):
    cfg = tiny_config(tmp_path, algorithm={"klCoef": 0.1}, training={"miniBatchSize": 2, "epochsPerBatch": 2})
    _, steps = run_recorded(cfg)
    m = steps[-1][1]
    assert "train/kl" in m and m["train/kl"] >= 0
    # Off-policy mini-batches: the old log-probs were recomputed, so the ratio moved away from 1.
    assert m["train/ratio_mean"] != 1.0


def test_ppo_trains_policy_and_critic(tmp_path):
    cfg = tiny_config(tmp_path, algorithm={"name": "ppo", "samplesPerPrompt": 1}, training={"microBatchSize": 2})
    job, steps = run_recorded(cfg)
    m = steps[-1][1]
    assert {"critic/value_loss", "critic/grad_norm", "train/kl", "critic/values_mean"} <= set(m)
    assert steps[0][1]["critic/values_mean"] == 0.0  # zero-initialised value head
    assert steps[-1][1]["critic/values_mean"] != 0.0  # ... that learned something
    assert job.checkpointer.complete_steps() == [2, 3]


def test_custom_recipe_by_module_function(tmp_path, monkeypatch):
    (tmp_path / "myrecipe.py").write_text(
        "def loop(job):\n"
        "    rows, prompts = job.next_batch()\n"
        "    job.log(1, {'reward/mean': float(len(prompts))})\n"
        "    job.finish()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(tmp_path, algorithm={"recipe": "myrecipe:loop"})
    _, steps = run_recorded(cfg)
    assert steps == [(1, {"reward/mean": 16.0})]  # 4 prompts x 4 samples


@pytest.mark.parametrize("target", ["nosuch.module:fn", "kuberl_runtime.recipes.grpo:missing"])
def test_bad_recipe_names_the_field(tmp_path, target):
    with pytest.raises(ConfigError) as e:
        resolve_recipe(tiny_config(tmp_path, algorithm={"recipe": target}))
    assert e.value.field == "runtime.algorithm.recipe"


def test_batches_that_do_not_split_over_ranks_are_config_errors(tmp_path):
    cfg = tiny_config(tmp_path, training={"microBatchSize": 3})
    with pytest.raises(ConfigError, match="microBatchSize"):
        Job.build(cfg)


def test_next_batch_repeats_each_prompt_in_consecutive_groups(tmp_path):
    job = Job.build(tiny_config(tmp_path))
    rows, prompts = job.next_batch()
    assert len(rows) == 16
    for g in range(4):
        group = rows[4 * g : 4 * g + 4]
        assert all(r is group[0] for r in group)
        assert all(torch.equal(p, prompts[4 * g]) for p in prompts[4 * g : 4 * g + 4])
