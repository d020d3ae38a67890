"""Name -> function tables for the parts of an RL algorithm that a config picks by name.

The loop never branches on `if loss_type == ...`; it asks the registry:

    adv_fn = get_advantage(cfg.algorithm.advantage)      # "grpo", "rloo", "gae", or yours
    advantages, returns = adv_fn(token_rewards=..., mask=..., ...)

A custom variant is one decorated function in any imported module:

    @register_advantage("my-estimator")
    def my_estimator(*, token_rewards, mask, values, group_size, gamma, lam, normalize_std, eps=1e-6):
        ...
"""

from typing import Callable

_TABLES: dict[str, dict[str, Callable]] = {"advantage": {}, "kl": {}, "aggregation": {}}


def _register(kind: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        table = _TABLES[kind]
        # Two functions under one name would make a config mean different things depending on
        # import order, so a clash is an error rather than a silent override.
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__module__})")
        table[name] = fn
        return fn

    return decorator


def _get(kind: str, name: str) -> Callable:
    table = _TABLES[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def register_advantage(name: str) -> Callable[[Callable], Callable]:
    """Register an advantage estimator under `name` (see advantages.py for the signature)."""
    return _register("advantage", name)


def get_advantage(name: str) -> Callable:
    """The advantage estimator registered as `name`; ValueError naming the known ones otherwise."""
    return _get("advantage", name)


def register_kl(name: str) -> Callable[[Callable], Callable]:
    """Register a per-token KL estimator `fn(logp, ref_logp) -> (B, T)` under `name`."""
    return _register("kl", name)


def get_kl(name: str) -> Callable:
    """The KL estimator registered as `name`; ValueError naming the known ones otherwise."""
    return _get("kl", name)


def register_aggregation(name: str) -> Callable[[Callable], Callable]:
    """Register a loss aggregation `fn(x (B, T), mask (B, T)) -> scalar` under `name`."""
    return _register("aggregation", name)


def get_aggregation(name: str) -> Callable:
    """The aggregation registered as `name`; ValueError naming the known ones otherwise."""
    return _get("aggregation", name)
