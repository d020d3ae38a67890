"""Scoring completions: built-in rules, a user `module:function`, or a reward model.

    score = build_reward(cfg.reward, answer_key="answer")
    r = score(prompt, completion, row)        # -> float

Every kind has the signature fn(prompt: str, completion: str, row: dict) -> float; `row` is the
whole data row (the reference answer included), `completion` the decoded response without EOS.
A new rule is one decorated function:

    @register_rule("contains")
    def contains(completion, answer, cfg): return float(str(answer) in completion)
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from typing import Any

from kuberl_runtime.config import RewardConfig
from kuberl_runtime.errors import ConfigError

RewardFn = Callable[[str, str, dict[str, Any]], float]
Rule = Callable[[str, Any, RewardConfig], float]
_RULES: dict[str, Rule] = {}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Register rule `fn(completion, answer, cfg) -> float` under `name`."""

    def decorator(fn: Rule) -> Rule:
        if name in _RULES:
            raise ValueError(f"reward rule {name!r} is already registered")
        _RULES[name] = fn
        return fn

    return decorator


@register_rule("exact_match")
def exact_match(completion: str, answer: Any, cfg: RewardConfig) -> float:
    """1 when the stripped completion equals the stripped answer."""
    return float(completion.strip() == str(answer).strip())


@register_rule("regex")
def regex(completion: str, answer: Any, cfg: RewardConfig) -> float:
    """1 when `reward.pattern` matches anywhere in the completion."""
    return float(re.search(cfg.pattern, completion) is not None)


@register_rule("numeric")
def numeric(completion: str, answer: Any, cfg: RewardConfig) -> float:
    """1 when the last number in the completion equals the answer numerically."""
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    try:
        return float(abs(float(found[-1]) - float(answer)) < 1e-6)
    except (TypeError, ValueError):
        return 0.0


def _import_function(cfg: RewardConfig) -> Callable:
    for p in reversed(cfg.python_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, func_name = cfg.function.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except Exception as e:  # noqa: BLE001 - any import-time failure is a configuration problem
        raise ConfigError(
            f"cannot import reward function {cfg.function!r}: {type(e).__name__}: {e}",
            field="runtime.reward.function",
        ) from e
    if not callable(fn):
        raise ConfigError(f"{cfg.function!r} is not callable", field="runtime.reward.function")
    return fn


def _guarded(fn: Callable, name: str) -> RewardFn:
    def call(prompt: str, completion: str, row: dict[str, Any]) -> float:
        try:
            value = float(fn(prompt, completion, row))
        except Exception as e:  # noqa: BLE001 - user code: report which function and which sample
            raise ConfigError(
                f"reward {name} raised {type(e).__name__}: {e} "
                f"(prompt={prompt[:80]!r}, completion={completion[:80]!r})",
                field="runtime.reward",
            ) from e
        return value

    return call


class RewardModel:
    """A sequence-classification checkpoint: score(prompt + completion) = logit 0 of the head."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a reward model from {path!r}: {e}", field="runtime.reward.model") from e
        self.model.to(device).eval()
        self._torch = torch

    def __call__(self, prompt: str, completion: str, row: dict[str, Any]) -> float:
        with self._torch.no_grad():
            enc = self.tok(prompt + completion, return_tensors="pt").to(self.model.device)
            return float(self.model(**enc).logits[0, 0])


def build_reward(cfg: RewardConfig, answer_key: str = "answer", device: str = "cpu") -> RewardFn:
    """The reward function `cfg` describes, with the fn(prompt, completion, row) signature."""
    if cfg.kind == "function":
        return _guarded(_import_function(cfg), cfg.function)
    if cfg.kind == "model":
        return _guarded(RewardModel(cfg.model, device), f"model {cfg.model}")
    rule = _RULES[cfg.rule]
    return _guarded(lambda prompt, completion, row: rule(completion, row[answer_key], cfg), f"rule {cfg.rule}")
