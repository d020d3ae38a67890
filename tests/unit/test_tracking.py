"""Tracker: TensorBoard scalars read back from the event files, console lines, the metrics file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kuberl_runtime.config import LoggingConfig
from kuberl_runtime.tracking import Tracker, bar_line, summary_line


def steps_metrics(step: int) -> dict[str, float]:
    return {"reward/mean": step / 10, "train/kl": 0.001 * step, "rollout/tokens_per_s": 1000.0 + step}


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_log_every_th_step_and_the_last(tmp_path: Path, capsys: pytest.CaptureFixture):
    tracker = Tracker(LoggingConfig(tensorboard_dir=str(tmp_path), log_every=2), total_steps=5)
    for step in range(1, 6):
        tracker.log(step, steps_metrics(step))
    tracker.close()

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"reward/mean", "train/kl", "rollout/tokens_per_s"}
    assert [s for s, _ in scalars["reward/mean"]] == [2, 4, 5]
    assert [v for _, v in scalars["reward/mean"]] == pytest.approx([0.2, 0.4, 0.5])
    assert [v for _, v in scalars["rollout/tokens_per_s"]] == pytest.approx([1002.0, 1004.0, 1005.0])
    assert capsys.readouterr().out.splitlines() == [
        "step 2/5 | reward/mean 0.2 | train/kl 0.002 | rollout/tokens_per_s 1002",
        "step 4/5 | reward/mean 0.4 | train/kl 0.004 | rollout/tokens_per_s 1004",
        "step 5/5 | reward/mean 0.5 | train/kl 0.005 | rollout/tokens_per_s 1005",
    ]


def test_metrics_file_gets_every_step_as_json_lines(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    tracker = Tracker(LoggingConfig(log_every=10), total_steps=3, metrics_file=str(path))
    for step in (1, 2, 3):
        tracker.log(step, {"reward/mean": step / 10})
        assert len(path.read_text().splitlines()) == step  # on disk at once: a killed run keeps it
    tracker.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2}, {"step": 3, "reward/mean": 0.3}
    ]


def test_progress_bar_redraws_one_line_on_stderr(capsys: pytest.CaptureFixture):
    tracker = Tracker(LoggingConfig(), total_steps=4, progress_bar=True)
    for step in (1, 2):
        tracker.log(step, steps_metrics(step))
    tracker.close()
    out, err = capsys.readouterr()
    assert out == ""  # the bar replaces the per-step summary
    assert err.count("\r") == 2 and err.endswith("\n")
    assert "step 2/4 |##########          | reward 0.20 | 1.0k tok/s" in err


def test_a_disabled_tracker_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture):
    tb, file = tmp_path / "tb", tmp_path / "m.jsonl"
    tracker = Tracker(LoggingConfig(tensorboard_dir=str(tb)), enabled=False, total_steps=2, metrics_file=str(file))
    tracker.log(1, {"reward/mean": 1.0})
    tracker.close()
    assert not tb.exists() and not file.exists()
    assert capsys.readouterr() == ("", "")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_configured_but_not_installed_warns_and_logs_elsewhere(capsys: pytest.CaptureFixture):
    with pytest.warns(UserWarning, match="wandb is not installed"):
        tracker = Tracker(LoggingConfig(wandb={"project": "kuberl"}), total_steps=1)
    tracker.log(1, {"reward/mean": 1.0})
    tracker.close()
    assert capsys.readouterr().out == "step 1/1 | reward/mean 1\n"


@pytest.mark.parametrize(
    ("step", "total", "metrics", "line"),
    [
        (12, 60, {"reward/mean": 0.41, "rollout/tokens_per_s": 1234.0},
         "step 12/60 |####                | reward 0.41 | 1.2k tok/s"),
        (60, 60, {"reward/mean": 1.0}, "step 60/60 |####################| reward 1.00"),
        (0, 60, {}, "step 0/60 |                    |"),
        (3, 0, {"rollout/tokens_per_s": 2.5e6}, "step 3 | 2.5M tok/s"),
        (3, 10, {"rollout/tokens_per_s": 950.0, "train/kl": 0.1}, "step 3/10 |######              | 950 tok/s"),
    ],
)
def test_bar_line(step: int, total: int, metrics: dict[str, float], line: str):
    assert bar_line(step, total, metrics) == line


@pytest.mark.parametrize(
    ("step", "total", "metrics", "line"),
    [
        (12, 60, {"reward/mean": 0.41, "train/kl": 0.00213}, "step 12/60 | reward/mean 0.41 | train/kl 0.00213"),
        (5, 0, {"time/train_s": 12.34567}, "step 5 | time/train_s 12.35"),
        (1, 2, {}, "step 1/2"),
    ],
)
def test_summary_line(step: int, total: int, metrics: dict[str, float], line: str):
    assert summary_line(step, total, metrics) == line
