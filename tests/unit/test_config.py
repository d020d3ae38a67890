"""RuntimeConfig: defaults that make a short config sensible, derived values, and every rule."""

import pytest
from pydantic import ValidationError

from kuberl_runtime.config import AlgorithmConfig, RuntimeConfig, TrainingConfig

from factories import make_runtime


def config(**override) -> RuntimeConfig:
    return RuntimeConfig.model_validate(make_runtime(**override))


def error_text(**override) -> str:
    with pytest.raises(ValidationError) as e:
        config(**override)
    return "; ".join(".".join(str(x) for x in err["loc"]) + ": " + err["msg"] for err in e.value.errors())


def test_two_fields_are_a_whole_config():
    c = config()
    assert c.algorithm.name == "grpo"
    assert c.algorithm.samples_per_prompt == 8
    assert c.reward.rule == "numeric" and c.reward.kind == "rule"
    assert c.training.mini_batch_size == c.training.global_batch_size == 64
    assert c.sequences_per_step == 64 * 8
    assert c.checkpoint.dir == "/checkpoints" and c.checkpoint.resume
    assert c.rollout.engine == "builtin" and c.rollout.tensor_parallel_size == 1


@pytest.mark.parametrize(
    "algorithm, advantage, kl_coef, kl_in, needs_reference, needs_critic",
    [
        ({"name": "grpo"}, "grpo", 0.0, "loss", False, False),
        ({"name": "ppo"}, "gae", 0.001, "reward", True, True),
        ({"name": "grpo", "advantage": "rloo"}, "rloo", 0.0, "loss", False, False),
        ({"name": "grpo", "klCoef": 0.05}, "grpo", 0.05, "loss", True, False),
        ({"name": "ppo", "klCoef": 0, "klIn": "loss"}, "gae", 0.0, "loss", False, True),
        ({"name": "ppo", "advantage": "grpo"}, "grpo", 0.001, "reward", True, False),
    ],
)
def test_algorithm_derived_defaults(algorithm, advantage, kl_coef, kl_in, needs_reference, needs_critic):
    a = AlgorithmConfig.model_validate(algorithm)
    assert (a.advantage, a.kl_coef, a.kl_in) == (advantage, kl_coef, kl_in)
    assert (a.needs_reference, a.needs_critic) == (needs_reference, needs_critic)


@pytest.mark.parametrize(
    "training, mini",
    [({}, 64), ({"globalBatchSize": 32}, 32), ({"globalBatchSize": 32, "miniBatchSize": 8}, 8)],
)
def test_mini_batch_defaults_to_global(training, mini):
    assert TrainingConfig.model_validate(training).mini_batch_size == mini


def test_yaml_dict_is_camel_case_with_defaults_filled_and_round_trips():
    doc = config(algorithm={"name": "ppo"}).to_yaml_dict()
    assert doc["training"]["miniBatchSize"] == 64
    assert doc["algorithm"]["advantage"] == "gae" and doc["algorithm"]["klCoef"] == 0.001
    assert "mini_batch_size" not in doc["training"]
    assert RuntimeConfig.model_validate(doc) == config(algorithm={"name": "ppo"})


@pytest.mark.parametrize(
    "override, expect",
    [
        ({"model": {"hubId": "Qwen/Qwen2.5-0.5B"}}, "model: Value error, exactly one of path, hubId or init must be set (got path, hubId)"),
        ({"model": {"path": None}}, "model: Value error, exactly one of path, hubId or init must be set (got none)"),
        ({"model": {"path": None, "init": {}}}, "model: Value error, tokenizer: is required with init"),
        ({"model": {"path": None, "tokenizer": "builtin:arithmetic", "init": {"hiddenSize": 66}}},
         "model.init: Value error, hiddenSize: must be divisible by numHeads (4), got 66"),
        ({"model": {"path": None, "tokenizer": "builtin:arithmetic", "init": {"numHeads": 4, "numKvHeads": 3}}},
         "model.init: Value error, numHeads: must be divisible by numKvHeads (3), got 4"),
        ({"data": {"synthetic": {}}}, "data: Value error, exactly one of path or synthetic must be set"),
        ({"data": {"path": None}}, "data: Value error, exactly one of path or synthetic must be set"),
        ({"reward": {"rule": "regex"}}, "reward: Value error, pattern: is required with rule regex"),
        ({"reward": {"rule": "regex", "pattern": "(unclosed"}}, "reward: Value error, pattern: not a valid regular expression (missing ), unterminated subpattern"),
        ({"reward": {"rule": "numeric", "function": "mod:fn"}}, "reward: Value error, set only one of rule, function or model (got rule, function)"),
        ({"reward": {"function": "mod:fn", "model": "/models/rm"}}, "set only one of rule, function or model (got function, model)"),
        ({"reward": {"function": "no-colon"}}, "reward.function: String should match pattern"),
        ({"algorithm": {"recipe": "recipes.py"}}, "algorithm.recipe: String should match pattern"),
        ({"algorithm": {"dualClip": 1.0}}, "algorithm.dualClip: Input should be greater than 1"),
        ({"algorithm": {"advantage": "gae"}}, "algorithm: Value error, advantage: gae needs a critic, which only name ppo trains"),
        ({"algorithm": {"samplesPerPrompt": 1}}, "samplesPerPrompt: must be at least 2 with advantage grpo"),
        ({"algorithm": {"advantage": "rloo", "samplesPerPrompt": 1}}, "samplesPerPrompt: must be at least 2 with advantage rloo"),
        ({"algorithm": {"clipRatioLow": 1.0}}, "algorithm.clipRatioLow: Input should be less than 1"),
        ({"algorithm": {"klType": "k4"}}, "algorithm.klType: Input should be 'k1', 'k2' or 'k3'"),
        ({"training": {"globalBatchSize": 64, "miniBatchSize": 24}}, "training: Value error, miniBatchSize: must divide globalBatchSize (64), got 24"),
        ({"training": {"adamBetas": [0.9]}}, "training.adamBetas.1: Field required"),
        ({"rollout": {"gpuMemoryFraction": 0.99}}, "rollout.gpuMemoryFraction: Input should be less than or equal to 0.95"),
        ({"logging": {"port": 80}}, "logging.port: Input should be greater than or equal to 1024"),
        ({"training": {"learningRate": 1e-6}}, "training.learningRate: Extra inputs are not permitted"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep: Input should be greater than or equal to 1"),
    ],
)
def test_rules_name_the_field(override, expect):
    assert expect in error_text(**override)


@pytest.mark.parametrize(
    "override",
    [
        {"model": {"path": None, "hubId": "Qwen/Qwen2.5-0.5B", "tokenSecretRef": {"name": "hf", "key": "token"}}},
        {"model": {"path": None, "init": {}, "tokenizer": "builtin:arithmetic"}},
        {"data": {"path": None, "synthetic": {"task": "reverse"}}},
        {"reward": {"rule": "regex", "pattern": r"\\boxed\{\d+\}"}},
        {"reward": {"function": "my_rewards.math:score", "pythonPath": ["/code"]}},
        {"reward": {"model": "/models/rm"}},
        {"algorithm": {"name": "ppo", "samplesPerPrompt": 1}},  # gae needs no group
        {"algorithm": {"dualClip": 3.0, "clipRatioHigh": 0.28}},
    ],
)
def test_valid_variants(override):
    config(**override)


@pytest.mark.parametrize(
    "training, samples, ranks, expect",
    [
        ({"globalBatchSize": 8, "microBatchSize": 1}, 8, 3, "training.miniBatchSize: 8 prompts x algorithm.samplesPerPrompt 8 = 64 sequences must split evenly over 3 trainer ranks"),
        ({"globalBatchSize": 8, "microBatchSize": 3}, 8, 8, "training.microBatchSize: must divide the 8 sequences each trainer rank gets per optimizer step, got 3"),
        ({"globalBatchSize": 16, "miniBatchSize": 4, "microBatchSize": 2}, 4, 8, None),  # 16 seqs / 8 ranks = 2
        ({"globalBatchSize": 16, "miniBatchSize": 4, "microBatchSize": 4}, 4, 8, "training.microBatchSize: must divide the 2 sequences each trainer rank gets per optimizer step, got 4"),
    ],
)
def test_check_world(training, samples, ranks, expect):
    c = config(training=training, algorithm={"samplesPerPrompt": samples})
    if expect is None:
        c.check_world(ranks)
    else:
        with pytest.raises(ValueError) as e:
            c.check_world(ranks)
        assert str(e.value) == expect
