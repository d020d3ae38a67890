"""The built-in engines on a tiny random Qwen2 (CPU, float32): each against the plain computation.

- chunked, packed log-probs/entropy == log_softmax over the full logits of each sequence
- gradient accumulation over micro-batches (and every aggregation) == one big batch
- HFRolloutEngine greedy == transformers generate; sampler log-probs == the train engine's
- update_weights changes what a non-shared engine generates; the colocated engine shares storage
"""

from __future__ import annotations

import copy

import pytest
import torch

from kuberl_runtime.algorithms import aggregate, entropy_from_logits, logprobs_from_logits
from kuberl_runtime.config import ModelConfig, TrainingConfig
from kuberl_runtime.engines import HFRolloutEngine, SamplingParams, TorchTrainEngine, token_weights
from kuberl_runtime.models import build_critic, build_policy

VOCAB = 45
PAD, EOS = 0, 2


def make_model(seed: int = 0, critic: bool = False):
    cfg = ModelConfig(
        init={"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "numKvHeads": 2, "intermediateSize": 64, "seed": seed},
        tokenizer="builtin:arithmetic",
    )
    build = build_critic if critic else build_policy
    return build(cfg, VOCAB, torch.device("cpu"), torch.float32)


def make_engine(model, **training) -> TorchTrainEngine:
    cfg = TrainingConfig(globalBatchSize=1, **{"microBatchSize": 4, "logprobChunkSize": 5, **training})
    return TorchTrainEngine(model, cfg, lr=1e-2, pad_token_id=PAD, total_optimizer_steps=10)


def make_batch(n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g) for _ in range(n)]
    return prompts, responses


def full_logits(model, prompt, response):
    """(R, V) logits predicting each response token, from one unpadded forward."""
    ids = torch.cat([prompt, response])[None]
    return model(input_ids=ids).logits[0, prompt.numel() - 1 : -1]


def test_chunked_logprobs_and_entropy_equal_the_full_computation():
    model = make_model()
    engine = make_engine(model)
    prompts, responses = make_batch()
    out = engine.forward(prompts, responses, entropy=True)
    model.eval()
    with torch.no_grad():
        for p, r, lp, ent in zip(prompts, responses, out.logprobs, out.entropy):
            logits = full_logits(model, p, r)
            torch.testing.assert_close(lp, logprobs_from_logits(logits, r), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent, entropy_from_logits(logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"])
def test_gradient_accumulation_over_micro_batches_equals_one_big_batch(aggregation):
    prompts, responses = make_batch(n=7)
    g = torch.Generator().manual_seed(1)
    coef = [torch.randn(r.numel(), generator=g) for r in responses]

    def loss_fn(mb):  # a linear loss in the log-probs: its aggregate is what the weights define
        return (mb.logprobs * mb.extras["coef"] * mb.weight)[mb.mask].sum(), {}

    grads = {}
    for micro in (2, 3, 7):
        model = make_model()
        engine = make_engine(model, microBatchSize=micro, gradClip=None)
        engine.train_step(prompts, responses, {"coef": coef}, loss_fn, aggregation=aggregation)
        # train_step zeroes gradients before, not after: they are left for inspection.
        grads[micro] = torch.cat([p.grad.flatten() for p in model.parameters()])

    # The reference: one padded (B, T) loss aggregated directly, and its gradient.
    model = make_model()
    model.eval()
    logp = torch.nn.utils.rnn.pad_sequence(
        [logprobs_from_logits(full_logits(model, p, r), r) for p, r in zip(prompts, responses)], batch_first=True
    )
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(r.numel()) for r in responses], batch_first=True)
    c = torch.nn.utils.rnn.pad_sequence(coef, batch_first=True)
    aggregate(logp * c, mask, aggregation).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert expected.abs().max() > 1e-3  # a real gradient, not zeros on both sides
    for micro, got in grads.items():
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4, msg=f"microBatchSize {micro}")


def test_token_weights_sum_to_the_aggregation():
    lengths = [3, 1, 4]
    assert sum(w.sum() for w in token_weights(lengths, "token-mean")).item() == pytest.approx(1.0)
    assert sum(w.sum() for w in token_weights(lengths, "seq-mean-token-mean")).item() == pytest.approx(1.0)
    assert sum(w.sum() for w in token_weights(lengths, "seq-mean-token-sum")).item() == pytest.approx(8 / 3)
    with pytest.raises(ValueError, match="unknown aggregation"):
        token_weights(lengths, "mean-of-nothing")


def test_critic_values_read_at_the_predicting_position():
    critic = make_critic_with_random_head()
    engine = make_engine(critic)
    prompts, responses = make_batch(n=3)
    out = engine.forward(prompts, responses)
    with torch.no_grad():
        for p, r, v in zip(prompts, responses, out.values):
            full = critic(input_ids=torch.cat([p, r])[None])[0]
            torch.testing.assert_close(v, full[p.numel() - 1 : -1], atol=1e-5, rtol=1e-5)


def make_critic_with_random_head():
    critic = make_model(critic=True)
    torch.nn.init.normal_(critic.value_head.weight, generator=torch.Generator().manual_seed(0))
    return critic


def test_greedy_generation_matches_transformers_generate():
    model = make_model(seed=3).eval()
    engine = HFRolloutEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    prompts, _ = make_batch(n=5, seed=4)
    gen = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    for p, r in zip(prompts, gen.response_ids):
        ref = model.generate(p[None], attention_mask=torch.ones_like(p)[None], max_new_tokens=6, do_sample=False,
                             min_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS)[0, p.numel():]
        assert r.tolist() == ref.tolist()


def test_sampler_logprobs_match_the_train_engine_and_stop_at_eos():
    model = make_model(seed=5)
    engine = HFRolloutEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    prompts, _ = make_batch(n=8, seed=6)
    gen = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=8, seed=0))
    train = make_engine(model)
    train.temperature = 0.7
    recomputed = train.forward(prompts, gen.response_ids).logprobs
    for r, a, b in zip(gen.response_ids, gen.response_logprobs, recomputed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert EOS not in r[:-1].tolist()  # nothing generated after the end of the sequence
    again = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=8, seed=0))
    assert [r.tolist() for r in again.response_ids] == [r.tolist() for r in gen.response_ids]


def test_update_weights_changes_a_separate_engines_outputs():
    policy = make_model(seed=0)
    other = make_model(seed=1).eval()  # a different init
    engine = HFRolloutEngine(other, pad_token_id=PAD, eos_token_id=EOS, shares_module=False)
    prompts, _ = make_batch(n=6, seed=2)
    params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)

    def logprobs(e):  # greedy tokens of tiny tied-embedding models often agree; their log-probs do not
        return torch.cat(e.generate(prompts, params).response_logprobs)

    before = logprobs(engine)
    engine.update_weights(make_engine(policy).named_weights(), version=7)
    after = logprobs(engine)
    assert engine.weights_version == 7
    torch.testing.assert_close(after, logprobs(HFRolloutEngine(policy, pad_token_id=PAD, eos_token_id=EOS)))
    assert not torch.allclose(after, before)


def test_colocated_engine_generates_with_the_trained_parameters_without_a_copy():
    model = make_model()
    train = make_engine(model)
    rollout = HFRolloutEngine(train.module, pad_token_id=PAD, eos_token_id=EOS, shares_module=True)
    shared = {n: p.data_ptr() for n, p in rollout.model.named_parameters()}
    assert shared == {n: t.data_ptr() for n, t in train.named_weights()}
    prompts, responses = make_batch(n=4)
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    before = copy.deepcopy(rollout.generate(prompts, params).response_logprobs)
    train.train_step(prompts, responses, {}, lambda mb: (-(mb.logprobs * mb.weight)[mb.mask].sum(), {}))
    rollout.update_weights(train.named_weights(), version=1)
    after = rollout.generate(prompts, params).response_logprobs
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_frozen_model_gets_no_optimizer():
    model = make_model().requires_grad_(False)
    engine = make_engine(model)
    assert engine.optimizer is None and engine.scheduler is None
    prompts, responses = make_batch(n=2)
    assert [lp.shape for lp in engine.forward(prompts, responses).logprobs] == [r.shape for r in responses]


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_and_top_p_that_keep_one_token_sample_greedily(filters):
    model = make_model(seed=7)
    engine = HFRolloutEngine(model, pad_token_id=PAD, eos_token_id=EOS, max_batch_size=2)  # 3 batches of <= 2
    prompts, _ = make_batch(n=5, seed=8)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    sampled = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=3, **filters))
    assert [r.tolist() for r in sampled.response_ids] == [r.tolist() for r in greedy.response_ids]
