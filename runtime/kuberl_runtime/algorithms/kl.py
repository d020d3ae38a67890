"""Per-token KL estimators between the policy and the reference model, and the KL-in-reward penalty.

Inputs are log-probs of the *sampled* tokens, (B, T) each, so these are single-sample Monte-Carlo
estimates of KL(pi || pi_ref) (Schulman 2020, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html), with r = pi_ref / pi:

    k1 = -log r                  unbiased, high variance, can be negative
    k2 = 0.5 * (log r)^2         biased, low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0  (GRPO's KL term)

Two ways to use them: in the reward (PPO/InstructGPT; `apply_kl_to_rewards`) or as a loss term
(GRPO; `kl_penalty` then aggregate it like the policy loss).
"""

import torch

from .registry import get_kl, register_kl


@register_kl("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """logp - ref_logp, (B, T)."""
    return logp - ref_logp


@register_kl("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 * (logp - ref_logp)^2, (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1, (B, T); verl's "low_var_kl".

    The log-ratio is clamped to [-20, 20] and the result to [-10, 10], as verl does: one token the
    reference finds near-impossible would otherwise make exp() overflow and swamp the batch.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10.0, 10.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-token KL estimate named `kind` ("k1", "k2", "k3", or a registered one), (B, T)."""
    return get_kl(kind)(logp, ref_logp)


def apply_kl_to_rewards(
    token_rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-in-reward (Ziegler et al. 2019; Ouyang et al. 2022): r_t - coef * KL_t on valid tokens.

    All inputs (B, T); returns (new token rewards, kl) with kl 0 where mask is 0, so the penalty
    (and its metric) never counts padding. Pass log-probs computed without grad: rewards are data.
    """
    kl = torch.where(mask.bool(), kl_penalty(logp, ref_logp, kind), 0)
    return token_rewards - coef * kl, kl
