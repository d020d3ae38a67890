"""RL algorithms as pure tensor functions: advantages, KL estimators, losses, aggregations.

They import only torch (no models, devices, torch.distributed or config), take (B, T) tensors
with a 0/1 mask, and are picked by name from the registry. Importing this package registers the
built-ins: "grpo", "rloo", "gae"; "k1", "k2", "k3"; "token-mean", "seq-mean-token-mean",
"seq-mean-token-sum", "token-sum".
"""

from .advantages import gae, grpo, masked_mean, masked_whiten, rloo
from .kl import apply_kl_to_rewards, kl_penalty
from .losses import aggregate, entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from .registry import (
    get_advantage,
    get_aggregation,
    get_kl,
    register_advantage,
    register_aggregation,
    register_kl,
)

__all__ = [
    "aggregate",
    "apply_kl_to_rewards",
    "entropy_from_logits",
    "gae",
    "get_advantage",
    "get_aggregation",
    "get_kl",
    "grpo",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "register_advantage",
    "register_aggregation",
    "register_kl",
    "rloo",
    "value_loss",
]
