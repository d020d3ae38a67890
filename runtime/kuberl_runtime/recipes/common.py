"""What every recipe shares, so a recipe file holds only its algorithm: the `Job`.

    job = Job.build(cfg, topology, group=trainer_group)     # tokenizer, data, reward, checkpoints, logging
    policy = job.train_engine(job.build_policy(), lr=cfg.training.lr)
    rollout = job.rollout_engine(policy)                     # colocated: runs policy's own module
    start = job.resume({"model": policy.module, "optimizer": policy.optimizer, "scheduler": policy.scheduler})
    for step in job.steps(start):
        rows, prompts = job.next_batch()                     # this rank's prompts, each k times in a row
        gen = rollout.generate(prompts, job.sampling(step))
        scores = job.score(rows, gen)                        # (B,) float32
        ...
        job.log(step, metrics)
        job.maybe_save(step, app_state)
    job.finish()

Distributed code lives here, not in the recipes: `next_batch` gives each trainer rank whole GRPO
groups, `mean_over_ranks` averages metrics, the checkpoint collectives run on the trainer group.
Rank-0-only things (progress endpoint, console, TensorBoard) are no-ops on other ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kuberl_runtime.checkpoint import Checkpointer
from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.contract import Topology
from kuberl_runtime.data import PromptDataset, PromptOrder, load_dataset
from kuberl_runtime.engines import (
    FastRolloutEngine,
    FastTrainEngine,
    Generation,
    HFRolloutEngine,
    RolloutEngine,
    SamplingParams,
    TorchTrainEngine,
    use_fast_rollout,
    use_fast_train,
)
from kuberl_runtime.errors import ConfigError, DataError
from kuberl_runtime.models import build_critic, build_policy, build_reference, resolve_dtype
from kuberl_runtime.progress import ProgressReporter
from kuberl_runtime.rewards import RewardFn, build_reward
from kuberl_runtime.tokenizer import Tokenizer, load_tokenizer
from kuberl_runtime.tracking import Tracker


@dataclass
class Job:
    cfg: RuntimeConfig
    topology: Topology
    device: torch.device
    dtype: torch.dtype
    tokenizer: Tokenizer
    dataset: PromptDataset
    order: PromptOrder
    reward_fn: RewardFn | None  # None when reward_override scores remotely
    checkpointer: Checkpointer
    progress: ProgressReporter
    tracker: Tracker
    group: dist.ProcessGroup | None = None  # the trainer ranks; None with one trainer process
    rank: int = 0
    world_size: int = 1
    # A remote rollout client (disaggregated placement) replaces the built-in colocated engine.
    rollout_override: RolloutEngine | None = None
    # Clients of critic/reference/reward pods (remote_roles) replace the models built in this process.
    reference_override: Any = None  # RemoteReference: forward() -> log-probs, like reference_engine()
    critic_override: Any = None  # RemoteCritic: forward() -> values, train_step(); a stateful checkpoint entry
    reward_override: Any = None  # RemoteReward: score(prompts, completions, rows) -> [float]
    last_metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        cfg: RuntimeConfig,
        topology: Topology | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        progress: ProgressReporter | None = None,
        tracker: Tracker | None = None,
        rollout: RolloutEngine | None = None,
        reference: Any = None,
        critic: Any = None,
        reward: Any = None,
    ) -> Job:
        topology = topology or Topology()
        rank = dist.get_rank(group) if group is not None else 0
        world = dist.get_world_size(group) if group is not None else 1
        if cfg.training.global_batch_size % world:
            raise ConfigError(
                f"globalBatchSize ({cfg.training.global_batch_size}) must divide over {world} trainer ranks "
                "(each rank gets whole groups of samplesPerPrompt)",
                field="runtime.training.globalBatchSize",
            )
        try:
            cfg.check_world(world)
        except ValueError as e:
            raise ConfigError(str(e), field="runtime.training") from None
        device = device or _default_device()
        tokenizer = load_tokenizer(cfg.model)
        dataset = load_dataset(cfg.data, tokenizer)
        return cls(
            cfg=cfg,
            topology=topology,
            device=device,
            dtype=resolve_dtype(cfg.model.dtype, device),
            tokenizer=tokenizer,
            dataset=dataset,
            order=PromptOrder(len(dataset), shuffle=cfg.data.shuffle, seed=cfg.data.seed),
            reward_fn=None if reward else build_reward(cfg.reward, answer_key=dataset.answer_key, device=str(device)),
            checkpointer=Checkpointer(cfg.checkpoint, rank=rank, world_size=world, process_group=group),
            progress=progress or ProgressReporter(cfg.training.total_steps, port=None),
            tracker=tracker or Tracker(cfg.logging, enabled=rank == 0, total_steps=cfg.training.total_steps),
            group=group,
            rank=rank,
            world_size=world,
            rollout_override=rollout,
            reference_override=reference,
            critic_override=critic,
            reward_override=reward,
        )

    # ------------------------------------------------------------------------------ models/engines

    def build_policy(self) -> nn.Module:
        return build_policy(self.cfg.model, self.tokenizer.vocab_size, self.device, self.dtype)

    def build_critic(self) -> nn.Module:
        return build_critic(self.cfg.model, self.tokenizer.vocab_size, self.device, self.dtype)

    def build_reference(self) -> nn.Module:
        return build_reference(self.cfg.model, self.tokenizer.vocab_size, self.device, self.dtype)

    @property
    def optimizer_steps_per_step(self) -> int:
        t = self.cfg.training
        return t.epochs_per_batch * (t.global_batch_size // t.mini_batch_size)

    def train_engine(self, model: nn.Module, *, lr: float) -> TorchTrainEngine | FastTrainEngine:
        """The policy's or critic's engine: the fast one on one unsharded GPU rank (engines/fast_path.py),
        else torch (FSDP2 over several GPU ranks, DDP or plain on CPU). Same interface either way."""
        kwargs = dict(
            lr=lr,
            pad_token_id=self.tokenizer.pad_token_id,
            total_optimizer_steps=self.cfg.training.total_steps * self.optimizer_steps_per_step,
            temperature=self.cfg.rollout.temperature,
        )
        if use_fast_train(self.cfg, self.device, model, self.world_size):
            return FastTrainEngine(model, self.cfg.training, compile_layers=self._on_cuda, **kwargs)
        return TorchTrainEngine(model, self.cfg.training, process_group=self.group, **kwargs)

    def reference_engine(self) -> TorchTrainEngine | FastTrainEngine:
        """The frozen reference as a forward-only engine (same chunked log-probs, no optimizer)."""
        model = self.build_reference()
        kwargs = dict(pad_token_id=self.tokenizer.pad_token_id, temperature=self.cfg.rollout.temperature)
        if use_fast_train(self.cfg, self.device, model, self.world_size):
            return FastTrainEngine(model, self.cfg.training, compile_layers=self._on_cuda, **kwargs)
        return TorchTrainEngine(model, self.cfg.training, process_group=self.group, **kwargs)

    def rollout_engine(self, policy: TorchTrainEngine | FastTrainEngine) -> RolloutEngine:
        """The hybrid engine: generation runs the policy's own module (no weight copy) when the
        layouts match; under FSDP2 the shards are not a runnable model, so a full copy is kept and
        refreshed from the gathered weights after every update (`update_weights`)."""
        if self.rollout_override is not None:
            return self.rollout_override
        if self.cfg.rollout.engine == "vllm":
            raise ConfigError(
                "rollout.engine vllm runs on rollout pods (placement: disaggregated); colocated jobs use "
                "builtin, fast or hf",
                field="runtime.rollout.engine",
            )
        shares = not policy.fsdp
        runnable = policy.model if isinstance(policy, FastTrainEngine) else policy.module  # bf16, not masters
        model = runnable if shares else self.build_policy().eval().requires_grad_(False)
        kwargs = dict(
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            max_batch_size=self.cfg.rollout.max_batch_size,
            shares_module=shares,
        )
        if use_fast_rollout(self.cfg, self.device, model):
            graphs = self.cfg.rollout.cuda_graphs and self._on_cuda
            engine = FastRolloutEngine(model, use_cuda_graph=graphs, compile_layers=self._on_cuda, **kwargs)
        else:
            engine = HFRolloutEngine(model, **kwargs)
        self.note(f"engines: rollout {type(engine).__name__}, train {type(policy).__name__}")
        if not shares:
            engine.update_weights(policy.named_weights(), version=0)
        return engine

    @property
    def _on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sampling(self, step: int) -> SamplingParams:
        """Sampling for `step`; the seed depends only on (training.seed, step, rank), so a resumed
        run samples exactly what the uninterrupted one would have. Taken modulo 2**64, as torch's
        generators take seeds (the same samples; a large or negative training.seed no longer fails)."""
        r = self.cfg.rollout
        return SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            ignore_eos=r.ignore_eos,
            seed=((self.cfg.training.seed * 1_000_003 + step) * 1024 + self.rank) % 2**64,
        )

    # ------------------------------------------------------------------------------------- data

    def next_batch(self) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """This rank's rows and prompts for the next step: prompt i repeated k times in a row.

        Every rank advances the same order by globalBatchSize and keeps its own contiguous slice,
        so GRPO groups never straddle ranks and the data position is the same on every rank.
        """
        n = self.cfg.training.global_batch_size
        per_rank = n // self.world_size
        indices = self.order.take(n)[self.rank * per_rank : (self.rank + 1) * per_rank]
        k = self.cfg.algorithm.samples_per_prompt
        rows = [self.dataset.rows[i] for i in indices for _ in range(k)]
        prompts = [self.dataset.prompt_ids[i] for i in indices for _ in range(k)]
        return rows, prompts

    def decode(self, ids: torch.Tensor) -> str:
        ids = ids.tolist()
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def score(self, rows: list[dict[str, Any]], gen: Generation) -> torch.Tensor:
        """(B,) float32 rewards: reward_fn(prompt text, completion text, row) per sequence."""
        pkey = self.dataset.prompt_key
        texts = [str(row[pkey]) for row in rows]
        completions = [self.decode(r) for r in gen.response_ids]
        if self.reward_override is not None:  # the reward pods
            values = self.reward_override.score(texts, completions, rows, answer_key=self.dataset.answer_key)
        else:
            values = [self.reward_fn(p, c, row) for p, c, row in zip(texts, completions, rows)]
        scores = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise DataError("the reward returned NaN or inf", field="runtime.reward")
        return scores

    # ---------------------------------------------------------------------------- steps, metrics

    def steps(self, start: int) -> range:
        return range(start + 1, self.cfg.training.total_steps + 1)

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average of each metric over the trainer ranks (one all-reduce)."""
        if self.world_size == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        t = torch.tensor([metrics[n] for n in names], dtype=torch.float64)
        if dist.get_backend(self.group) == "nccl":
            t = t.to(self.device)
        dist.all_reduce(t, group=self.group)
        return {n: v / self.world_size for n, v in zip(names, t.tolist())}

    def log(self, step: int, metrics: dict[str, float], weights_version: int | None = None) -> None:
        for name in ("train/policy_loss", "critic/value_loss"):
            if name in metrics and not math.isfinite(metrics[name]):
                raise DataError(f"{name} is {metrics[name]} at step {step}", field="runtime.training.lr")
        self.last_metrics = metrics
        self.tracker.log(step, metrics)
        self.progress.update(step, metrics, weights_version=weights_version)

    @contextmanager
    def timed(self, metrics: dict[str, float], phase: str) -> Iterator[None]:
        """Adds the phase's wall time to metrics[f"time/{phase}_s"]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}_s"
            metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------------------ checkpoints

    def resume(self, app_state: dict[str, Any]) -> int:
        """Load the latest complete checkpoint into app_state (modules, optimizers, schedulers, the
        data position) when checkpoint.resume; returns its step, 0 when starting fresh."""
        step = self.checkpointer.latest() if self.cfg.checkpoint.resume else None
        if step is None:
            return 0
        self.checkpointer.load(step, {**app_state, "data": self.order})
        self.progress.resumed(step)
        done = (" (the last step: nothing left to run; start over with checkpoint.resume false,"
                " or kuberl local --no-resume)")
        self.note(f"resumed from checkpoint step {step}" + (done if step >= self.cfg.training.total_steps else ""))
        return step

    def maybe_save(self, step: int, app_state: dict[str, Any]) -> None:
        """Save at every checkpoint.interval steps and at the last step."""
        if not self.checkpointer.due(step, self.cfg.training.total_steps):
            return
        extras = {"data": self.order, "config": self.cfg.to_yaml_dict(), "metrics": self.last_metrics}
        self.checkpointer.save(step, {**app_state, **extras})
        self.progress.checkpointed(step)

    def note(self, text: str) -> None:
        if self.rank == 0:
            print(f"kuberl: {text}", flush=True)

    def finish(self) -> None:
        self.progress.finish("succeeded")
        self.tracker.close()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------- tensor plumbing


def pad(seqs: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """[(R_i,)] -> (B, T) right-padded float32."""
    return torch.nn.utils.rnn.pad_sequence([s.float() for s in seqs], batch_first=True, padding_value=value)


def response_mask(responses: list[torch.Tensor]) -> torch.Tensor:
    """(B, T) bool, True on each row's R_i response tokens."""
    return pad([torch.ones(r.numel()) for r in responses]).bool()


def unpad(x: torch.Tensor, responses: list[torch.Tensor]) -> list[torch.Tensor]:
    """(B, T) -> [(R_i,)]: the inverse of pad()."""
    return [x[i, : r.numel()].clone() for i, r in enumerate(responses)]


def sequence_rewards(scores: torch.Tensor, responses: list[torch.Tensor]) -> torch.Tensor:
    """(B,) scores -> (B, T) token rewards: each score on its response's last token."""
    out = torch.zeros(response_mask(responses).shape)
    for i, r in enumerate(responses):
        if r.numel():
            out[i, r.numel() - 1] = scores[i]
    return out


def weighted_sum(x: torch.Tensor, mb) -> torch.Tensor:
    """sum_t w_t * x_t over a micro-batch's valid tokens: its share of the mini-batch aggregate."""
    return torch.where(mb.mask, x * mb.weight, 0).sum()


def chunks(n: int, parts: int) -> list[slice]:
    """`parts` contiguous equal slices of range(n) (mini-batches of a rank's sequences)."""
    size = n // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


Recipe = Callable[[Job], None]
