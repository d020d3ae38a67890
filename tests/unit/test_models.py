"""Model building: seeded random init, critic from the policy, frozen reference, clear load errors."""

from __future__ import annotations

import pytest
import torch

from kuberl_runtime.config import ModelConfig
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.models import build_critic, build_policy, build_reference, resolve_dtype

CPU = torch.device("cpu")


def model_cfg(**init):
    return ModelConfig(
        init={"hiddenSize": 16, "numLayers": 1, "numHeads": 2, "numKvHeads": 1, "intermediateSize": 32, **init},
        tokenizer="builtin:arithmetic",
    )


def flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_policy(model_cfg(seed=1), 45, CPU, torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(flat(a), flat(build_policy(model_cfg(seed=1), 45, CPU, torch.float32)))
    assert not torch.equal(flat(a), flat(build_policy(model_cfg(seed=2), 45, CPU, torch.float32)))
    assert a.training and a.get_input_embeddings().num_embeddings == 45


def test_critic_starts_from_the_policy_with_a_zero_head_and_reference_is_frozen():
    cfg = model_cfg()
    policy = build_policy(cfg, 45, CPU, torch.float32)
    critic = build_critic(cfg, 45, CPU, torch.float32)
    ref = build_reference(cfg, 45, CPU, torch.float32)
    for name, p in policy.base_model.named_parameters():
        assert torch.equal(p, dict(critic.backbone.named_parameters())[name])
    values = critic(input_ids=torch.tensor([[1, 5, 6]]))
    assert values.shape == (1, 3) and torch.count_nonzero(values) == 0
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training


def test_missing_model_directory_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="no config.json") as e:
        build_policy(ModelConfig(path=str(tmp_path)), 45, CPU, torch.float32)
    assert e.value.field == "runtime.model.path"


def test_vocabulary_smaller_than_the_tokenizer_is_rejected():
    with pytest.raises(ConfigError) as e:
        build_policy(model_cfg(vocabSize=10), 45, CPU, torch.float32)
    assert e.value.field == "runtime.model.tokenizer"


def test_dtype_auto():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
