"""A minimal functional forward for Qwen2 / Llama decoder LMs that reads the transformers module's
own parameters: the fast rollout engine and the fast train step both run it.

    fm = FastModel(hf_model)                       # no copy: every weight is the module's Parameter
    hidden = fm.hidden_states(ids, pos)            # (B, T, H) after the final norm, autograd-capable
    logp = linear_logprobs(hidden_rows, fm.lm_head_weight, labels)   # chunked over rows, fused bwd

Why not call the module itself: the decode step must be a fixed sequence of kernels over static
buffers (a CUDA graph), attention must read a preallocated KV cache with per-row padding, and the
train step must never materialise full-vocabulary logits for a whole micro-batch. The numerics
follow transformers' Qwen2/Llama code (RMSNorm in float32, RoPE from the module's own inv_freq, so
scaled RoPE variants come along), which the tests check token for token against the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers: normalise in float32, cast back, then scale in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    return F.linear(x, lin.weight, lin.bias)


def layer_pre(x, ln_w, eps, wq, bq, wk, bk, wv, bv, cos, sin, heads, kv_heads, head_dim):
    """x (..., H) -> q (..., heads, D), k, v (..., kv_heads, D): input norm, projections, RoPE.

    A pure function of tensors (weights passed in), so one torch.compile serves every layer.
    """
    h = _rms_norm(x, ln_w, eps)
    q = F.linear(h, wq, bq).unflatten(-1, (heads, head_dim))
    k = F.linear(h, wk, bk).unflatten(-1, (kv_heads, head_dim))
    v = F.linear(h, wv, bv).unflatten(-1, (kv_heads, head_dim))
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def layer_post(x, o, wo, bo, ln_w, eps, wg, wu, wd, act):
    """Attention output o (..., heads*D) -> layer output (..., H): o_proj, residual, MLP, residual."""
    x = x + F.linear(o, wo, bo)
    h = _rms_norm(x, ln_w, eps)
    return x + F.linear(act(F.linear(h, wg)) * F.linear(h, wu), wd)


def _layer_pre_varying(*args):
    """layer_pre for callers whose shapes vary (the train step): its own code object, so its
    compiled graphs and recompile budget are separate from the rollout engine's static ones."""
    return layer_pre(*args)


def _layer_post_varying(*args):
    """layer_post for callers whose shapes vary (see _layer_pre_varying)."""
    return layer_post(*args)


class FastModel:
    """A view of a transformers Qwen2ForCausalLM / LlamaForCausalLM: shapes plus functional layers.

    Holds references to the module's submodules (never tensors copied out of them), so an optimizer
    step on the module is seen by the next forward with no sync at all.
    """

    SUPPORTED = ("qwen2", "llama")

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why the fast engines cannot run `model` (None when they can); reads only its config."""
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if kind not in cls.SUPPORTED:
            return f"the fast engines run {' and '.join(cls.SUPPORTED)} models, not {kind or type(model).__name__!r}"
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            return "sliding-window attention is not supported by the fast engines"
        if any(hasattr(p, "full_tensor") for p in model.parameters()):
            return "the model is sharded (FSDP2 DTensors); the fast engines read whole weights"
        return None

    def __init__(self, model: nn.Module, compile_layers: bool = False, varying_shapes: bool = False) -> None:
        why = self.unsupported(model)
        if why:
            raise ValueError(why)
        cfg = model.config
        self.module = model
        # A causal LM keeps its decoder in .model; a critic (models.Critic) in .backbone.
        base = model.model if hasattr(model, "model") else model.backbone
        self.base = base
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.shape = Shape(
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size if self._head() is None else self._head().weight.shape[0],
            eps=cfg.rms_norm_eps,
        )
        rope = base.rotary_emb
        self.inv_freq = rope.inv_freq  # buffer of the module: follows it across .to(device)
        self.rope_scaling = float(getattr(rope, "attention_scaling", 1.0))
        self.act = getattr(F, cfg.hidden_act) if cfg.hidden_act != "silu" else F.silu
        # compile_layers: inductor fuses the norms, RoPE, SiLU-gate and residuals of a layer; the
        # functions take weights as arguments, so all layers share one compiled graph per shape.
        # The rollout engine's shapes are fixed per CUDA-graph bucket: static graphs. The train
        # step's micro-batches change shape with the response lengths and the memory left, and a
        # static graph per shape would recompile until torch's recompile limit and then run eagerly:
        # there (varying_shapes) torch's automatic dynamic shapes compile the first shape static and,
        # once a size changes, one graph with that size symbolic (two compiles, then none).
        self.pre, self.post = layer_pre, layer_post
        if compile_layers and varying_shapes:
            self.pre = torch.compile(_layer_pre_varying, dynamic=None)
            self.post = torch.compile(_layer_post_varying, dynamic=None)
        elif compile_layers:
            self.pre = torch.compile(layer_pre, dynamic=False)
            self.post = torch.compile(layer_post, dynamic=False)

    def pre_args(self, layer: nn.Module, x, cos, sin):
        s, a = self.shape, layer.self_attn
        return (x, layer.input_layernorm.weight, s.eps, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight,
                a.k_proj.bias, a.v_proj.weight, a.v_proj.bias, cos, sin, s.heads, s.kv_heads, s.head_dim)  # fmt: skip

    def post_args(self, layer: nn.Module, x, o):
        a, m = layer.self_attn, layer.mlp
        return (x, o, a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight, self.shape.eps,
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, self.act)  # fmt: skip

    # ----------------------------------------------------------------------------- parameters

    @property
    def layers(self):
        return self.base.layers

    def _head(self) -> nn.Module | None:
        get = getattr(self.module, "get_output_embeddings", None)
        return get() if get is not None else None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._head().weight

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    def parameter_pointers(self) -> tuple[int, ...]:
        """Storage addresses of every weight: a captured CUDA graph is valid while these hold."""
        return tuple(p.data_ptr() for p in self.module.parameters())

    # --------------------------------------------------------------------------------- pieces

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (...,) int -> cos, sin (..., head_dim) in the model dtype (float32 math)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.base.norm.weight, self.shape.eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.base.embed_tokens.weight)

    # ------------------------------------------------------------------------ full sequences

    def _layer(self, layer, x, cos, sin, mask, is_causal, kv_out):
        s = self.shape
        q, k, v = self.pre(*self.pre_args(layer, x, cos, sin))  # (B, T, h, D)
        if kv_out is not None:
            kv_out(k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, D)
        gqa = s.kv_heads != s.heads
        if gqa and (mask is not None or x.device.type != "cuda"):
            # The masked (memory-efficient) and CPU kernels take no GQA flag: repeat K/V there.
            rep = s.heads // s.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        # Unmasked on CUDA: the flash kernel reads each K/V head once for its query-head group.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.post(*self.post_args(layer, x, o.transpose(1, 2).flatten(-2)))

    def hidden_states(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        key_valid: torch.Tensor | None = None,
        kv_sink=None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """ids, positions (B, T) -> final-normed hidden states (B, T, H).

        Causal attention. `key_valid` (B, T) bool marks real tokens when rows are left-padded
        (keys at padding are masked out); right-padded rows need no mask, since causal attention
        never lets a real token see the padding after it. `kv_sink(layer_index, k, v)` receives
        every layer's (B, T, kv_heads, D) keys and values (prefill of a KV cache).
        `checkpoint` recomputes each layer in backward instead of storing its activations.
        """
        x = self.embed(ids)
        cos, sin = self.rope(positions)
        mask, is_causal = None, True
        if key_valid is not None and not bool(key_valid.all()):
            t = ids.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            mask = causal & key_valid[:, None, None, :]  # (B, 1, T, T)
            # A fully masked query row (a padding query) would give NaN: let it see itself.
            mask = mask | torch.eye(t, dtype=torch.bool, device=ids.device)
            is_causal = False
        for i, layer in enumerate(self.layers):
            sink = None if kv_sink is None else (lambda k, v, i=i: kv_sink(i, k, v))
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    self._layer, layer, x, cos, sin, mask, is_causal, sink, use_reentrant=False
                )
            else:
                x = self._layer(layer, x, cos, sin, mask, is_causal, sink)
        return self.final_norm(x)


# ------------------------------------------------------------------ chunked log-probs (fused)


def _chunk_logprob(zb: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(c, V) low-precision logits -> (log-prob of label, logsumexp), float32 math, one pass."""
    z = zb.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(-1, labels[:, None]).squeeze(-1) - lse, lse


def _chunk_logprob_entropy(zb: torch.Tensor, labels: torch.Tensor, temperature: float):
    """As _chunk_logprob, plus the entropy H = lse - sum_v p_v z_v of softmax(z) per row."""
    z = zb.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    ent = lse - (torch.exp(z - lse[:, None]) * z).sum(-1)
    return z.gather(-1, labels[:, None]).squeeze(-1) - lse, lse, ent


def _chunk_grad(zb: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, temperature: float):
    """d(grad . logp)/d logits for one chunk: (onehot(label) - softmax(z)) * grad / T, in zb's dtype."""
    z = zb.float()
    if temperature != 1.0:
        z = z / temperature
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == labels[:, None]
    g = (onehot.float() - torch.exp(z - lse[:, None])) * grad[:, None]
    if temperature != 1.0:
        g = g / temperature
    return g.to(zb.dtype)


def _chunk_grad_entropy(zb, lse, ent, labels, grad, grad_ent, temperature: float):
    """d(grad . logp + grad_ent . H)/d logits: dH/dz_v = -p_v (z_v - (lse - H)), then / T."""
    z = zb.float()
    if temperature != 1.0:
        z = z / temperature
    p = torch.exp(z - lse[:, None])
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == labels[:, None]
    g = (onehot.float() - p) * grad[:, None] - p * (z - (lse - ent)[:, None]) * grad_ent[:, None]
    if temperature != 1.0:
        g = g / temperature
    return g.to(zb.dtype)


_compiled: dict = {}
_EAGER = {"fwd": _chunk_logprob, "bwd": _chunk_grad, "fwd_ent": _chunk_logprob_entropy, "bwd_ent": _chunk_grad_entropy}


def _kernel(device: torch.device, name: str):
    """On CUDA the chunk math is compiled (one fused read of the logits instead of ~8 passes).

    Rows vary (the last chunk of a micro-batch is shorter, micro-batches differ), the vocabulary
    does not: automatic dynamic shapes give one static graph, then one with the rows symbolic.
    """
    if device.type != "cuda":
        return _EAGER[name]
    if name not in _compiled:
        _compiled[name] = torch.compile(_EAGER[name], dynamic=None)
    return _compiled[name]


class _LinearLogprob(torch.autograd.Function):
    """log softmax(h @ W.T / T)[label] per row (and the entropy of that softmax when asked), chunk
    by chunk; logits are recomputed in backward.

    Memory: one (chunk, V) float32 block at a time instead of (N, V) logits kept for backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, with_entropy):
        fwd = _kernel(hidden.device, "fwd_ent" if with_entropy else "fwd")
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            res = fwd(hidden[s : s + chunk] @ weight.T, labels[s : s + chunk], temperature)
            out[s : s + chunk], lse[s : s + chunk] = res[0], res[1]
            if with_entropy:
                ent[s : s + chunk] = res[2]
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        ctx.set_materialize_grads(False)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        if grad_out is None:
            grad_out = torch.zeros_like(lse)
        entropy_grad = ctx.with_entropy and grad_ent is not None
        bwd = _kernel(hidden.device, "bwd_ent" if entropy_grad else "bwd")
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            z, sl = h @ weight.T, slice(s, s + chunk)
            if entropy_grad:
                g = bwd(z, lse[sl], ent[sl], labels[sl], grad_out[sl].float(), grad_ent[sl].float(), t)
            else:
                g = bwd(z, lse[sl], labels[sl], grad_out[sl].float(), t)
            if grad_h is not None:
                grad_h[sl] = g @ weight
            if grad_w is not None:
                grad_w += g.T @ h
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk: int = 4096
) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,) -> (N,) float32 log-probs of the labels.

    Never holds more than (chunk, V) logits; gradients flow to hidden and weight.
    """
    return _LinearLogprob.apply(hidden, weight, labels, float(temperature), int(chunk), False)[0]


def linear_logprobs_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """As linear_logprobs, plus (N,) float32 entropies of softmax(h @ W.T / T), both differentiable."""
    return _LinearLogprob.apply(hidden, weight, labels, float(temperature), int(chunk), True)
