"""The fast GPU path inside the recipes, checked on CPU (the fast engines run eagerly there).

- Which engines a job gets: fast on a CUDA device for Qwen2/Llama with one trainer rank, the
  transformers/torch engines on CPU, for other architectures and under FSDP2; forcing `fast` where
  it cannot run is a ConfigError naming the field.
- FastTrainEngine behind the recipes' interface computes what TorchTrainEngine computes: log-probs,
  entropies, values, and one optimizer step with the recipes' loss functions, over several
  micro-batches and every aggregation.
- The recipes (GRPO, PPO with critic and reference) run step by step the same through either train
  engine on the same rollouts, and a bf16 fast-path run resumes bit-exactly: the float32 masters and
  their optimizer state are what the checkpoint holds.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kuberl_runtime.algorithms import masked_mean
from kuberl_runtime.config import RuntimeConfig, TrainingConfig
from kuberl_runtime.engines import (
    FastRolloutEngine,
    FastTrainEngine,
    HFRolloutEngine,
    TorchTrainEngine,
    use_fast_rollout,
    use_fast_train,
)
from kuberl_runtime.engines.fast_model import linear_logprobs_entropy
from kuberl_runtime.engines.fast_train import pack_sorted
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.models import Critic
from kuberl_runtime.recipes import Job

from recipe_runs import Steps, run_recorded, runtime_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def dense_reward(prompt: str, completion: str, row: dict) -> float:
    """Share of digits in the completion: varies within every group, so every step has a gradient."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def config(tmp_path, *, rollout="hf", train="fast", **sections) -> RuntimeConfig:
    doc = {
        "model": {
            "init": {"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "numKvHeads": 2, "intermediateSize": 48},
            "tokenizer": "builtin:arithmetic",
        },
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 9, "numExamples": 64}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 4},
        "rollout": {"maxNewTokens": 6, "engine": rollout},
        "training": {"totalSteps": 3, "globalBatchSize": 4, "microBatchSize": 4, "lr": 1e-3, "engine": train},
        "reward": {"function": f"{__name__}:dense_reward"},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2},
    }
    return runtime_config(doc, **sections)


def cpu_steps(cfg) -> Steps:
    """Every step's metrics of the recipe run on the CPU."""
    return run_recorded(cfg, device=CPU)[1]


def tiny_lm(arch: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    else:
        cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
        cfg = cls(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_lm(arch) for arch in ("qwen2", "llama", "gpt2")}


# ------------------------------------------------------------------------------------ selection

# (rollout.engine, training.engine, device, architecture, trainer ranks, cpuOffload) -> (fast rollout, fast train)
SELECTION = [
    ("builtin", "auto", CUDA, "qwen2", 1, False, True, True),
    ("builtin", "auto", CUDA, "llama", 1, False, True, True),
    ("builtin", "auto", CPU, "qwen2", 1, False, False, False),
    ("builtin", "auto", CUDA, "gpt2", 1, False, False, False),
    ("builtin", "auto", CUDA, "qwen2", 8, False, True, False),  # FSDP2 trains; the rollout copy is whole
    ("builtin", "auto", CUDA, "qwen2", 1, True, True, False),  # CPU offload: only the torch engine has it
    ("hf", "torch", CUDA, "qwen2", 1, False, False, False),
    ("fast", "fast", CPU, "qwen2", 1, False, True, True),
    ("fast", "auto", CPU, "llama", 1, False, True, False),
    ("vllm", "auto", CUDA, "qwen2", 1, False, False, True),  # vLLM is built by its own caller
]


@pytest.mark.parametrize("rollout, train, device, arch, world, offload, want_rollout, want_train", SELECTION)
def test_engine_selection(tmp_path, models, rollout, train, device, arch, world, offload, want_rollout, want_train):
    cfg = config(tmp_path, rollout=rollout, train=train, training={"cpuOffload": offload})
    assert use_fast_rollout(cfg, device, models[arch]) is want_rollout
    assert use_fast_train(cfg, device, models[arch], world) is want_train


@pytest.mark.parametrize(
    "rollout, train, world, arch, field",
    [
        ("fast", "auto", 1, "gpt2", "runtime.rollout.engine"),
        ("hf", "fast", 1, "gpt2", "runtime.training.engine"),
        ("hf", "fast", 4, "qwen2", "runtime.training.engine"),
    ],
)
def test_forcing_fast_where_it_cannot_run_names_the_field(tmp_path, models, rollout, train, world, arch, field):
    cfg = config(tmp_path, rollout=rollout, train=train)
    with pytest.raises(ConfigError) as e:
        use_fast_rollout(cfg, CUDA, models[arch])
        use_fast_train(cfg, CUDA, models[arch], world)
    assert e.value.field == field


def test_a_cpu_job_gets_the_plain_engines_by_default(tmp_path):
    job = Job.build(config(tmp_path, rollout="builtin", train="auto"), device=CPU)
    policy = job.train_engine(job.build_policy(), lr=1e-3)
    rollout = job.rollout_engine(policy)
    assert isinstance(policy, TorchTrainEngine) and isinstance(rollout, HFRolloutEngine)
    assert isinstance(job.reference_engine(), TorchTrainEngine)


def test_forced_fast_engines_share_the_bf16_model_and_checkpoint_float32_masters(tmp_path):
    job = Job.build(config(tmp_path, rollout="fast", train="fast", model={"dtype": "bfloat16"}), device=CPU)
    policy = job.train_engine(job.build_policy(), lr=1e-3)
    rollout = job.rollout_engine(policy)
    assert isinstance(policy, FastTrainEngine) and isinstance(rollout, FastRolloutEngine)
    assert rollout.model is policy.model and rollout.shares_module  # zero-copy colocated
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    # What the recipe checkpoints: float32 masters named like the model, updated by the optimizer.
    assert {n for n, _ in policy.module.named_parameters()} == {n for n, _ in policy.model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in policy.module.parameters())
    assert policy.optimizer.param_groups[0]["params"][0] is next(policy.module.parameters())
    ref = job.reference_engine()
    assert isinstance(ref, FastTrainEngine) and ref.optimizer is None


def test_colocated_vllm_is_a_config_error(tmp_path):
    job = Job.build(config(tmp_path, rollout="vllm", train="torch"), device=CPU)
    with pytest.raises(ConfigError, match="disaggregated") as e:
        job.rollout_engine(job.train_engine(job.build_policy(), lr=1e-3))
    assert e.value.field == "runtime.rollout.engine"


# ------------------------------------------------------------------------- engine against engine


def batch(vocab: int, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g) for _ in range(n)]
    advantages = [torch.randn(r.numel(), generator=g) for r in responses]
    return prompts, responses, advantages


def pg_loss(mb):
    """A policy-gradient loss with an entropy bonus: exercises log-probs, weights, extras, entropy."""
    per_token = -(mb.logprobs * mb.extras["adv"]) - 0.1 * mb.entropy
    loss = torch.where(mb.mask, per_token * mb.weight, 0).sum()
    return loss, {"pg": masked_mean(per_token.detach(), mb.mask)}  # token mean: any micro-batching


def value_loss(mb):
    per_token = 0.5 * (mb.values - mb.extras["adv"]) ** 2
    return torch.where(mb.mask, per_token * mb.weight, 0).sum(), {"vl": masked_mean(per_token.detach(), mb.mask)}


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_fast_policy_engine_matches_the_torch_engine(models, aggregation):
    cfg = TrainingConfig(microBatchSize=2, gradClip=1.0)
    model = models["qwen2"]
    torch_engine = TorchTrainEngine(copy.deepcopy(model), cfg, pad_token_id=0, lr=1e-2, temperature=0.7)
    fast = FastTrainEngine(copy.deepcopy(model), cfg, pad_token_id=0, lr=1e-2, temperature=0.7, micro_batch_tokens=16)
    prompts, responses, adv = batch(50)
    a, b = torch_engine.forward(prompts, responses, entropy=True), fast.forward(prompts, responses, entropy=True)
    for x, y in zip(a.logprobs + a.entropy, b.logprobs + b.entropy, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert len(fast.step.collate(prompts, responses).micro) > 1  # accumulation over micro-batches

    ma = torch_engine.train_step(prompts, responses, {"adv": adv}, pg_loss, aggregation=aggregation, entropy=True)
    mb = fast.train_step(prompts, responses, {"adv": adv}, pg_loss, aggregation=aggregation, entropy=True)
    assert mb.keys() == ma.keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), k
    # lr 1e-2 with Adam moves every weight by ~1e-2; the engines agree to far below that.
    for (name, p), q in zip(torch_engine.module.named_parameters(), fast.module.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-4, msg=name)
    assert fast.scheduler.last_epoch == 1


def test_fast_critic_engine_matches_the_torch_engine(models):
    cfg = TrainingConfig(microBatchSize=2)
    backbone = models["llama"].base_model
    critics = [Critic(copy.deepcopy(backbone), 32) for _ in range(2)]
    for c in critics:
        c.config = models["llama"].config
        torch.nn.init.normal_(c.value_head.weight, generator=torch.Generator().manual_seed(3))
    torch_engine = TorchTrainEngine(critics[0], cfg, pad_token_id=0, lr=1e-2)
    fast = FastTrainEngine(critics[1], cfg, pad_token_id=0, lr=1e-2, micro_batch_tokens=16)
    prompts, responses, targets = batch(50, seed=1)
    a, b = torch_engine.forward(prompts, responses), fast.forward(prompts, responses)
    for x, y in zip(a.values, b.values, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    ma = torch_engine.train_step(prompts, responses, {"adv": targets}, value_loss)
    mb = fast.train_step(prompts, responses, {"adv": targets}, value_loss)
    assert mb["vl"] == pytest.approx(ma["vl"], rel=1e-5) and mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-4)
    torch.testing.assert_close(critics[1].value_head.weight, critics[0].value_head.weight, rtol=0, atol=2e-4)


def test_fused_entropy_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    h = (0.3 * torch.randn(7, 16, generator=g)).requires_grad_(True)  # entropies well away from 0
    w = torch.randn(40, 16, generator=g).requires_grad_(True)
    y = torch.randint(0, 40, (7,), generator=g)
    c1, c2 = torch.randn(7, generator=g), torch.randn(7, generator=g)
    lp, ent = linear_logprobs_entropy(h, w, y, temperature=0.8, chunk=3)
    (lp * c1 + ent * c2).sum().backward()
    fused = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    z = torch.log_softmax((h @ w.T) / 0.8, -1)
    ref_lp, ref_ent = z.gather(-1, y[:, None]).squeeze(-1), -(z.exp() * z).sum(-1)
    (ref_lp * c1 + ref_ent * c2).sum().backward()
    torch.testing.assert_close(lp, ref_lp.detach())
    torch.testing.assert_close(ent, ref_ent.detach())
    torch.testing.assert_close(fused[0], h.grad)
    torch.testing.assert_close(fused[1], w.grad)


# ---------------------------------------------------------------------------------- the recipes

PPO = {"name": "ppo", "samplesPerPrompt": 1, "klCoef": 0.05}


@pytest.mark.parametrize("algorithm", [{}, PPO], ids=["grpo", "ppo"])
def test_recipe_runs_the_same_through_the_fast_and_the_torch_train_engine(tmp_path, algorithm):
    """Same rollouts (the transformers engine, same seeds), so every step must agree."""
    runs = [cpu_steps(config(tmp_path / e, rollout="hf", train=e, algorithm=algorithm)) for e in ("torch", "fast")]
    keys = ["reward/mean", "train/policy_loss", "train/grad_norm", "train/entropy", "rollout/response_length"]
    if algorithm:
        keys += ["critic/value_loss", "critic/grad_norm", "train/kl", "critic/values_mean"]
    for (step, a), (_, b) in zip(*runs, strict=True):
        assert any(a["train/grad_norm"] > 0 for _, a in runs[0])
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-6), (step, k)


def saved(ckpt_dir: Path, step: int, tmp_path: Path) -> dict:
    out = tmp_path / f"{ckpt_dir.parent.name}-{step}.pt"
    dcp_to_torch_save(ckpt_dir / f"step-{step:06d}", out)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("algorithm", [{}, PPO], ids=["grpo", "ppo"])
def test_bf16_fast_path_resumes_bit_exactly_from_float32_masters(tmp_path, algorithm):
    def cfg(name, steps):
        return config(tmp_path / name, rollout="fast", train="fast", algorithm=algorithm,
                      model={"dtype": "bfloat16"}, training={"totalSteps": steps})  # fmt: skip

    straight = cpu_steps(cfg("a", 3))
    cpu_steps(cfg("b", 2))
    resumed = cpu_steps(cfg("b", 3))
    assert [s for s, _ in resumed] == [3]
    assert untimed(resumed) == untimed(straight[2:])  # every other metric of step 3, exactly
    # Step 3's metrics come from the bf16 weights, the same either way; the state after its
    # update (masters, Adam moments) is where lost float32 masters or optimizer state would show.
    a, b = saved(tmp_path / "a" / "ckpt", 3, tmp_path), saved(tmp_path / "b" / "ckpt", 3, tmp_path)
    masters = {k: v for k, v in a["model"].items()}
    assert masters and all(v.dtype == torch.float32 for v in masters.values())
    # bf16 rounding of the masters would show: their values are not all bf16-representable.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())
    flat_a, flat_b = dict(_flat(a)), dict(_flat(b))
    assert flat_a.keys() == flat_b.keys() and any("exp_avg_sq" in k for k in flat_a)
    for k, v in flat_a.items():
        assert torch.equal(v, flat_b[k]), k


def untimed(steps):
    return [(s, {k: v for k, v in m.items() if not k.startswith("time/") and k != "rollout/tokens_per_s"}) for s, m in steps]


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def test_a_torch_engine_checkpoint_resumes_on_the_fast_engine(tmp_path):
    """Same keys either way (tied weights under both names): a job whose runtime switches engines
    (an image upgrade, `training.engine` changed) resumes; the float32 masters start from the bf16
    weights, so step 3 samples exactly what the torch run sampled."""

    def cfg(name, train, steps):
        return config(tmp_path / name, rollout="hf", train=train, model={"dtype": "bfloat16"},
                      training={"totalSteps": steps})  # fmt: skip

    torch_run = cpu_steps(cfg("a", "torch", 3))
    shutil.copytree(tmp_path / "a" / "ckpt" / "step-000002", tmp_path / "b" / "ckpt" / "step-000002")
    fast_run = cpu_steps(cfg("b", "fast", 3))
    assert [s for s, _ in fast_run] == [3]
    assert fast_run[0][1]["reward/mean"] == torch_run[2][1]["reward/mean"]
    assert fast_run[0][1]["train/entropy"] == pytest.approx(torch_run[2][1]["train/entropy"], rel=1e-2)


@pytest.mark.parametrize("engine, kind", [("builtin", HFRolloutEngine), ("hf", HFRolloutEngine), ("fast", FastRolloutEngine)])
def test_rollout_pods_honour_the_engine_choice(tmp_path, engine, kind):
    from kuberl_runtime.rollout_server import build_engine

    built, vocab = build_engine(config(tmp_path, rollout=engine), CPU)
    assert isinstance(built, kind) and not built.shares_module and vocab > 0


def _padded(groups, lengths):
    return [len(g) * max(lengths[i] for i in g) for g in groups]


def test_packing_evens_out_micro_batches_of_equal_sequences():
    lengths = [384] * 512
    groups = pack_sorted(lengths, budget=456 * 384)  # 456 fit: greedy would cut 456 + 56
    assert [len(g) for g in groups] == [256, 256]
    assert sorted(i for g in groups for i in g) == list(range(512))


@pytest.mark.parametrize("seed", range(20))
def test_packing_keeps_every_sequence_once_within_the_budget_and_no_more_passes_than_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 200, (1,), generator=g))
    lengths = torch.randint(1, 300, (n,), generator=g).tolist()
    budget = int(torch.randint(300, 5000, (1,), generator=g))
    groups = pack_sorted(lengths, budget)
    assert sorted(i for grp in groups for i in grp) == list(range(n))
    assert all(p <= budget for p in _padded(groups, lengths))
    # as many micro-batches as filling each to the budget in length order would make
    greedy, cur = 0, []
    for i in sorted(range(n), key=lambda i: lengths[i]):
        if cur and (len(cur) + 1) * lengths[i] > budget:
            greedy, cur = greedy + 1, []
        cur.append(i)
    assert len(groups) == greedy + 1


def test_packing_gives_a_sequence_longer_than_the_budget_its_own_micro_batch():
    groups = pack_sorted([10, 10, 500], budget=100)
    assert groups == [[0, 1], [2]]


@pytest.mark.parametrize("seed", [10**11, 2**70, -5])
def test_any_training_seed_gives_sampling_seeds_torch_accepts(tmp_path, seed):
    """The per-step seed (seed * 1_000_003 + step) * 1024 + rank passes 2**64 once training.seed is
    above ~1.8e10 (torch.Generator.manual_seed refused it) or is negative: it is taken modulo 2**64,
    which torch's generators do to any seed they accept, so the samples are unchanged where it ran."""
    job = Job.build(config(tmp_path, rollout="builtin", train="auto", training={"seed": seed}), device=CPU)
    sampling = job.sampling(3)
    assert sampling.seed == ((seed * 1_000_003 + 3) * 1024 + job.rank) % 2**64
    rollout = job.rollout_engine(job.train_engine(job.build_policy(), lr=1e-3))
    _, prompts = job.next_batch()
    out = rollout.generate(prompts, sampling)
    assert len(out.response_ids) == len(prompts)
