"""The fast train step behind the recipes' train-engine interface (what TorchTrainEngine offers).

    engine = FastTrainEngine(policy, cfg.training, lr=cfg.training.lr, pad_token_id=tok.pad_token_id,
                             total_optimizer_steps=n, temperature=cfg.rollout.temperature)
    out = engine.forward(prompts, responses, entropy=True)      # no grad: per-sequence (R_i,) tensors
    metrics = engine.train_step(prompts, responses, extras, loss_fn, aggregation="token-mean")
    app_state = {"model": engine.module, "optimizer": engine.optimizer, "scheduler": engine.scheduler}

It runs one unsharded model on one device (a trainer with one process on one GPU): bf16 weights
with float32 masters and fused AdamW (FastTrainStep), sequences packed into micro-batches by a token
budget chosen from free memory (`training.microBatchSize` is not used), log-probs and entropies
through the fused chunked head. The recipes' loss functions see the same `MicroBatch` as with
TorchTrainEngine: (B, T) log-probs/values, mask, token weights and extras of one micro-batch, and
the token weights normalise over the whole mini-batch exactly as there (`token_weights`).

Two modules, on purpose:
- `model`: the bf16 transformers module that computes; the colocated rollout engine runs it, and
  the optimizer step writes the new weights into its Parameters in place (no sync copy).
- `module`: what a checkpoint holds. With bf16 weights it is the float32 master module, named like
  the model, which the optimizer updates (so DCP keys the optimizer state by the model's names);
  loading it copies the masters back into `model`. With float32 weights both are the model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kuberl_runtime.config import TrainingConfig

from .fast_train import FastTrainStep
from .torch_train import ForwardOut, LossFn, MicroBatch, _schedule, pad_right, token_weights


class FastTrainEngine:
    """A policy (causal LM) or critic (`models.Critic`); frozen models get no optimizer."""

    fsdp = False  # never sharded: the colocated rollout engine reads `model` directly

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainingConfig,
        *,
        pad_token_id: int,
        lr: float = 0.0,
        total_optimizer_steps: int = 1,
        temperature: float = 1.0,
        micro_batch_tokens: int | None = None,
        compile_layers: bool = False,
    ) -> None:
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.temperature = temperature if temperature > 0 else 1.0
        trainable = any(p.requires_grad for p in model.parameters())
        self.step = FastTrainStep(
            model,
            lr=lr,
            betas=cfg.adam_betas,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip,
            micro_batch_tokens=micro_batch_tokens,
            # On: always recompute; off: chosen from free memory (off when it fits).
            checkpoint=True if cfg.gradient_checkpointing else None,
            logprob_chunk=cfg.logprob_chunk_size,
            temperature=self.temperature,
            trainable=trainable,
            compile_layers=compile_layers,
        )
        self.model = model
        self.module = self.step.master_module if self.step.master_module is not None else model
        self.device = self.step.fm.device
        self.optimizer = self.step.opt
        self.scheduler = None
        if self.optimizer is not None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, _schedule(cfg.lr_schedule, cfg.warmup_steps, total_optimizer_steps)
            )

    @property
    def _is_critic(self) -> bool:
        return self.step.value_head is not None

    # ------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, prompts: list[torch.Tensor], responses: list[torch.Tensor], *, entropy: bool = False) -> ForwardOut:
        """Per-sequence log-probs (policy) or values (critic) of the responses, no grad."""
        batch = self.step.collate(prompts, responses)
        n = batch.num_tokens
        main = torch.empty(n, dtype=torch.float32, device=self.device)
        ents = torch.empty(n, dtype=torch.float32, device=self.device)
        want_entropy = entropy and not self._is_critic
        for mb in batch.micro:
            out, ent = self.step.forward_micro(mb, entropy=want_entropy)
            main[mb.index] = out
            if want_entropy:
                ents[mb.index] = ent
        lens = [r.numel() for r in responses]
        per_seq = list(main.cpu().split(lens))
        if self._is_critic:
            return ForwardOut(values=per_seq)
        return ForwardOut(logprobs=per_seq, entropy=list(ents.cpu().split(lens)) if want_entropy else [])

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
        """One optimizer step over a mini-batch, micro-batch by micro-batch (as TorchTrainEngine).

        Returns the loss function's metrics averaged by token count, plus grad_norm and lr.
        """
        lengths = [r.numel() for r in responses]
        weights = token_weights(lengths, aggregation)
        batch = self.step.collate(prompts, responses)
        self.model.train()
        # No host read until the optimizer step: token counts come from the lengths, per-token
        # inputs travel from pinned memory without a blocking copy, and the metrics add up on the
        # device, so the host queues micro-batch after micro-batch while the GPU works.
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for mb in batch.micro:
            idx = mb.seqs
            mask = _to_device(pad_right([torch.ones(lengths[i], dtype=torch.bool) for i in idx]), self.device)
            out, ent = self.step.forward_micro(mb, entropy=entropy and not self._is_critic)
            micro = MicroBatch(
                mask=mask,
                weight=_pad_as(mask, [weights[i] for i in idx]),
                extras={k: _pad_as(mask, [v[i] for i in idx]) for k, v in extras.items()},
                entropy=_unpack(mask, ent) if ent is not None else None,
            )
            if self._is_critic:
                micro.values = _unpack(mask, out)
            else:
                micro.logprobs = _unpack(mask, out)
            loss, metrics = loss_fn(micro)
            self.step.backward(loss)
            k = sum(lengths[i] for i in idx)
            tokens += k
            for name, value in metrics.items():
                value = torch.as_tensor(value).detach().to(self.device, torch.float32) * k
                sums[name] = sums[name] + value if name in sums else value
        grad_norm = self.step.apply()
        self.scheduler.step()
        names = list(sums)
        values = torch.stack([sums[n] for n in names] + [grad_norm.float().reshape(())]).tolist()  # one read
        result = {name: v / max(tokens, 1) for name, v in zip(names, values[:-1], strict=True)}
        result["grad_norm"] = values[-1]
        result["lr"] = self.scheduler.get_last_lr()[0]
        return result

    # ---------------------------------------------------------------------------------- weights

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The computing model's weights (the rollout engine's naming and dtype), one by one."""
        for name, p in self.model.named_parameters():
            yield name, p.detach()

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])  # masters: copied into `model` by a load hook
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _unpack(mask: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """(n,) packed response values (row after row) -> (B, T) shaped like mask, zeros in padding."""
    return torch.zeros(mask.shape, dtype=packed.dtype, device=packed.device).masked_scatter(mask, packed)


def _pad_as(mask: torch.Tensor, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Per-sequence (R_i,) tensors -> (B, T) float32 on mask's device."""
    return _to_device(pad_right([s.float() for s in seqs]), mask.device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without blocking the host (pinned staging) when that is a GPU."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
