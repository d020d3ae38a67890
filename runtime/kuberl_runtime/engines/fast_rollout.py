"""The fast built-in rollout engine: static KV cache, batched GPU sampling, CUDA-graph decode.

    engine = FastRolloutEngine(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=256, seed=0))
    engine.update_weights(train_engine.named_weights(), version=step)   # colocated: no copy at all

How a batch is generated:
1. Prompts are left-padded to the longest (P) so every row's next token lands in the same cache
   slot; positions count real tokens only and padded keys are masked, so padding changes nothing.
2. One prefill over (B, P) fills a preallocated cache (per layer (B, kv_heads, P + N, D)) and
   samples the first token from the last column.
3. Each further token is one decode step over static buffers: embed, 24 layers of projections and
   attention over the first Lb cache slots, the LM head, sampling (temperature, top-k, top-p via an
   exponential race, so no host sync), EOS bookkeeping, and the write of the token and its
   log-prob into output buffers. On CUDA that step is captured once per Lb bucket (Lb a multiple
   of `bucket` covering the slots in use) as a CUDA graph, so attention reads only the slots a step
   can see and the host does one replay() per token whatever the batch size.
4. With EOS enabled the host checks for "all finished" every `stop_check_every` steps only.

The weights are the module's own Parameters (FastModel), so when the train engine updates the
module in place the next generate() sees it; graphs are dropped only if a weight's storage moved.
On CPU the same step runs eagerly (tests, tiny demos); `use_cuda_graph=False` forces that on GPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Generation, SamplingParams
from .fast_model import FastModel


def filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k / nucleus top-p set with -inf (no host sync)."""
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        p = torch.softmax(sorted_z, dim=-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # the mass before a token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None):
    """(B, V) float32 logits -> tokens (B,), log-probs (B,) under softmax(logits / temperature).

    The log-prob is that of the temperature-scaled distribution before top-k/top-p (what the train
    engine recomputes). Sampling is an exponential race, argmax(p / E) with E ~ Exp(1), which draws
    from p exactly like multinomial but as fixed-shape kernels that a CUDA graph can hold.
    """
    if params.temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    z = logits / params.temperature if params.temperature != 1.0 else logits
    lse = torch.logsumexp(z, -1)
    probs = torch.softmax(filter_logits(z, params.top_k, params.top_p), dim=-1)
    race = torch.empty_like(probs).exponential_(generator=gen)
    tok = (probs / race).argmax(-1)
    return tok, z.gather(-1, tok[:, None]).squeeze(-1) - lse


def race(logits: torch.Tensor, noise: torch.Tensor, temperature: float):
    """Plain sampling (no top-k/top-p) as one fused pass: bf16 logits (B, V), Exp(1) noise (B, V)
    -> tokens, log-probs. argmax(z - log E) == argmax(softmax(z) / E): the same exponential race
    as `sample`, without materialising float32 logits or probabilities (torch.compile fuses it)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    tok = (z - noise.log()).argmax(-1)
    return tok, z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


@dataclass
class _State:
    """Static buffers of one batch shape; CUDA graphs capture their addresses."""

    key: tuple
    k: list[torch.Tensor]  # per layer (B, kv_heads, L, D)
    v: list[torch.Tensor]
    tok: torch.Tensor  # (B,) last sampled token, input of the next step
    pos: torch.Tensor  # (B,) its position id
    pad: torch.Tensor  # (B,) left padding of each row: slots < pad are masked
    slot: torch.Tensor  # (1,) cache slot the next step writes
    step: torch.Tensor  # (1,) output column the next step writes
    out_tok: torch.Tensor  # (B, N)
    out_lp: torch.Tensor  # (B, N) float32
    finished: torch.Tensor  # (B,) bool
    length: torch.Tensor  # (B,) response length (N until EOS)
    arange: torch.Tensor  # (L,)
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)
    pointers: tuple = ()


class FastRolloutEngine:
    """RolloutEngine on a Qwen2/Llama transformers module (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int,
        max_batch_size: int | None = None,
        shares_module: bool = True,
        use_cuda_graph: bool | None = None,
        compile_layers: bool = False,
        bucket: int = 64,
        prefill_tokens: int = 65536,
        stop_check_every: int = 16,
    ) -> None:
        self.model = model
        self.fm = FastModel(model, compile_layers=compile_layers)
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.max_batch_size = max_batch_size
        self.shares_module = shares_module
        on_cuda = self.fm.device.type == "cuda"
        if use_cuda_graph and not on_cuda:
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
        self.use_cuda_graph = on_cuda if use_cuda_graph is None else use_cuda_graph
        self.bucket, self.prefill_tokens, self.stop_check_every = bucket, prefill_tokens, stop_check_every
        self.weights_version = 0
        self._state: _State | None = None
        self._gen: torch.Generator | None = None
        self._race = torch.compile(race, dynamic=False) if compile_layers else race

    @property
    def device(self) -> torch.device:
        return self.fm.device

    # ------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device)
            self._state = None  # graphs hold the old generator
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)))
        size = self.max_batch_size or len(prompts)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(prompts), size):
            out += self._generate_batch(prompts[start : start + size], params, seed + start)
        n_tokens = sum(r.numel() for r, _ in out)
        elapsed = time.perf_counter() - t0
        return Generation(
            prompt_ids=list(prompts),
            response_ids=[r for r, _ in out],
            response_logprobs=[lp for _, lp in out],
            metrics={"rollout/tokens_per_s": n_tokens / max(elapsed, 1e-9), "time/generate_s": elapsed},
        )

    def _generate_batch(self, prompts: list[torch.Tensor], params: SamplingParams, seed: int):
        dev, b, n = self.device, len(prompts), params.max_new_tokens
        lens = torch.tensor([p.numel() for p in prompts], dtype=torch.long)
        plen = int(lens.max())
        st = self._ensure_state(b, plen, n, params)
        self._gen.manual_seed(seed)  # after capture: its warm-up steps drew from the generator

        ids = torch.full((b, plen), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, plen - p.numel() :] = p
        ids = ids.to(dev, non_blocking=True)
        pad = (plen - lens).to(dev)
        valid = torch.arange(plen, device=dev)[None, :] >= pad[:, None]
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)

        # Prefill in row chunks (bounded activations), filling cache slots [0, P).
        last = torch.empty(b, self.fm.shape.hidden, dtype=self.fm.dtype, device=dev)
        rows = max(1, self.prefill_tokens // plen)
        for s in range(0, b, rows):
            e = min(b, s + rows)

            def sink(i, k, v, s=s, e=e):
                st.k[i][s:e, :, :plen] = k.transpose(1, 2)
                st.v[i][s:e, :, :plen] = v.transpose(1, 2)

            hid = self.fm.hidden_states(ids[s:e], pos[s:e], key_valid=valid[s:e], kv_sink=sink)
            last[s:e] = hid[:, -1]
        logits = F.linear(last, self.fm.lm_head_weight).float()
        tok, lp = sample(logits, params, self._gen)

        st.pad.copy_(pad)
        st.pos.copy_(lens.to(dev))
        st.slot.fill_(plen)
        st.step.fill_(1)
        st.finished.zero_()
        st.length.fill_(n)
        st.out_tok[:, 0], st.out_lp[:, 0] = tok, lp
        st.tok.copy_(tok)
        if not params.ignore_eos:
            first_eos = tok == self.eos_token_id
            st.length.masked_fill_(first_eos, 1)
            st.finished |= first_eos

        for t in range(1, n):
            lb = self._bucket(plen + t, st)
            if self.use_cuda_graph:
                st.graphs[lb].replay()
            else:
                self._decode_step(st, lb, params)
            if not params.ignore_eos and t % self.stop_check_every == 0 and bool(st.finished.all()):
                break
        lengths = st.length.tolist()
        toks, lps = st.out_tok.cpu(), st.out_lp.cpu()
        return [(toks[i, : lengths[i]].clone(), lps[i, : lengths[i]].clone()) for i in range(b)]

    def _bucket(self, slots: int, st: _State) -> int:
        """Smallest multiple of `bucket` that covers `slots` cache slots, capped at the cache length."""
        return min(st.arange.numel(), math.ceil(slots / self.bucket) * self.bucket)

    # -------------------------------------------------------------------------- decode step

    def _decode_step(self, st: _State, lb: int, params: SamplingParams) -> None:
        """One token for every row, over static buffers only (this is what a CUDA graph holds)."""
        fm, s = self.fm, self.fm.shape
        b, group = st.tok.shape[0], s.heads // s.kv_heads
        x = fm.embed(st.tok)  # (B, H)
        cos, sin = fm.rope(st.pos)  # (B, D)
        ar = st.arange[:lb]
        seen = (ar[None, :] >= st.pad[:, None]) & (ar[None, :] <= st.slot)  # (B, Lb)
        seen = seen[:, None, None, :]  # (B, 1, 1, Lb), broadcast over heads
        for i, layer in enumerate(fm.layers):
            q, k, v = fm.pre(*fm.pre_args(layer, x, cos, sin))  # (B, heads | kv_heads, D)
            st.k[i].index_copy_(2, st.slot, k[:, :, None, :])
            st.v[i].index_copy_(2, st.slot, v[:, :, None, :])
            # Grouped-query attention without repeating K/V: the `group` query heads of one KV
            # head act as `group` queries against that head's cache, in one fused SDPA kernel.
            qg = q.view(b, s.kv_heads, group, s.head_dim)
            o = F.scaled_dot_product_attention(qg, st.k[i][:, :, :lb], st.v[i][:, :, :lb], attn_mask=seen)
            o = o.reshape(b, s.heads * s.head_dim)
            x = fm.post(*fm.post_args(layer, x, o))
        logits = F.linear(fm.final_norm(x), fm.lm_head_weight)
        if params.temperature > 0 and params.top_k == 0 and params.top_p >= 1.0:
            noise = torch.empty(logits.shape, dtype=torch.float32, device=x.device).exponential_(generator=self._gen)
            tok, lp = self._race(logits, noise, params.temperature)
        else:
            tok, lp = sample(logits.float(), params, self._gen)
        if not params.ignore_eos:
            tok = torch.where(st.finished, self.pad_token_id, tok)
            lp = torch.where(st.finished, 0.0, lp)
            newly = (tok == self.eos_token_id) & ~st.finished
            st.length.copy_(torch.where(newly, st.step + 1, st.length))
            st.finished.logical_or_(newly)
        st.out_tok.index_copy_(1, st.step, tok[:, None])
        st.out_lp.index_copy_(1, st.step, lp[:, None])
        st.tok.copy_(tok)
        st.pos.add_(1)
        st.slot.add_(1)
        st.step.add_(1)

    # ------------------------------------------------------------------------- buffers, graphs

    def _ensure_state(self, b: int, plen: int, n: int, params: SamplingParams) -> _State:
        key = (b, plen, n, params.temperature, params.top_k, params.top_p, params.ignore_eos)
        st = self._state
        if st is not None and st.key == key and st.pointers == self.fm.parameter_pointers():
            return st
        if st is not None:  # free the old buffers and graphs before allocating new ones
            self._state = st = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        # After sleep() there is nothing of ours to free: emptying the cache here would only hand
        # the train phase's cached blocks back to the driver for the cache below to re-allocate.
        s, dev, length = self.fm.shape, self.device, plen + n
        cache = lambda: torch.zeros(b, s.kv_heads, length, s.head_dim, dtype=self.fm.dtype, device=dev)  # noqa: E731
        lng = lambda *shape: torch.zeros(shape, dtype=torch.long, device=dev)  # noqa: E731
        st = _State(
            key=key,
            k=[cache() for _ in range(s.layers)],
            v=[cache() for _ in range(s.layers)],
            tok=lng(b), pos=lng(b), pad=lng(b), slot=lng(1), step=lng(1),
            out_tok=lng(b, n),
            out_lp=torch.zeros(b, n, dtype=torch.float32, device=dev),
            finished=torch.zeros(b, dtype=torch.bool, device=dev),
            length=lng(b),
            arange=torch.arange(length, device=dev),
            pointers=self.fm.parameter_pointers(),
        )  # fmt: skip
        if self.use_cuda_graph:
            self._capture(st, plen, n, params)
        self._state = st
        return st

    def _capture(self, st: _State, plen: int, n: int, params: SamplingParams) -> None:
        """One graph per Lb bucket the decode steps of this shape will use, sharing one memory pool.

        The warm-up step runs real kernels on the (not yet filled) buffers; generate() resets every
        buffer it reads before the first replay, so that garbage is never seen.
        """
        buckets = sorted({self._bucket(plen + t, st) for t in range(1, n)})
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for lb in buckets:  # warm-up: cuBLAS handles, compiled kernels
                self._decode_step(st, lb, params)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for lb in buckets:
            g = torch.cuda.CUDAGraph()
            g.register_generator_state(self._gen)
            with torch.cuda.graph(g, pool=pool, stream=stream):
                self._decode_step(st, lb, params)
            pool = g.pool()
            st.graphs[lb] = g
        torch.cuda.synchronize()

    # ------------------------------------------------------------------------------- weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights in place; nothing to copy when this engine runs the train engine's module."""
        if not self.shares_module:
            params = dict(self.model.named_parameters())
            for name, tensor in named_tensors:
                params[name].copy_(tensor.to(params[name].device, params[name].dtype), non_blocking=True)
        self.weights_version = version

    def sleep(self) -> None:
        """Free the KV cache, the output buffers and the CUDA graphs (their pool) for training."""
        self._state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to do eagerly: the next generate() reallocates and recaptures for its shape."""
