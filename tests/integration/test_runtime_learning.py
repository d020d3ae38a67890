"""The demo job learns: over several seeds, the mean reward of the last steps beats the first steps.

The demo config (examples/demo-cpu.yaml) runs in-process, shortened to STEPS steps, once per seed
(model init, data and sampling seeds all change). The improvement last-10 minus first-10 must be
positive for every seed, at least MIN_GAIN on average, and pass a one-sided paired t-test at 5%.
A broken gradient, sign or advantage leaves the reward at chance (~0.06), and this fails.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from kuberl_runtime.config import RuntimeConfig

from demo_runs import demo_runtime, run_logged

SEEDS = (0, 1, 2)
STEPS = 80
WINDOW = 10
MIN_GAIN = 0.1
T_CRIT_DF2 = 2.920  # one-sided 5% critical value of Student's t with 2 degrees of freedom


def reward_curve(seed: int, ckpt_dir: Path) -> list[float]:
    metrics = run_logged(RuntimeConfig.model_validate(demo_runtime(seed, STEPS, ckpt_dir)))
    assert len(metrics) == STEPS
    return [m["reward/mean"] for m in metrics]


def test_demo_reward_rises_over_seeds(tmp_path):
    torch.set_num_threads(2)
    gains = []
    for seed in SEEDS:
        curve = reward_curve(seed, tmp_path / f"seed-{seed}")
        first, last = statistics.mean(curve[:WINDOW]), statistics.mean(curve[-WINDOW:])
        print(f"seed {seed}: first {WINDOW} steps {first:.3f}, last {WINDOW} steps {last:.3f}")
        gains.append(last - first)
    mean, sd = statistics.mean(gains), statistics.stdev(gains)
    t = mean / (sd / math.sqrt(len(gains))) if sd > 0 else math.inf
    assert all(g > 0 for g in gains), gains
    assert mean >= MIN_GAIN, gains
    assert t > T_CRIT_DF2, (t, gains)
