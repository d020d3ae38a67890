"""Where metrics go besides the progress endpoint: the console, TensorBoard, W&B, a JSONL file.

    tracker = Tracker(cfg.logging, enabled=rank == 0, total_steps=cfg.training.total_steps,
                      progress_bar=local_run)
    tracker.log(step, {"reward/mean": 0.41, "train/kl": 0.002, "rollout/tokens_per_s": 1200.0})
    tracker.close()

Metric names are the namespaced ones (`reward/mean`, `time/generate_s`) everywhere; TensorBoard
groups them by the part before the `/`. Console, TensorBoard and W&B get every `logging.logEvery`-th
step and the last one; the metrics file, when given, gets every step as one JSON line
`{"step": 12, "reward/mean": 0.41, ...}`. With `progress_bar` the console shows one line on stderr,
redrawn in place, instead of a summary per step:

    step 12/60 |####      | reward 0.41 | 1.2k tok/s

A disabled tracker (non-zero ranks) does nothing, so the loop calls it unconditionally. W&B is
used only when `logging.wandb` is set and the wandb package is installed (a warning otherwise).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

from .config import LoggingConfig
from .errors import ConfigError

BAR_WIDTH = 20


class Tracker:
    def __init__(
        self,
        cfg: LoggingConfig,
        enabled: bool = True,
        total_steps: int = 0,
        progress_bar: bool = False,
        metrics_file: str | None = None,
    ):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress_bar = progress_bar
        self._bar_drawn = False
        self._tb: Any = None
        self._wandb: Any = None
        self._file = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            # Imported here: tensorboard is heavy and only the driver with tensorboardDir needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=cfg.tensorboard_dir, flush_secs=10)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                warnings.warn("logging.wandb is set but wandb is not installed; not logging to W&B", stacklevel=2)
            else:
                try:
                    self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity)
                except Exception as e:  # no API key, no network: say which setting, not wandb's internals
                    raise ConfigError(
                        f"W&B did not start ({type(e).__name__}: {e}); set WANDB_API_KEY through "
                        "logging.wandb.apiKeySecretRef or remove logging.wandb",
                        field="runtime.logging.wandb",
                    ) from e
        if metrics_file:
            self._file = open(metrics_file, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()  # a killed run keeps every step it finished
        if self.progress_bar:
            self._draw_bar(step, metrics)
        if step % self.cfg.log_every and step != self.total_steps:
            return
        if not self.progress_bar:
            print(summary_line(step, self.total_steps, metrics), flush=True)
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._bar_drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._bar_drawn = False
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _draw_bar(self, step: int, metrics: dict[str, float]) -> None:
        sys.stderr.write("\r" + bar_line(step, self.total_steps, metrics) + "\x1b[K")
        sys.stderr.flush()
        self._bar_drawn = True


def summary_line(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    """`step 12/60 | reward/mean 0.41 | train/kl 0.0021 | ...`, every metric in the order given."""
    head = f"step {step}/{total_steps}" if total_steps else f"step {step}"
    return " | ".join([head, *(f"{name} {value:.4g}" for name, value in metrics.items())])


def bar_line(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    """`step 12/60 |####                | reward 0.41 | 1.2k tok/s`."""
    head = f"step {step}/{total_steps}" if total_steps else f"step {step}"
    if total_steps:
        filled = min(BAR_WIDTH, BAR_WIDTH * step // total_steps)
        head += f" |{'#' * filled}{' ' * (BAR_WIDTH - filled)}|"
    parts = []
    if "reward/mean" in metrics:
        parts.append(f"reward {metrics['reward/mean']:.2f}")
    if "rollout/tokens_per_s" in metrics:
        parts.append(f"{_si(metrics['rollout/tokens_per_s'])} tok/s")
    if not parts:
        return head
    # The bar's own closing `|` already separates it from what follows.
    return head + (" " if total_steps else " | ") + " | ".join(parts)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
