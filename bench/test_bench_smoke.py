"""The benchmark harness runs end to end on CPU with a tiny shape (no speed claims on CPU)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import w1_grpo  # noqa: E402


def test_w1_w2_tiny_cpu(tmp_path):
    res = w1_grpo.main(["--tiny", "--device", "cpu", "--workloads", "w1,w2", "--json", str(tmp_path / "r.json")])
    for name in ("ours_w1", "ours_w2"):
        r = res[name]
        assert len(r["steps"]) == 3 and r["step_s"] > 0
        assert set(r["split"]) == {"generate_s", "logprobs_s", "train_s", "sync_s"}
        assert all(math.isfinite(s["loss"]) for s in r["steps"])
    assert (tmp_path / "r.json").stat().st_size > 0


def test_recipe_path_tiny_cpu_runs_the_fast_engines_through_the_recipes(capsys):
    res = w1_grpo.main(["--tiny", "--device", "cpu", "--path", "recipe", "--recipe-engines", "fast", "--workloads", "w1,w2"])
    for name in ("recipe_w1", "recipe_w2"):
        r = res[name]
        assert len(r["steps"]) == 3 and r["step_s"] > 0
        assert set(r["split"]) == {"generate_s", "logprobs_s", "train_s", "sync_s", "wall_s"}
        assert all(math.isfinite(s["loss"]) for s in r["steps"])
    assert "ours_w1" not in res  # --path recipe runs only the recipes
    out = capsys.readouterr().out
    assert out.count("engines: rollout FastRolloutEngine, train FastTrainEngine") == 2
    assert "| recipe_w1 |" in out and "| recipe_w2 |" in out


@pytest.mark.skipif(not w1_grpo.trl_available(), reason="trl not installed")
def test_trl_tiny_cpu():
    res = w1_grpo.main(["--tiny", "--device", "cpu", "--workloads", "trl", "--trl-steps", "2"])
    assert res["trl_w1"]["step_s"] > 0


def test_w2_folded_value_pass_equals_the_separate_one_on_both_paths():
    """`--value-pass fold` (the critic's update computes GAE's values) and `separate` (a no-grad
    value pass first) train the same critic: every step's value loss agrees, engine loop and recipe."""
    args = ["--tiny", "--device", "cpu", "--workloads", "w2", "--path", "engine,recipe", "--recipe-engines", "fast"]
    fold, separate = (w1_grpo.main(args + ["--value-pass", v]) for v in ("fold", "separate"))
    for name in ("ours_w2", "recipe_w2"):
        assert (fold[name]["value_pass"], separate[name]["value_pass"]) == ("fold", "separate")
        a, b = [s["value_loss"] for s in separate[name]["steps"]], [s["value_loss"] for s in fold[name]["steps"]]
        assert len(a) == 3 and a[-1] > 0 and len(set(a)) == 3  # a loss that changes as the critic learns
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), name
