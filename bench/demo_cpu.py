"""C1: the embedded demo job end to end on CPU: wall time and the reward curve over seeds.

    python bench/demo_cpu.py                  # 3 seeds, 2 threads
    python bench/demo_cpu.py --seeds 0,1,2,3,4 --threads 2

Each seed is one `kuberl local examples/demo-cpu.yaml --seed S` subprocess (a fresh checkpoint
directory, so nothing resumes), timed from process start to exit: Python and torch start-up, the
model build and all steps. The reward test: for each seed, mean reward of the last 10 steps minus
the first 10; the gains must all be positive and pass a one-sided paired t-test at 5%.
Goal (../shared/BENCHMARKS.md): under 3 minutes per run on 2 cores, reward rising.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo-cpu.yaml"
WINDOW = 10
T_CRIT = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}  # one-sided 5%


def run_demo(seed: int, threads: int, workdir: Path) -> tuple[float, list[dict]]:
    metrics = workdir / f"metrics-{seed}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "kuberl_operator.cli", "local", str(DEMO), "--seed", str(seed),
           "--checkpoint-dir", str(workdir / f"ckpt-{seed}"), "--metrics-file", str(metrics), "--no-progress-bar"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"seed {seed}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return wall, [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    print(f"# C1 demo-cpu: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    rows, gains, walls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            wall, steps = run_demo(seed, args.threads, Path(tmp))
            rewards = [m["reward/mean"] for m in steps]
            step_s = statistics.median(m["time/step_s"] for m in steps[2:])
            first, last = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
            curve = [statistics.mean(rewards[i : i + WINDOW]) for i in range(0, len(rewards), 3 * WINDOW)]
            walls.append(wall)
            gains.append(last - first)
            rows.append((seed, wall, len(steps), step_s, first, last, curve))

    print("| seed | wall s | steps | median step s | reward first 10 | reward last 10 | reward every 30 steps (10-step means) |")
    print("|---|---|---|---|---|---|---|")
    for seed, wall, n, step_s, first, last, curve in rows:
        print(f"| {seed} | {wall:.1f} | {n} | {step_s:.3f} | {first:.3f} | {last:.3f} | {' '.join(f'{c:.2f}' for c in curve)} |")
    mean = statistics.mean(gains)
    sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
    t = mean / (sd / math.sqrt(len(gains))) if sd > 0 else math.inf
    crit = T_CRIT.get(len(gains) - 1, 1.645)
    rising = all(g > 0 for g in gains) and t > crit
    print(f"wall: median {statistics.median(walls):.1f} s, max {max(walls):.1f} s (goal < 180 s)")
    print(f"reward gain last-first: mean {mean:.3f}, paired t = {t:.2f} (one-sided 5% critical {crit:.2f}): "
          f"{'RISING' if rising else 'NOT RISING'}")
    sys.exit(0 if rising and max(walls) < 180 else 1)


if __name__ == "__main__":
    main()
