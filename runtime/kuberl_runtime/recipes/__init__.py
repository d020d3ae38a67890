"""Recipes: one readable function per algorithm, `fn(job: Job) -> None`, picked by config.

    algorithm.name: grpo            -> recipes.grpo:grpo
    algorithm.name: ppo             -> recipes.ppo:ppo
    algorithm.recipe: mypkg.rl:loop -> your function, given the same Job (copy grpo.py to start)

`run(cfg, ...)` builds the Job (tokenizer, data, reward, checkpoints, logging) and calls the recipe.
"""

from __future__ import annotations

import importlib

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.errors import ConfigError

from .common import Job, Recipe

BUILTIN = {"grpo": "kuberl_runtime.recipes.grpo:grpo", "ppo": "kuberl_runtime.recipes.ppo:ppo"}


def resolve_recipe(cfg: RuntimeConfig) -> Recipe:
    """The recipe function for cfg: algorithm.recipe when set, else the built-in for algorithm.name."""
    target = cfg.algorithm.recipe or BUILTIN[cfg.algorithm.name]
    module_name, func_name = target.split(":")
    field = "runtime.algorithm.recipe"
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except Exception as e:  # noqa: BLE001 - any import-time failure of user code is a config problem
        raise ConfigError(f"cannot import recipe {target!r}: {type(e).__name__}: {e}", field=field) from e
    if not callable(fn):
        raise ConfigError(f"recipe {target!r} is not callable", field=field)
    return fn


def run(cfg: RuntimeConfig, **job_kwargs) -> Job:
    """Build the Job and run the configured recipe to the end; returns the Job (for its metrics)."""
    recipe = resolve_recipe(cfg)
    job = Job.build(cfg, **job_kwargs)
    recipe(job)
    return job


__all__ = ["BUILTIN", "Job", "Recipe", "resolve_recipe", "run"]
