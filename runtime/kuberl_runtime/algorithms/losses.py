"""Losses for the policy update: PPO's clipped surrogate, the clipped value loss, entropy and
per-token log-probs from logits, and the aggregations that turn a (B, T) loss into a scalar.

How the (B, T) per-token loss becomes a scalar matters (DAPO, Dr. GRPO): "token-mean" weights
every token equally, "seq-mean-token-mean" weights every response equally (GRPO's original, so
a token of a short response outweighs one of a long response), "seq-mean-token-sum" removes the
length normalisation (Dr. GRPO), "token-sum" leaves normalisation to the caller (e.g. by a
global token count across micro-batches and ranks).
"""

import torch

from .advantages import masked_mean
from .registry import get_aggregation, register_aggregation


@register_aggregation("token-mean")
def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over all valid tokens / number of valid tokens; (B, T) -> scalar, 0 when none."""
    return masked_mean(x, mask)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-empty rows of each row's token mean; (B, T) -> scalar.

    Rows with no valid token are left out rather than counted as 0, so an empty response does not
    shrink everyone else's gradient.
    """
    m = mask.bool()
    return masked_mean(masked_mean(x, m, dim=-1), m.any(-1))


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-empty rows of each row's token sum; (B, T) -> scalar."""
    m = mask.bool()
    return masked_mean(torch.where(m, x, 0).sum(-1), m.any(-1))


@register_aggregation("token-sum")
def token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over all valid tokens; (B, T) -> scalar."""
    return torch.where(mask.bool(), x, 0).sum()


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token (B, T) tensor to a scalar with the aggregation named `mode`."""
    return get_aggregation(mode)(x, mask)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), per token, aggregated.

    logp, old_logp, advantages, mask: (B, T). With ratio = exp(logp - old_logp):

        loss_t = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))

    clip_high > clip_low is DAPO's "clip-higher" (Yu et al. 2025, arXiv:2503.14476): low-probability
    tokens may grow further, which keeps entropy from collapsing. `dual_clip_c` (> 1) is dual-clip
    PPO (Ye et al. 2020, arXiv:1912.09729): for A < 0 the loss is also capped at -c * A, so a token
    whose ratio exploded cannot produce an unbounded update.

    Returns (loss scalar, metrics): "clipfrac" (share of valid tokens where the clipped term won),
    "approx_kl" (mean of old_logp - logp: k1 estimate of KL(old || new) on old's samples),
    "ratio_mean", and "dual_clipfrac" when dual clip is on. Metrics are detached.
    """
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low=} {clip_high=}")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (it caps the loss at -c * A for A < 0), got {dual_clip_c}")
    m = mask.bool()
    # Clamping the log-ratio (as verl does) keeps exp() finite even on garbage at padded positions,
    # where an inf would turn the masked-out gradient 0 * inf into NaN.
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_t = torch.maximum(unclipped, clipped)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), m),
        "approx_kl": masked_mean(-log_ratio, m),
        "ratio_mean": masked_mean(ratio, m),
    }
    if dual_clip_c is not None:
        cap = -advantages * dual_clip_c
        capped = (advantages < 0) & (loss_t > cap)
        loss_t = torch.where(capped, cap, loss_t)
        metrics["dual_clipfrac"] = masked_mean(capped.to(logp.dtype), m)
    loss = aggregate(loss_t, m, aggregation)
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, 0.5 * max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2).

    values, old_values, returns, mask: (B, T). The clip keeps the critic close to the values the
    advantages were computed with, as in OpenAI's baselines PPO2 and verl; clip=None turns it off
    (plain 0.5 * (v - R)^2). Metrics: "vf_clipfrac", the share of valid tokens where the clipped
    term was larger (0 without clipping).
    """
    m = mask.bool()
    unclipped = (values - returns) ** 2
    if clip is None:
        loss_t, clipfrac = 0.5 * unclipped, torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clipped - returns) ** 2
        loss_t = 0.5 * torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), m)
    return aggregate(loss_t, m, aggregation), {"vf_clipfrac": clipfrac.detach()}


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # bf16 has 8 mantissa bits: exp/sum over a 100k vocabulary in bf16 is off by whole percents.
    # float32 per call costs one (chunk, V) copy, which is why callers pass chunks, not batches.
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label]: logits (..., V), labels (...) int -> (...) float32 or float64.

    Computed as logits[label] - logsumexp(logits): log_softmax + gather would allocate a (..., V)
    output and keep it alive until backward; this keeps only the logits themselves (their float32
    copy when low-precision logits are upcast) and logsumexp's transient temporary.
    """
    z = _upcast(logits)
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits): (..., V) -> (...) float32 or float64.

    H = logsumexp(z) - sum softmax(z) * z, which needs no log of a probability that underflowed
    to 0. Low-precision logits are upcast to float32 first.
    """
    z = _upcast(logits)
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
