"""The demo job (examples/demo-cpu.yaml) run in-process, for the tests that check it learns
(test_runtime_learning, test_ppo_learning): its runtime reseeded and shortened, and a run that
keeps every step's metrics.

    doc = demo_runtime(seed, steps=80, ckpt_dir=tmp_path / "seed-0")   # edit it, then validate
    metrics = run_logged(RuntimeConfig.model_validate(doc))           # one dict a step
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.recipes import run
from kuberl_runtime.tracking import Tracker

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo-cpu.yaml"


def demo_runtime(seed: int, steps: int, ckpt_dir: Path) -> dict[str, Any]:
    """The demo's spec.runtime with every seed (model init, data, sampling) set to `seed`, `steps`
    steps and one checkpoint, at the end, under `ckpt_dir`."""
    doc = yaml.safe_load(DEMO.read_text())["spec"]["runtime"]
    doc["model"]["init"]["seed"] = seed
    doc["data"]["synthetic"]["seed"] = seed
    doc["training"].update(seed=seed, totalSteps=steps)
    doc["checkpoint"] = {"dir": str(ckpt_dir), "interval": steps}
    return doc


class MetricsLog(Tracker):
    """A tracker that logs nowhere and keeps every step's metrics."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        super().__init__(cfg.logging, enabled=False)
        self.metrics: list[dict[str, float]] = []

    def log(self, step, metrics):
        self.metrics.append(metrics)


def run_logged(cfg: RuntimeConfig) -> list[dict[str, float]]:
    """recipes.run(cfg) to the end; every step's metrics."""
    log = MetricsLog(cfg)
    run(cfg, tracker=log)
    return log.metrics
