"""The built-in train engine: a model, its AdamW optimizer and schedule, in plain torch / DDP / FSDP2.

    engine = TorchTrainEngine(policy, cfg.training, lr=cfg.training.lr, pad_token_id=tok.pad_token_id,
                              total_optimizer_steps=n, process_group=group)
    out = engine.forward(prompts, responses, entropy=True)      # no grad: per-sequence (R_i,) tensors
    metrics = engine.train_step(prompts, responses, extras, loss_fn, aggregation="token-mean")
    rollout.update_weights(engine.named_weights(), version)

Sequences are lists of 1-D token tensors (prompt and response apart). Inside, they are sorted by
length and cut into micro-batches of `microBatchSize` rows, each right-padded only to its own
longest row. The LM head runs only on response positions, gathered into one packed (N, H) tensor
and cut into chunks of `logprobChunkSize` tokens, each recomputed in backward: the full-vocabulary
logits of a whole batch never exist at once.

Exact normalisation over micro-batches and ranks: before the first micro-batch, every response
token gets a weight w_t from the aggregation ("token-mean": 1 / global token count, "seq-mean-
token-mean": 1 / (|y_i| x global sequence count), ...), with the counts all-reduced over ranks.
`loss_fn` returns sum_t w_t * loss_t for its micro-batch; gradients of all micro-batches add up to
the gradient of the aggregated loss over the whole mini-batch, on any number of ranks.

Wrapping: one process -> the module itself; a gloo group (CPU) -> DDP; a GPU with `fsdp` -> FSDP2
(`fully_shard` per decoder layer, then the root), optional CPU offload and bf16 mixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from kuberl_runtime.algorithms import entropy_from_logits, logprobs_from_logits
from kuberl_runtime.config import TrainingConfig


# --------------------------------------------------------------------------------------- batches


@dataclass
class MicroBatch:
    """What a loss function sees: one right-padded micro-batch, (B, T) over response tokens."""

    mask: torch.Tensor  # (B, T) bool: real response tokens
    weight: torch.Tensor  # (B, T) float: the token's share of the mini-batch loss (see module doc)
    extras: dict[str, torch.Tensor]  # (B, T) each: old log-probs, advantages, returns, ...
    logprobs: torch.Tensor | None = None  # (B, T) with grad (policy engines)
    entropy: torch.Tensor | None = None  # (B, T) (when asked for)
    values: torch.Tensor | None = None  # (B, T) with grad (critic engines)


@dataclass
class ForwardOut:
    logprobs: list[torch.Tensor] = field(default_factory=list)  # (R_i,) float32 per sequence
    entropy: list[torch.Tensor] = field(default_factory=list)  # (R_i,) when asked for
    values: list[torch.Tensor] = field(default_factory=list)  # (R_i,) critic engines


LossFn = Callable[[MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def token_weights(lengths: list[int], aggregation: str, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Per-sequence (R_i,) weights so that sum_i sum_t w_t * l_t is the `aggregation` of l.

    Counts are summed over the ranks of `group`, so every rank's weights belong to one global
    mini-batch. "token-sum" is the plain sum (w = 1).
    """
    counts = torch.tensor([sum(lengths), sum(1 for n in lengths if n)], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    tokens, seqs = max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)
    per_seq = {
        "token-mean": lambda n: 1.0 / tokens,
        "seq-mean-token-mean": lambda n: 1.0 / (max(n, 1) * seqs),
        "seq-mean-token-sum": lambda n: 1.0 / seqs,
        "token-sum": lambda n: 1.0,
    }
    if aggregation not in per_seq:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: {', '.join(per_seq)}")
    return [torch.full((n,), per_seq[aggregation](n), dtype=torch.float32) for n in lengths]


def pad_right(seqs: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    """[(R_i,)] -> (B, max R_i), padded with `value` on the right."""
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)


# ---------------------------------------------------------------------------------- the wrapper


class _Scorer(nn.Module):
    """The module that FSDP/DDP wrap: backbone forward + chunked LM head (or value head).

    Everything runs inside one forward() so FSDP2's root unit (embeddings, final norm, head) is
    unsharded for the whole computation, and DDP sees one forward per backward.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.is_critic = hasattr(model, "value_head")

    def forward(self, input_ids, attention_mask, position_ids, rows, cols, labels, temperature: float, with_entropy: bool):
        # input_ids (B, L); rows/cols (N,): where each response token's *predicting* hidden sits.
        if self.is_critic:
            values = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return values[rows, cols].float(), None
        backbone, head = self.model.base_model, self.model.get_output_embeddings()
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        packed = hidden[rows, cols]  # (N, H): padding-free from here on
        logps, ents = [], []
        for s in range(0, packed.shape[0], self.chunk_tokens):
            h, y = packed[s : s + self.chunk_tokens], labels[s : s + self.chunk_tokens]
            if torch.is_grad_enabled():
                # Recomputed in backward: only (chunk, H) is kept, never (chunk, V) per chunk.
                lp, ent = checkpoint(_head_chunk, head, h, y, temperature, with_entropy, use_reentrant=False)
            else:
                lp, ent = _head_chunk(head, h, y, temperature, with_entropy)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def _head_chunk(head: nn.Module, h: torch.Tensor, y: torch.Tensor, temperature: float, with_entropy: bool):
    logits = head(h).float() / temperature  # (chunk, V): the same scaling as the sampler
    ent = entropy_from_logits(logits) if with_entropy else torch.zeros(())
    return logprobs_from_logits(logits, y), ent


# ------------------------------------------------------------------------------------ the engine


class TorchTrainEngine:
    """A policy (causal LM) or critic (`models.Critic`) with AdamW, warm-up + schedule, grad clip.

    A model without trainable parameters (the frozen reference) gets no optimizer: forward only.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainingConfig,
        *,
        pad_token_id: int,
        lr: float = 0.0,
        total_optimizer_steps: int = 1,
        process_group: dist.ProcessGroup | None = None,
        fsdp: bool | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.temperature = temperature if temperature > 0 else 1.0
        self.group = process_group
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        self.device = next(model.parameters()).device
        self.module = model  # unwrapped: named_weights() and the colocated rollout engine read it
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif cfg.gradient_checkpointing and hasattr(model, "backbone"):
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        scorer = _Scorer(model, cfg.logprob_chunk_size)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.fsdp = self.device.type == "cuda" and process_group is not None if fsdp is None else fsdp
        if self.fsdp:
            self.scorer = _fully_shard(scorer, process_group, cpu_offload=cfg.cpu_offload)
        elif self.world_size > 1 and trainable:
            # DDP averages gradients over ranks; _backward() scales by world size to get sums back.
            self.scorer = nn.parallel.DistributedDataParallel(scorer, process_group=process_group)
        else:
            self.scorer = scorer  # one process, or a frozen model (the reference): nothing to sync
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if trainable:
            fused = self.device.type == "cuda" and not cfg.cpu_offload
            self.optimizer = torch.optim.AdamW(
                [p for p in self.scorer.parameters() if p.requires_grad],
                lr=lr,
                betas=cfg.adam_betas,
                weight_decay=cfg.weight_decay,
                fused=fused or None,
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, _schedule(cfg.lr_schedule, cfg.warmup_steps, total_optimizer_steps)
            )

    # ------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, prompts: list[torch.Tensor], responses: list[torch.Tensor], *, entropy: bool = False) -> ForwardOut:
        """Per-sequence log-probs (policy) or values (critic) of the responses, no grad."""
        self.scorer.eval()
        n = len(prompts)
        main: list[torch.Tensor | None] = [None] * n
        ents: list[torch.Tensor | None] = [None] * n
        for idx, mb in self._micro_batches(prompts, responses):
            lp, ent = self._score(mb, with_entropy=entropy)
            lens = [responses[i].numel() for i in idx]
            for i, part in zip(idx, lp.cpu().split(lens)):
                main[i] = part
            if entropy and ent is not None:
                for i, part in zip(idx, ent.cpu().split(lens)):
                    ents[i] = part
        self.scorer.train()
        if self._is_critic:
            return ForwardOut(values=main)
        return ForwardOut(logprobs=main, entropy=ents if entropy else [])

    def forward_logprobs(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.forward(prompts, responses).logprobs

    # ---------------------------------------------------------------------------------- update

    def train_step(
        self,
        prompts: list[torch.Tensor],
        responses: list[torch.Tensor],
        extras: dict[str, list[torch.Tensor]],
        loss_fn: LossFn,
        *,
        aggregation: str = "token-mean",
        entropy: bool = False,
    ) -> dict[str, float]:
        """One optimizer step over this rank's part of a mini-batch, micro-batch by micro-batch.

        extras: per-sequence (R_i,) tensors (old log-probs, advantages, ...), padded per micro-batch.
        Returns the micro-batch metrics averaged by token count and over ranks, plus grad_norm, lr.
        """
        weights = token_weights([r.numel() for r in responses], aggregation, self.group)
        sums: dict[str, float] = {}
        tokens = 0
        self.optimizer.zero_grad(set_to_none=True)
        batches = list(self._micro_batches(prompts, responses))
        for n, (idx, mb) in enumerate(batches):
            lp, ent = self._score(mb, with_entropy=entropy)
            micro = MicroBatch(
                mask=mb["mask"],
                weight=_pad_as(mb, [weights[i] for i in idx]),
                extras={k: _pad_as(mb, [v[i] for i in idx]) for k, v in extras.items()},
                entropy=_unpack(mb, ent) if ent is not None else None,
            )
            if self._is_critic:
                micro.values = _unpack(mb, lp)
            else:
                micro.logprobs = _unpack(mb, lp)
            loss, metrics = loss_fn(micro)
            self._backward(loss, last=n == len(batches) - 1)
            k = int(mb["mask"].sum())
            tokens += k
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * k
        grad_norm = self._clip_and_step()
        out = {name: s / max(tokens, 1) for name, s in sums.items()}
        out = self._mean_over_ranks(out)
        out["grad_norm"] = grad_norm
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # DDP and FSDP2 average gradients over ranks; the weights already divide by global counts,
        # so scaling by world size turns their average back into the exact global sum.
        scaled = loss * self.world_size
        if isinstance(self.scorer, nn.parallel.DistributedDataParallel) and not last:
            with self.scorer.no_sync():  # all-reduce once, on the last micro-batch
                scaled.backward()
        else:
            if self.fsdp and hasattr(self.scorer, "set_requires_gradient_sync"):
                self.scorer.set_requires_gradient_sync(last)
            scaled.backward()

    def _clip_and_step(self) -> float:
        params = [p for p in self.scorer.parameters() if p.grad is not None]
        if self.cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    # ---------------------------------------------------------------------------------- weights

    @property
    def _is_critic(self) -> bool:
        return hasattr(self.module, "value_head")

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights named as in the unwrapped model (the rollout engine's naming), one by one.

        FSDP2 shards are gathered one parameter at a time (`full_tensor()`), so at most one
        unsharded tensor exists beyond the model; plain/DDP parameters are yielded as they are.
        """
        for name, p in self.module.named_parameters():
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    # -------------------------------------------------------------------------------- internals

    def _micro_batches(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> Iterable[tuple[list[int], dict]]:
        """Sorted by total length (less padding), cut into microBatchSize rows, right-padded."""
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].numel() + responses[i].numel())
        size = self.cfg.micro_batch_size
        for s in range(0, len(order), size):
            idx = order[s : s + size]
            yield idx, self._collate([prompts[i] for i in idx], [responses[i] for i in idx])

    def _collate(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> dict:
        seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
        ids = pad_right(seqs, self.pad_token_id).to(self.device)  # (B, L)
        attn = pad_right([torch.ones_like(s) for s in seqs]).to(self.device)
        pos = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        rows, cols = [], []
        for b, (p, r) in enumerate(zip(prompts, responses)):
            # Token at position P + t is predicted by the hidden state at P + t - 1.
            cols.append(torch.arange(p.numel() - 1, p.numel() - 1 + r.numel()))
            rows.append(torch.full((r.numel(),), b))
        lens = [r.numel() for r in responses]
        mask = pad_right([torch.ones(n, dtype=torch.bool) for n in lens]).to(self.device)
        return {
            "input_ids": ids, "attention_mask": attn, "position_ids": pos,
            "rows": torch.cat(rows).to(self.device), "cols": torch.cat(cols).to(self.device),
            "labels": torch.cat(list(responses)).to(self.device), "mask": mask,
        }

    def _score(self, mb: dict, with_entropy: bool):
        return self.scorer(
            mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["rows"], mb["cols"], mb["labels"],
            self.temperature, with_entropy,
        )

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        t = torch.tensor([metrics[n] for n in names], dtype=torch.float64)
        if self.fsdp:
            t = t.to(self.device)
        dist.all_reduce(t, group=self.group)
        return {n: v / self.world_size for n, v in zip(names, t.tolist())}


def _unpack(mb: dict, packed: torch.Tensor) -> torch.Tensor:
    """(N,) packed response values -> (B, T) right-padded like mb["mask"] (zeros in padding)."""
    out = torch.zeros(mb["mask"].shape, dtype=packed.dtype, device=packed.device)
    return out.masked_scatter(mb["mask"], packed)


def _pad_as(mb: dict, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Per-sequence (R_i,) tensors -> (B, T) on mb's device, shaped like mb["mask"]."""
    return pad_right([s.float() for s in seqs]).to(mb["mask"].device)


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then constant / linear / cosine decay to 0."""
    total = max(total, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _fully_shard(scorer: _Scorer, group: dist.ProcessGroup | None, *, cpu_offload: bool) -> nn.Module:
    """FSDP2: each decoder layer its own unit, then the root (embeddings, norm, head) as one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if group is not None:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(group, "cuda")
    else:
        mesh = init_device_mesh("cuda", (1,))
    kwargs = {"mesh": mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    param_dtype = next(scorer.parameters()).dtype
    if param_dtype == torch.float32 and torch.cuda.is_bf16_supported():
        # fp32 master weights and optimizer state, bf16 compute and all-gathers, fp32 reductions.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = getattr(getattr(scorer.model, "base_model", scorer.model), "layers", None)
    if layers is None and hasattr(scorer.model, "backbone"):
        layers = getattr(scorer.model.backbone, "layers", None)
    for layer in layers or []:
        fully_shard(layer, **kwargs)
    return fully_shard(scorer, **kwargs)
