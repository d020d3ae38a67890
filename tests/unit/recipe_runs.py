"""Builders for the recipe tests: a RuntimeConfig from a base document with per-section overrides,
and a recipe run that keeps every step's metrics.

    cfg = runtime_config(doc, algorithm={"name": "ppo"})  # doc's algorithm section, name replaced
    job, steps = run_recorded(cfg)                        # steps: [(1, {"reward/mean": ..}), ..]
"""

from __future__ import annotations

from typing import Any

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.recipes import Job, run
from kuberl_runtime.tracking import Tracker

Steps = list[tuple[int, dict[str, float]]]


def runtime_config(doc: dict[str, Any], **sections: dict[str, Any]) -> RuntimeConfig:
    """`doc` (runtime YAML, camelCase) with each named section's keys updated by `sections`."""
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return RuntimeConfig.model_validate(doc)


class Recorder(Tracker):
    """A tracker that logs nowhere and keeps (step, metrics) of every step."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        super().__init__(cfg.logging, enabled=False)
        self.steps: Steps = []

    def log(self, step, metrics):
        self.steps.append((step, metrics))


def run_recorded(cfg: RuntimeConfig, **run_kwargs: Any) -> tuple[Job, Steps]:
    """recipes.run(cfg, **run_kwargs) to the end; the job and every step's metrics."""
    rec = Recorder(cfg)
    job = run(cfg, tracker=rec, **run_kwargs)
    return job, rec.steps
