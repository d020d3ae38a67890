"""The built-in rollout engine: batched sampling with a KV cache on any transformers causal LM.

    engine = HFRolloutEngine(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=64, seed=0))
    gen.response_ids[i], gen.response_logprobs[i]      # (R_i,) each; EOS included when sampled
    engine.update_weights(train_engine.named_weights(), version=step)

Prompts are left-padded so every row's next token sits in the last column; one prefill builds the
cache (transformers DynamicCache), then one token per step for the rows still running. Colocated
with the train engine on the same module (the hybrid engine), `update_weights` copies nothing.
Works on CPU and GPU; a faster CUDA-graph engine implements the same interface.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable

import torch
from torch import nn

from .base import Generation, SamplingParams


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k / nucleus top-p set with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _cache_kwarg(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: `cache` from transformers 5.24, `past_key_values` before.

    5.24 renamed it and warns on the old name (removed in 5.40); asking the signature keeps both working.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFRolloutEngine:
    """Generation on a transformers model; `shares_module=True` when it is the train engine's module."""

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int,
        max_batch_size: int | None = None,
        shares_module: bool = True,
    ) -> None:
        self.model = model
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.max_batch_size = max_batch_size
        self.shares_module = shares_module
        self.weights_version = 0
        self._cache_kwarg = _cache_kwarg(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (1,))))
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling: log-probs must match the sampler
        size = self.max_batch_size or len(prompts)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for start in range(0, len(prompts), size):
                out += self._generate_batch(prompts[start : start + size], params, gen)
        finally:
            self.model.train(was_training)
        n_tokens = sum(r.numel() for r, _ in out)
        elapsed = time.perf_counter() - t0
        return Generation(
            prompt_ids=list(prompts),
            response_ids=[r for r, _ in out],
            response_logprobs=[lp for _, lp in out],
            metrics={"rollout/tokens_per_s": n_tokens / max(elapsed, 1e-9), "time/generate_s": elapsed},
        )

    def _generate_batch(
        self, prompts: list[torch.Tensor], params: SamplingParams, gen: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from transformers import DynamicCache

        dev, b = self.device, len(prompts)
        plen = max(p.numel() for p in prompts)
        ids = torch.full((b, plen), self.pad_token_id, dtype=torch.long, device=dev)
        attn = torch.zeros((b, plen), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):  # left padding: the last column is every row's last token
            ids[i, plen - p.numel() :] = p.to(dev)
            attn[i, plen - p.numel() :] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, P): positions count real tokens only

        cache = {self._cache_kwarg: DynamicCache(config=self.model.config)}
        tokens = torch.full((b, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros((b, params.max_new_tokens), dtype=torch.float32, device=dev)
        lengths = torch.full((b,), params.max_new_tokens, dtype=torch.long, device=dev)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        step_ids, step_pos = ids, pos
        for t in range(params.max_new_tokens):
            logits = self.model(
                input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True, **cache
            ).logits[:, -1, :].float()  # (B, V)
            tok, lp = self._sample(logits, params, gen)
            tok = torch.where(finished, self.pad_token_id, tok)
            tokens[:, t], logprobs[:, t] = tok, torch.where(finished, 0.0, lp)
            if not params.ignore_eos:
                newly = (tok == self.eos_token_id) & ~finished
                lengths = torch.where(newly, t + 1, lengths)
                finished |= newly
                if bool(finished.all()):  # sync point: one host read per decode step
                    break
            step_ids, step_pos = tok[:, None], step_pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=dev)], dim=1)
        lengths = lengths.tolist()
        return [(tokens[i, : lengths[i]].cpu(), logprobs[i, : lengths[i]].cpu()) for i in range(b)]

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator):
        """(B, V) logits -> (tokens (B,), log-probs (B,) under softmax(logits / temperature)).

        The log-prob is that of the temperature-scaled distribution before top-k/top-p, which is
        the distribution the train engine recomputes (it divides logits by the same temperature).
        """
        if params.temperature == 0:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
        scaled = logits / params.temperature
        probs = torch.softmax(_filter_logits(scaled, params.top_k, params.top_p), dim=-1)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return tok, torch.log_softmax(scaled, -1).gather(-1, tok[:, None]).squeeze(-1)

    # ---------------------------------------------------------------------------------- weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights; nothing to copy when this engine runs the train engine's own module."""
        if not self.shares_module:
            params = dict(self.model.named_parameters())
            for name, tensor in named_tensors:
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        self.weights_version = version

    def sleep(self) -> None:
        """The KV cache lives only inside generate(); hand its freed blocks back to the GPU."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to re-acquire: the cache is allocated per generate() call."""
