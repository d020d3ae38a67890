"""Advantage estimators: per-token rewards (B, T) -> (advantages, returns), both (B, T).

Every estimator is registered under a name and takes the same keyword arguments, so the loop
calls whichever the config names without knowing which one it is:

    fn(*, token_rewards, mask, values, group_size, gamma, lam, normalize_std, eps=1e-6)

    token_rewards  (B, T) float  reward per response token (a sequence score sits on its last token)
    mask           (B, T) 0/1    1 on response tokens that are trained on; rows may be right-padded
    values         (B, T) | None critic values (GAE only)
    group_size     int           rows 0..k-1 are k samples of one prompt, rows k..2k-1 the next, ...

Outputs are 0 wherever mask is 0, so padding can never leak into a loss.
"""

import torch

from .registry import register_advantage


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where the 0/1 `mask` is 1, over `dim` (all dims when None).

    x, mask: same shape, e.g. (B, T). An empty selection gives 0, not NaN: one empty response
    must not poison a whole batch's loss or its gradients.
    """
    m = mask.bool()
    total = torch.where(m, x, 0).sum() if dim is None else torch.where(m, x, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    # Counts are integers, so clamping at 1 changes only the empty case (0 / 1 = 0).
    return total / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid positions of the whole batch; 0 elsewhere.

    x, mask: (B, T). The variance is unbiased (n / (n - 1) Bessel correction), as in verl's
    `masked_whiten`; with fewer than two valid positions every output is 0.
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    n = m.sum()
    var = masked_mean((x - mean) ** 2, m) * n / (n - 1).clamp(min=1)
    return torch.where(m, (x - mean) * torch.rsqrt(var + eps), 0)


def _sequence_scores(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, T) -> (B // group_size, group_size): each row's reward summed over its valid tokens."""
    batch = token_rewards.shape[0]
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(f"group_size must be >= 1 and divide the batch size {batch}, got {group_size}")
    scores = torch.where(mask.bool(), token_rewards, 0).sum(-1)
    return scores.view(-1, group_size)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) sequence advantages -> the same value on every valid token; returns = advantages."""
    adv = torch.where(mask.bool(), seq_adv.reshape(-1, 1), 0)
    return adv, adv


@register_advantage("grpo")
def grpo(*, token_rewards, mask, values, group_size, gamma, lam, normalize_std, eps=1e-6):
    """Group-relative advantages (GRPO; Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300).

    Each response's score is its reward summed over valid tokens (B,); within each group of
    `group_size` consecutive rows the group mean is subtracted (the group is the baseline, so no
    critic is needed) and, when `normalize_std`, the result is divided by (group std + eps).
    The std is unbiased (torch.std's default, as in verl and TRL). Dr. GRPO (Liu et al. 2025)
    argues for normalize_std=False: dividing by std up-weights prompts that are nearly always
    solved or nearly always failed. A group of one has no baseline and gets advantage 0.

    The score is broadcast to every valid token (B, T); returns = advantages. values, gamma and
    lam are unused (they are part of the shared signature).
    """
    scores = _sequence_scores(token_rewards, mask, group_size)
    if group_size == 1:
        return _broadcast(torch.zeros_like(scores), mask)
    adv = scores - scores.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (scores.std(-1, keepdim=True) + eps)
    return _broadcast(adv, mask)


@register_advantage("rloo")
def rloo(*, token_rewards, mask, values, group_size, gamma, lam, normalize_std, eps=1e-6):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740).

    Each response's score (reward summed over valid tokens) minus the mean score of the *other*
    group_size - 1 responses to the same prompt: a baseline independent of the sample itself, so
    the estimator stays unbiased. Equal to k / (k - 1) times GRPO's mean-centred advantage; a
    group of one gets 0. Broadcast to valid tokens (B, T); returns = advantages.
    values, gamma, lam, normalize_std and eps are unused (part of the shared signature).
    """
    scores = _sequence_scores(token_rewards, mask, group_size)
    if group_size == 1:
        return _broadcast(torch.zeros_like(scores), mask)
    others_mean = (scores.sum(-1, keepdim=True) - scores) / (group_size - 1)
    return _broadcast(scores - others_mean, mask)


@register_advantage("gae")
def gae(*, token_rewards, mask, values, group_size, gamma, lam, normalize_std, eps=1e-6):
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    A_t = sum_l (gamma * lam)^l * delta_{t+l},  delta_t = r_t + gamma * V_{t+1} - V_t,
    over the *valid* tokens of each row (B, T): masked positions are skipped, as in verl, so
    V_{t+1} is the value of the next valid token and 0 after the last one (the response ends
    there). Masked tokens inside a row (e.g. tool output in a multi-turn rollout) are thus
    stepped over rather than cutting the trajectory. Computed in at least float32, returned in
    the inputs' dtype.

    returns = advantages + values (the critic's regression target), computed before whitening.
    When `normalize_std`, advantages are whitened over all valid tokens of the batch
    (masked_whiten, with eps added to the variance). group_size is unused.
    """
    if values is None:
        raise ValueError("gae needs critic values (B, T); got values=None")
    m = mask.bool()
    out_dtype = torch.result_type(token_rewards, values)
    dtype = torch.promote_types(out_dtype, torch.float32)  # bf16 inputs: accumulate in float32
    batch, length = m.shape
    # Skipping masked tokens is the plain recursion on each row's valid tokens packed to the front:
    # packed column k holds the row's k-th valid token, so V_{t+1} is the next column, the
    # discount counts valid tokens, and columns past the last valid one are 0. Masked tokens all
    # go to a spare column T (their zeros, so the colliding writes agree), which is 0 too.
    slot = torch.where(m, m.cumsum(1) - 1, length)  # (B, T) packed column of each token

    def packed(x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T + 1)
        return torch.zeros(batch, length + 1, dtype=dtype, device=x.device).scatter_(
            1, slot, torch.where(m, x, 0).to(dtype)
        )

    r, v = packed(token_rewards), packed(values)
    adv = r[:, :-1] + gamma * v[:, 1:] - v[:, :-1]  # (B, T) packed deltas, 0 past the last valid token
    # A_k = sum_l (gamma * lam)^l delta_{k+l} as a log-depth scan instead of a Python loop over T
    # (a few kernels per token, launch-bound on a GPU): after the pass with shift s, A_k holds the
    # discounted sum of delta_k .. delta_{k+2s-1}, so ceil(log2 T) passes cover the row. Exact in
    # real arithmetic; in floating point a tree of sums, no less accurate than the loop.
    decay, shift = gamma * lam, 1
    while shift < length and decay**shift != 0:
        adv[:, :-shift] += decay**shift * adv[:, shift:]
        shift *= 2
    adv = torch.where(m, torch.nn.functional.pad(adv, (0, 1)).gather(1, slot), 0)  # unpack
    returns = torch.where(m, adv + values.to(dtype), 0)
    if normalize_std:
        adv = masked_whiten(adv, m, eps)
    return adv.to(out_dtype), returns.to(out_dtype)
