"""GPU train-step pieces for one device: bf16 weights with float32 master copies and fused AdamW,
length-sorted micro-batches sized from free memory, and log-probs through the fused chunked head.

    step = FastTrainStep(policy, lr=1e-6)                  # policy: bf16 Qwen2/Llama module on CUDA
    batch = step.collate(prompts, responses)               # lists of 1-D LongTensors
    old = step.logprobs(batch)                             # (N,) float32, no grad, N = response tokens
    metrics = step.step(batch, loss_fn)                    # loss_fn(logp (n,), idx (n,)) -> scalar sum

`loss_fn` gets the log-probs of one micro-batch's response tokens and their indices into the
batch's flat token order (to pick advantages / old log-probs), and returns that micro-batch's share
of the loss (e.g. a token sum divided by the batch's token count), so the accumulated gradient is
the full batch's. The module's bf16 Parameters are updated in place from the float32 masters after
the step: a rollout engine reading the same module sees the new weights with no copy.

Packing: sequences are sorted by length and cut into as few micro-batches of at most
`micro_batch_tokens` padded tokens as fit, evened out (`pack_sorted`), right-padded within a
micro-batch (causal attention never lets a real token see the padding after it), so padding is only
the length spread inside one micro-batch. Shapes therefore vary from micro-batch to micro-batch;
the compiled layer pieces use automatic dynamic shapes (fast_model.FastModel, `varying_shapes`).

The float32 masters live in `master_module`, a module named exactly like the model
("model.layers.0.mlp.up_proj.weight", ...), so a checkpoint of it plus the optimizer holds the
full-precision state; loading it copies the masters back into the bf16 module. The pieces
`forward_micro` / `backward` / `apply` let engines/fast_train_engine.py run the recipes' loss
functions on the same machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .fast_model import FastModel, linear_logprobs, linear_logprobs_entropy


@dataclass
class MicroBatch:
    ids: torch.Tensor  # (b, T) right-padded prompt + response
    positions: torch.Tensor  # (b, T)
    rows: torch.Tensor  # (n,) flat index into (b * T) of the hidden state that predicts each response token
    labels: torch.Tensor  # (n,) the response tokens
    index: torch.Tensor  # (n,) position of each token in the batch's flat response order
    seqs: list[int]  # the batch's sequences in this micro-batch, in row order


@dataclass
class Batch:
    micro: list[MicroBatch]
    num_tokens: int  # N, all response tokens
    offsets: list[int]  # sequence i's tokens are flat[offsets[i] : offsets[i + 1]]


def activation_bytes_per_token(model: nn.Module, checkpoint: bool) -> int:
    """Rough bytes a token's activations keep for backward (bf16), from the architecture."""
    cfg = model.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 2 * (12 * h + 4 * i)  # norms, q/k/v (GQA-expanded), attention out, MLP in/out
    return 2 * h * layers + (per_layer if checkpoint else per_layer * layers)


def choose_micro_batch_tokens(model: nn.Module, free_bytes: int, total_tokens: int, checkpoint: bool) -> int:
    """The most tokens per micro-batch whose activations fit in half the free memory."""
    per_token = activation_bytes_per_token(model, checkpoint)
    return max(256, min(total_tokens, int(0.5 * free_bytes) // per_token))


class FastTrainStep:
    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        micro_batch_tokens: int | None = None,
        checkpoint: bool | None = None,
        logprob_chunk: int = 4096,
        temperature: float = 1.0,
        value_head: nn.Module | None = None,
        trainable: bool = True,
        compile_layers: bool = False,
    ) -> None:
        self.model, self.fm = model, FastModel(model, compile_layers=compile_layers, varying_shapes=True)
        # A value head turns this into a critic: outputs are values of the states before each
        # response token instead of the tokens' log-probs (the LM head is then unused). A
        # models.Critic carries its head as .value_head; a bare LM may be given one beside it.
        own_head = getattr(model, "value_head", None)
        self.value_head = value_head if value_head is not None else own_head
        self.micro_batch_tokens, self.checkpoint = micro_batch_tokens, checkpoint
        self.logprob_chunk, self.temperature = logprob_chunk, temperature
        self.max_grad_norm = max_grad_norm
        self._ckpt = False
        self.master_module: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        if not trainable:  # reference model: forward only, no masters, no optimizer state
            return
        # Tied weights (embedding = LM head) under every name they have: the checkpoint then holds
        # the same keys as the torch engine's, and a tied pair stays one master.
        named = list(model.named_parameters(remove_duplicate=False))
        if value_head is not None and value_head is not own_head:
            named += [(f"value_head.{n}", p) for n, p in value_head.named_parameters()]
        named = [(n, p) for n, p in named if p.requires_grad]
        unique, seen = [], set()
        for n, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((n, p))
        self.params = [p for _, p in unique]
        on_cuda = self.fm.device.type == "cuda"
        if self.fm.dtype in (torch.bfloat16, torch.float16):
            # float32 masters: bf16 keeps 8 mantissa bits, so lr 1e-6 updates would round away.
            self.master_module = master_module(named)
            self.master = [self.master_module.get_parameter(n) for n, _ in unique]
            # Master grads exist only between the first backward and the optimizer step (None
            # otherwise, as DCP expects of an optimizer it initialises before loading its state).
            self.master_module.register_load_state_dict_post_hook(lambda *_: self.push_masters())
        else:
            self.master = self.params
        self.opt = torch.optim.AdamW(
            self.master, lr=lr, betas=betas, weight_decay=weight_decay, fused=on_cuda, foreach=None if on_cuda else True
        )

    # ---------------------------------------------------------------------------------- batches

    def _plan(self, total_tokens: int) -> tuple[int, bool]:
        if self.micro_batch_tokens is not None:
            return self.micro_batch_tokens, bool(self.checkpoint)
        if self.fm.device.type != "cuda":
            return 8192, False
        free, _ = torch.cuda.mem_get_info(self.fm.device)
        free -= 2 * self.logprob_chunk * self.fm.shape.vocab * 4  # the head's float32 chunk + its exp
        for ckpt in ((False, True) if self.checkpoint is None else (self.checkpoint,)):
            tokens = choose_micro_batch_tokens(self.model, free, total_tokens, ckpt)
            # Without checkpointing, accept only micro-batches big enough to keep the GPU busy.
            if ckpt or tokens >= min(total_tokens, 16384):
                return tokens, ckpt
        return tokens, True

    def collate(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> Batch:
        dev = self.fm.device
        lengths = [p.numel() + r.numel() for p, r in zip(prompts, responses, strict=True)]
        offsets = [0]
        for r in responses:
            offsets.append(offsets[-1] + r.numel())
        budget, self._ckpt = self._plan(sum(lengths))
        groups = pack_sorted(lengths, budget)
        micro = []
        for g in groups:
            t = max(lengths[i] for i in g)
            ids = torch.zeros(len(g), t, dtype=torch.long)
            rows, labels, index = [], [], []
            for j, i in enumerate(g):
                p, r = prompts[i], responses[i]
                ids[j, : lengths[i]] = torch.cat([p, r])
                start = j * t + p.numel() - 1  # hidden at position k predicts token k + 1
                rows.append(torch.arange(start, start + r.numel()))
                labels.append(r)
                index.append(torch.arange(offsets[i], offsets[i + 1]))
            micro.append(
                MicroBatch(
                    ids=ids.to(dev, non_blocking=True),
                    positions=torch.arange(t).expand(len(g), t).to(dev, non_blocking=True),
                    rows=torch.cat(rows).to(dev, non_blocking=True),
                    labels=torch.cat(labels).to(dev, non_blocking=True),
                    index=torch.cat(index).to(dev, non_blocking=True),
                    seqs=g,
                )
            )
        return Batch(micro=micro, num_tokens=offsets[-1], offsets=offsets)

    # --------------------------------------------------------------------------------- compute

    def forward_micro(self, mb: MicroBatch, *, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n,) float32 log-probs (values, for a critic) of mb's response tokens, and their (n,)
        entropies when asked (policies only); with grad when grad is enabled."""
        hidden = self.fm.hidden_states(mb.ids, mb.positions, checkpoint=self._ckpt)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.rows)
        if self.value_head is not None:
            return self.value_head(rows).squeeze(-1).float(), None
        w, t, c = self.fm.lm_head_weight, self.temperature, self.logprob_chunk
        if entropy:
            return linear_logprobs_entropy(rows, w, mb.labels, t, c)
        return linear_logprobs(rows, w, mb.labels, t, c), None

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """(N,) float32 log-probs (values, for a critic) of every response token, in flat order."""
        out = torch.empty(batch.num_tokens, dtype=torch.float32, device=self.fm.device)
        for mb in batch.micro:
            out[mb.index] = self.forward_micro(mb)[0]
        return out

    values = logprobs  # a critic's forward: same rows, value head instead of LM head

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, its gradient added to the float32 masters."""
        loss.backward()
        if self.master is not self.params:
            # Accumulate in float32: the bf16 .grad of one micro-batch is added, then dropped.
            pairs = [(m, p.grad) for m, p in zip(self.master, self.params, strict=True) if p.grad is not None]
            for m, g in pairs:
                if m.grad is None:
                    m.grad = torch.zeros_like(m)
            torch._foreach_add_([m.grad for m, _ in pairs], [g for _, g in pairs])
            for p in self.params:
                p.grad = None

    def apply(self) -> torch.Tensor:
        """Clip, one AdamW step on the masters, masters into the module in place; the grad norm."""
        limit = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.master, limit, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # float32 grads freed until the next backward
        if self.master is not self.params:
            self.push_masters()
        return norm

    @torch.no_grad()
    def push_masters(self) -> None:
        """The masters into the module's own Parameters, in place: the rollout engine sees them."""
        torch._foreach_copy_(self.params, self.master)

    def step(self, batch: Batch, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Forward + backward over every micro-batch, then one clipped AdamW step on the masters."""
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.fm.device)
        for mb in batch.micro:
            loss = loss_fn(self.forward_micro(mb)[0], mb.index)
            self.backward(loss)
            loss_sum += loss.detach()
        norm = self.apply()
        return {"train/loss": float(loss_sum), "train/grad_norm": float(norm), "train/micro_batches": len(batch.micro)}


def pack_sorted(lengths: list[int], budget: int) -> list[list[int]]:
    """Sequence indices sorted by length, cut into micro-batches of at most `budget` padded tokens
    (count x longest member), as few as fit and then evened out: 512 equal sequences that fit 456
    at a time become 256 + 256, not 456 + 56 (a small remainder is a poorly used GPU pass and one
    more shape to compile). A sequence longer than the budget gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    greedy, cur = [], []
    for i in order:  # lengths ascend, so the last member sets the micro-batch's padded length
        if cur and (len(cur) + 1) * lengths[i] > budget:
            greedy.append(cur)
            cur = []
        cur.append(i)
    greedy.append(cur)
    k, n = len(greedy), len(order)
    if k == 1:
        return greedy
    # The same count of micro-batches with sizes differing by at most one, if each still fits.
    even, start = [], 0
    for j in range(k):
        size = n // k + (1 if j < n % k else 0)
        even.append(order[start : start + size])
        start += size
    if all(len(g) * lengths[g[-1]] <= budget for g in even):
        return even
    return greedy


def master_module(named: list[tuple[str, torch.Tensor]]) -> nn.Module:
    """float32 copies of `named` parameters in a module tree with the same names (checkpoint keys);
    a tensor named twice (tied) gets one copy registered under both names."""
    root, made = nn.Module(), {}
    for name, p in named:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        if id(p) not in made:
            made[id(p)] = nn.Parameter(p.detach().float().clone())
        node.register_parameter(leaf, made[id(p)])
    return root
