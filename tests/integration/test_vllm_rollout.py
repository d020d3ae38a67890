"""The vLLM adapter: a clear ConfigError where vLLM is missing; on a GPU with vLLM, the real thing."""

from __future__ import annotations

import pytest
import torch

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.engines.vllm_rollout import vllm_available
from kuberl_runtime.errors import ConfigError


def config(**model) -> RuntimeConfig:
    return RuntimeConfig.model_validate({
        "model": model or {"init": {"vocabSize": 32}, "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic"}},
        "rollout": {"engine": "vllm", "temperature": 0.0, "cudaGraphs": False, "gpuMemoryFraction": 0.3},
        "training": {"seed": 0},
    })


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_choosing_vllm_without_it_is_a_config_error():
    from kuberl_runtime.rollout_server import build_engine

    with pytest.raises(ConfigError, match=r"vLLM cannot be imported.*kuberl\[vllm\]") as e:
        build_engine(config(), torch.device("cpu"))
    assert e.value.field == "runtime.rollout.engine" and e.value.exit_code == 78


@pytest.mark.gpu
@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_vllm_generates_loads_weights_and_sleeps(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kuberl_runtime.engines import HFRolloutEngine, SamplingParams
    from kuberl_runtime.engines.vllm_rollout import VLLMRolloutEngine

    hf_cfg = Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg).cuda().eval()
    model.save_pretrained(tmp_path)
    cfg = config(path=str(tmp_path), dtype="float32")
    engine = VLLMRolloutEngine.from_config(cfg)
    reference = HFRolloutEngine(model, pad_token_id=0, eos_token_id=1, shares_module=True)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11])]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)

    def same_as_reference():
        got, want = engine.generate(prompts, greedy), reference.generate(prompts, greedy)
        assert [r.tolist() for r in got.response_ids] == [r.tolist() for r in want.response_ids]
        for a, b in zip(got.response_logprobs, want.response_logprobs):
            torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-3)

    same_as_reference()
    with torch.no_grad():  # new weights: vLLM must follow them through update_weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.update_weights(model.named_parameters(), version=1)
    assert engine.weights_version == 1
    same_as_reference()
    engine.sleep()
    engine.wake()
    same_as_reference()
