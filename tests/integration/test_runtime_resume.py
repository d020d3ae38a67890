"""Kill `kuberl local` mid-run with SIGKILL, rerun it: it resumes from the latest complete
checkpoint, ends at exactly the configured step, and repeats the killed run's steps bit for bit
(sampling seeds depend on the step, and model, optimizer, schedule, data position are restored),
so the loss curve is continuous across the restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo-cpu.yaml"
STEPS, INTERVAL, KILL_AFTER = 30, 10, 14
KUBERL = [sys.executable, "-m", "kuberl_operator.cli"]


def read_metrics(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = {}
    for ln in lines:
        try:
            m = json.loads(ln)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        out[m["step"]] = m
    return out


def complete_steps(root: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in root.glob("step-*") if (p / "COMPLETE").exists()]


def job_file(tmp_path: Path) -> Path:
    doc = yaml.safe_load(DEMO.read_text())
    doc["spec"]["runtime"]["training"]["totalSteps"] = STEPS
    doc["spec"]["runtime"]["checkpoint"] = {"dir": str(tmp_path / "ckpt"), "interval": INTERVAL}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sigkill_then_rerun_resumes_and_finishes_exactly(tmp_path):
    job = job_file(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    first_metrics, second_metrics = tmp_path / "first.jsonl", tmp_path / "second.jsonl"

    proc = subprocess.Popen([*KUBERL, "local", str(job), "--metrics-file", str(first_metrics)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while max(read_metrics(first_metrics), default=0) < KILL_AFTER:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the first run did not reach the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_metrics(first_metrics))
    assert killed_at < STEPS
    resumed = max(complete_steps(tmp_path / "ckpt"))  # what survived the kill; never a half-written one
    assert INTERVAL <= resumed <= killed_at

    done = subprocess.run([*KUBERL, "local", str(job), "--metrics-file", str(second_metrics)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from checkpoint step {resumed}" in done.stdout

    first, second = read_metrics(first_metrics), read_metrics(second_metrics)
    assert sorted(second) == list(range(resumed + 1, STEPS + 1))  # no step repeated past the end
    assert max(complete_steps(tmp_path / "ckpt")) == STEPS
    overlap = [s for s in second if s in first]
    assert overlap, "the rerun repeated none of the killed run's steps"
    for step in overlap:
        for name in ("reward/mean", "train/policy_loss", "train/grad_norm", "train/entropy"):
            assert second[step][name] == first[step][name], (step, name)
