"""W1 (GRPO) and W2 (PPO with critic + reference) on one GPU: our runtime and TRL's GRPOTrainer in
the same run, one table. Workloads: ../shared/BENCHMARKS.md. Numbers: docs/performance.md.

    PYTHONPATH=runtime python bench/w1_grpo.py                        # W1 ours + TRL, W2 ours (GPU)
    PYTHONPATH=runtime python bench/w1_grpo.py --tiny --device cpu    # CI smoke: tiny shape, no timing claims
    ... --workloads w1 --shape hidden=1536,layers=28,heads=12,kv_heads=2,intermediate=8960   # any shape
    ... --path recipe --workloads w1,w2,trl     # the same workloads through the recipes users run
    ... --path engine,recipe                    # both, one table

Two paths. `engine` (the default, and what docs/performance.md's W1/W2 numbers were measured with)
drives FastRolloutEngine and FastTrainStep directly in the loop below. `recipe` runs the real
`recipes.grpo` / `recipes.ppo` through `recipes.run` with a RuntimeConfig of the W1 shape (a
word-level tokenizer directory, a JSONL of random prompts, the even-id reward as a user function),
so it measures what an RLJob gets: the engines `Job` picks (`--recipe-engines auto`: the fast ones on
a GPU), the recipe's own phases and timers (generate / score -> the logprobs column / train / sync),
the KV cache freed after every generate (`rollout.sleep()`), and PPO's extra old-log-prob pass.

One step of ours (W1): generate 64 prompts x 8 samples x 256 tokens with the fast rollout engine
(CUDA-graph decode over the module's own weights) -> rule reward -> GRPO advantages -> one AdamW
step over all 512 sequences (fused chunked log-probs, float32 masters) -> weight sync (colocated:
the engine reads the trained module, nothing is copied). With one optimizer step per rollout batch
the old log-probs equal the current ones detached (as in TRL with num_iterations=1), so there is no
separate log-prob pass in W1. W2 adds the reference log-probs, the critic's update and GAE; the KL
penalty uses the sampler's log-probs of the policy. The critic also takes one step per batch, so its
training forward computes the values GAE needs (`--value-pass fold`, the default, as recipes.ppo
does: critic step first with GAE's returns computed per micro-batch in its loss, then the batch's
whitened advantages, then the policy step); `--value-pass separate` runs the no-grad value pass
before GAE instead (the recipe path then runs `recipes.ppo` with fold_value_pass=False).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from kuberl_runtime.algorithms import get_advantage, kl_penalty, policy_loss, value_loss
from kuberl_runtime.engines.base import SamplingParams
from kuberl_runtime.engines.fast_rollout import FastRolloutEngine
from kuberl_runtime.engines.fast_train import FastTrainStep

W1_SHAPE = dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
TINY_SHAPE = dict(arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)
PAD, EOS = 0, 1


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[shape["arch"]]
    cfg = cls(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device)


def reward(responses: torch.Tensor) -> torch.Tensor:
    """The cheap rule: share of even token ids in the response, (B, R) -> (B,)."""
    return (responses % 2 == 0).float().mean(-1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: str) -> None:
        self.device, self.split, self.t = device, {}, 0.0

    def start(self) -> None:
        sync(self.device)
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.split[name] = self.split.get(name, 0.0) + now - self.t
        self.t = now


# ------------------------------------------------------------------------------------ our W1/W2


def run_ours(args, workload: str) -> dict:
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy = build_model(args.shape, dev, dtype)
    trainer = FastTrainStep(
        policy, lr=1e-6, micro_batch_tokens=args.micro_batch_tokens, checkpoint=args.checkpoint,
        compile_layers=args.compile,
    )  # fmt: skip
    engine = FastRolloutEngine(
        policy, pad_token_id=PAD, eos_token_id=EOS, use_cuda_graph=None if dev == "cuda" else False,
        compile_layers=args.compile,
    )  # fmt: skip
    ppo = workload == "w2"
    if ppo:
        ref = build_model(args.shape, dev, dtype).requires_grad_(False)
        ref_step = FastTrainStep(ref, lr=0.0, trainable=False)
        critic_lm = build_model(args.shape, dev, dtype)
        head = nn.Linear(args.shape["hidden"], 1).to(dev, dtype)
        nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        critic = FastTrainStep(
            critic_lm, lr=1e-5, value_head=head, micro_batch_tokens=args.micro_batch_tokens, compile_layers=args.compile
        )
    g = torch.Generator().manual_seed(1)
    n_new, group = args.new_tokens, args.samples
    params = SamplingParams(temperature=1.0, max_new_tokens=n_new, ignore_eos=True)
    steps = []
    for step in range(args.steps):
        tm = Timer(dev)
        prompts = [torch.randint(2, args.shape["vocab"], (args.prompt_len,), generator=g) for _ in range(args.prompts)]
        prompts = [p for p in prompts for _ in range(group)]  # rows k*group .. : samples of prompt k
        tm.start()
        # -- rollout
        gen = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": step}))
        if args.sleep:
            engine.sleep()
        tm.lap("generate")
        # -- reward, reference / critic, advantages
        resp = torch.stack(gen.response_ids).to(dev)  # (B, R): exactly n_new tokens each (EOS ignored)
        mask = torch.ones_like(resp, dtype=torch.bool)
        token_rewards = torch.zeros(resp.shape, device=dev)
        token_rewards[:, -1] = reward(resp)
        batch = trainer.collate(prompts, gen.response_ids)
        if ppo:
            sampler_lp = torch.stack(gen.response_logprobs).to(dev)
            ref_lp = ref_step.logprobs(batch).view_as(resp)
            token_rewards = token_rewards - 0.001 * kl_penalty(sampler_lp, ref_lp, "k3")
            if args.value_pass == "fold":
                tm.lap("logprobs")
                critic_batch = critic.collate(prompts, gen.response_ids)
                values, c_metrics = critic_step_with_gae(critic, critic_batch, token_rewards)
                tm.lap("train")
            else:
                values = critic.values(critic.collate(prompts, gen.response_ids)).view_as(resp).float()
            adv, returns = get_advantage("gae")(
                token_rewards=token_rewards, mask=mask, values=values, group_size=group,
                gamma=1.0, lam=0.95, normalize_std=True,
            )  # fmt: skip
        else:
            adv, _ = get_advantage("grpo")(
                token_rewards=token_rewards, mask=mask, values=None, group_size=group,
                gamma=1.0, lam=1.0, normalize_std=True,
            )  # fmt: skip
        adv_flat, n_tok = adv.reshape(-1), resp.numel()
        tm.lap("logprobs")
        # -- update (old log-probs = current ones detached: one optimizer step per rollout batch)
        def pg_loss(logp, idx):
            a = adv_flat[idx][None]
            loss, _ = policy_loss(logp[None], logp.detach()[None], a, torch.ones_like(a), aggregation="token-sum")
            return loss / n_tok

        metrics = trainer.step(batch, pg_loss)
        if ppo and args.value_pass == "separate":
            ret_flat, old_v = returns.reshape(-1), values.reshape(-1)

            def v_loss(v, idx):
                m = torch.ones_like(v)[None]
                loss, _ = value_loss(v[None], old_v[idx][None], ret_flat[idx][None], m, aggregation="token-sum")
                return loss / n_tok

            c_metrics = critic.step(critic.collate(prompts, gen.response_ids), v_loss)
        tm.lap("train")
        # -- weight sync: colocated on the same module, nothing moves
        t_sync = time.perf_counter()
        engine.update_weights((), version=step + 1)
        sync(dev)
        tm.split["sync"] = time.perf_counter() - t_sync
        total = sum(tm.split.values())
        steps.append({"step_s": total, **{f"{k}_s": v for k, v in tm.split.items()}, "loss": metrics["train/loss"]})
        if ppo:
            steps[-1]["value_loss"] = c_metrics["train/loss"]
        print(f"[ours {workload}] step {step}: {total:.3f}s " + " ".join(f"{k}={v:.3f}" for k, v in tm.split.items()), flush=True)
    out = summarize(steps, args)
    out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    out["micro_batches"] = metrics["train/micro_batches"]
    if ppo:
        out["value_pass"] = args.value_pass
    out["checkpointing"] = trainer._ckpt
    del engine, trainer, policy
    return out


def critic_step_with_gae(critic: FastTrainStep, batch, token_rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The critic's one AdamW step, GAE's returns computed inside its loss from the values of its own
    forward (those before the step, as recipes.ppo.critic_step_with_gae): the (B, R) values, detached,
    and the step's metrics.

    Every response has exactly R tokens and a micro-batch holds whole rows, so one micro-batch's
    (n,) values are (n / R, R) rows, whose GAE needs nothing from other rows."""
    length, n_tok = token_rewards.shape[1], token_rewards.numel()
    values, rewards = torch.empty(n_tok, device=token_rewards.device), token_rewards.reshape(-1)

    def v_loss(v, idx):
        v_old = v.detach()
        values[idx] = v_old
        ones = torch.ones(len(idx) // length, length, dtype=torch.bool, device=v.device)
        _, ret = get_advantage("gae")(
            token_rewards=rewards[idx].view(-1, length), mask=ones, values=v_old.view(-1, length), group_size=1,
            gamma=1.0, lam=0.95, normalize_std=False,
        )  # fmt: skip
        loss, _ = value_loss(v[None], v_old[None], ret.reshape(-1)[None], ones.reshape(1, -1), aggregation="token-sum")
        return loss / n_tok

    metrics = critic.step(batch, v_loss)
    return values.view_as(token_rewards), metrics


def summarize(steps: list[dict], args) -> dict:
    steady = steps[2:] if len(steps) > 2 else steps  # the first two compile / capture / warm up
    med = statistics.median(s["step_s"] for s in steady)
    tokens = args.prompts * args.samples * args.new_tokens
    split = {k: statistics.median(s[k] for s in steady) for k in steady[0] if k.endswith("_s") and k != "step_s"}
    return {"step_s": med, "tokens_per_s": tokens / med, "split": split, "steps": steps}


# ------------------------------------------------------------------------------- the recipe path


def even_share(prompt: str, completion: str, row: dict) -> float:
    """The W1 reward as a recipe's user function: share of even ids among the completion's words."""
    words = [w for w in completion.split() if w[1:].isdigit()]
    return sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words))


def ppo_separate_value_pass(job) -> None:
    """recipes.ppo with its no-grad value pass kept (`--value-pass separate`)."""
    from kuberl_runtime.recipes.ppo import ppo

    ppo(job, fold_value_pass=False)


RECIPE_ENGINES = {"auto": ("builtin", "auto"), "fast": ("fast", "fast"), "plain": ("hf", "torch")}


def recipe_config(args, workload: str, root: Path):
    """The RuntimeConfig of W1 (grpo) or W2 (ppo) at args' shape, with its tokenizer and prompt file."""
    from kuberl_runtime.config import RuntimeConfig

    shape, vocab = args.shape, args.shape["vocab"]
    make_tokenizer(vocab).save_pretrained(root / "tokenizer")
    g = torch.Generator().manual_seed(1)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(args.prompts * args.steps):
            ids = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in ids), "answer": ""}) + "\n")
    rollout_engine, train_engine = RECIPE_ENGINES[args.recipe_engines]
    algorithm = {"name": "grpo", "samplesPerPrompt": args.samples}
    if workload == "w2":
        algorithm = {"name": "ppo", "samplesPerPrompt": args.samples, "advantage": "gae", "klCoef": 0.001,
                     "klType": "k3", "klIn": "reward", "gamma": 1.0, "lam": 0.95}  # fmt: skip
        if args.value_pass == "separate":
            algorithm["recipe"] = "w1_grpo:ppo_separate_value_pass"
    sequences = args.prompts * args.samples
    return RuntimeConfig.model_validate(
        {
            "model": {
                "init": {"architecture": shape["arch"], "hiddenSize": shape["hidden"], "numLayers": shape["layers"],
                         "numHeads": shape["heads"], "numKvHeads": shape["kv_heads"],
                         "intermediateSize": shape["intermediate"], "vocabSize": vocab, "tieWordEmbeddings": True,
                         "maxPositionEmbeddings": 4096},  # fmt: skip
                "tokenizer": str(root / "tokenizer"),
                "dtype": "bfloat16" if args.device == "cuda" else "float32",
            },
            "data": {"path": str(root / "prompts.jsonl"), "shuffle": False, "maxPromptLength": args.prompt_len},
            "algorithm": algorithm,
            "rollout": {"engine": rollout_engine, "temperature": 1.0, "maxNewTokens": args.new_tokens, "ignoreEos": True},
            "training": {
                "engine": train_engine, "totalSteps": args.steps, "globalBatchSize": args.prompts,
                "microBatchSize": math.gcd(sequences, 32), "lr": 1e-6, "criticLr": 1e-5,
                "gradientCheckpointing": bool(args.checkpoint), "logprobChunkSize": 4096,
            },  # fmt: skip
            "reward": {"function": "w1_grpo:even_share", "pythonPath": [str(Path(__file__).parent)]},
            "checkpoint": {"dir": str(root / "ckpt"), "interval": args.steps, "resume": False},
        }
    )


def run_recipe(args, workload: str) -> dict:
    from kuberl_runtime.recipes import run
    from kuberl_runtime.tracking import Tracker

    dev = args.device
    root = Path(tempfile.mkdtemp(prefix=f"kuberl-{workload}-recipe-"))
    cfg = recipe_config(args, workload, root)
    steps: list[dict] = []

    class Record(Tracker):
        """Keeps each step's metrics, and the wall time between logs (which the phases do not cover)."""

        def __init__(self) -> None:
            super().__init__(cfg.logging, enabled=False)
            self.last = time.perf_counter()

        def log(self, step: int, m: dict[str, float]) -> None:
            now = time.perf_counter()
            wall, self.last = now - self.last, now
            split = {"generate_s": m["time/generate_s"], "logprobs_s": m["time/score_s"],
                     "train_s": m["time/train_s"], "sync_s": m["time/sync_s"]}  # fmt: skip
            steps.append({"step_s": m["time/step_s"], "wall_s": wall, **split, "loss": m["train/policy_loss"]})
            if "critic/value_loss" in m:
                steps[-1]["value_loss"] = m["critic/value_loss"]
            print(f"[recipe {workload}] step {step}: {m['time/step_s']:.3f}s (wall {wall:.3f}s) "
                  + " ".join(f"{k}={v:.3f}" for k, v in split.items()), flush=True)  # fmt: skip

    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run(cfg, tracker=Record(), device=None if dev == "cuda" else torch.device(dev))  # None: the current GPU
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the last step's checkpoint: several GB at the W1 shape
    out = summarize(steps, args)
    out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    out["engines"] = args.recipe_engines
    if workload == "w2":
        out["value_pass"] = args.value_pass
    return out


# ------------------------------------------------------------------------------------------ TRL


def make_tokenizer(vocab: int):
    """A word-level tokenizer whose token i is the word 't<i>': random ids survive text round trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dev = args.device
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(1)
    rows = args.prompts * (args.trl_steps + 1)
    texts = [" ".join(f"t{i}" for i in torch.randint(3, args.shape["vocab"], (args.prompt_len,), generator=g).tolist()) for _ in range(rows)]

    def rule_reward(completions, **_):
        return [sum(int(w[1:]) % 2 == 0 for w in c.split()) / max(1, len(c.split())) for c in completions]

    wanted = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32 if not args.tiny else 8,
        gradient_accumulation_steps=args.prompts * args.samples // (32 if not args.tiny else 8),
        num_generations=args.samples, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, gradient_checkpointing=True,
        bf16=dev == "cuda", learning_rate=1e-6, beta=0.0, temperature=1.0, max_steps=args.trl_steps,
        logging_steps=1, report_to="none", save_strategy="no", use_vllm=False, use_cpu=dev == "cpu",
        num_iterations=1, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    fields = GRPOConfig.__dataclass_fields__
    cfg = GRPOConfig(**{k: v for k, v in wanted.items() if k in fields})
    dropped = sorted(set(wanted) - set(fields))

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not times:
                sync(dev)
                times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(dev)
            times.append(time.perf_counter())

    model = build_model(args.shape, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    trainer = GRPOTrainer(
        model=model, reward_funcs=rule_reward, args=cfg, train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=make_tokenizer(args.shape["vocab"]), callbacks=[StepTimes()],
    )  # fmt: skip
    trainer.train()
    steps = [{"step_s": b - a} for a, b in zip(times, times[1:])]
    for i, s in enumerate(steps):
        print(f"[trl] step {i}: {s['step_s']:.3f}s", flush=True)
    out = summarize(steps, args)
    out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    out["dropped_config"] = dropped
    del trainer, model
    return out


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------- main


def parse_shape(text: str | None, base: dict) -> dict:
    shape = dict(base)
    for item in (text or "").split(","):
        if item:
            k, v = item.split("=")
            shape[k] = v if k == "arch" else int(v)
    return shape


def table(results: dict) -> str:
    lines = ["| run | step s (median) | gen tok/s | peak GiB | generate | logprobs | train | sync | TRL step / ours |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    trl = results.get("trl_w1")
    for name, r in results.items():
        if not isinstance(r, dict) or "step_s" not in r:
            continue
        sp = r.get("split", {})
        ratio = f"{trl['step_s'] / r['step_s']:.2f}x" if trl and name != "trl_w1" else "-"
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.1f} | "
            + " | ".join(f"{sp[k]:.3f}" if k in sp else "-" for k in ("generate_s", "logprobs_s", "train_s", "sync_s"))
            + f" | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shape and batch (CI smoke)")
    ap.add_argument("--shape", help="overrides, e.g. arch=llama,hidden=1024,layers=16 (default: the W1 shape)")
    ap.add_argument("--workloads", default="w1,w2,trl", help="comma list of w1, w2, trl")
    ap.add_argument("--path", default="engine", help="comma list: engine (the engine-level loop), recipe (recipes.run)")
    ap.add_argument("--recipe-engines", choices=sorted(RECIPE_ENGINES), default="auto",
                    help="recipe path: auto (what a job gets: fast on a GPU), fast (forced, also on CPU), plain (hf + torch)")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--trl-steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="default: chosen from free memory")
    ap.add_argument("--checkpoint", type=lambda s: s == "on", default=None, help="on/off (default: from memory)")
    ap.add_argument("--sleep", type=lambda s: s == "on", default=True, help="free the KV cache and graphs after generating (on/off)")
    ap.add_argument("--compile", type=lambda s: s == "on", default=False, help="torch.compile the layer pieces (on/off)")
    ap.add_argument("--value-pass", choices=["fold", "separate"], default="fold",
                    help="W2: the critic's values from its update's forward (fold) or a no-grad pass before GAE")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape = parse_shape(args.shape, TINY_SHAPE)
        args.prompts, args.samples, args.prompt_len, args.new_tokens = 2, 4, 8, 8
        args.steps, args.trl_steps = min(args.steps, 3), min(args.trl_steps, 3)
    else:
        args.shape = parse_shape(args.shape, W1_SHAPE)
    workloads = args.workloads.split(",")
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "shape": args.shape, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    paths = args.path.split(",")
    for w in ("w1", "w2"):
        if w in workloads and "engine" in paths:
            results[f"ours_{w}"] = run_ours(args, w)
        if w in workloads and "recipe" in paths:
            results[f"recipe_{w}"] = run_recipe(args, w)
    if "trl" in workloads:
        if trl_available():
            results["trl_w1"] = run_trl(args)
        else:
            print("trl not importable: TRL column skipped", file=sys.stderr)
    for path in ("ours", "recipe"):
        if f"{path}_w1" in results and f"{path}_w2" in results:
            results[f"{path}_w2_over_w1"] = results[f"{path}_w2"]["step_s"] / results[f"{path}_w1"]["step_s"]
    print(table(results))
    for path in ("ours", "recipe"):
        if f"{path}_w2_over_w1" in results:
            print(f"{path}: W2 / W1 step time: {results[f'{path}_w2_over_w1']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
