"""Checkpointer in one process: what is saved, what is restored, atomicity, pruning, bad fits.

The two-process (gloo) behaviour is in tests/integration/test_checkpoint_distributed.py.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kuberl_runtime.checkpoint import COMPLETE, EXTRA, Checkpointer, rng_state, set_rng_state
from kuberl_runtime.config import CheckpointConfig
from kuberl_runtime.errors import ConfigError


def make_model(hidden: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def make_training(hidden: int = 8, seed: int = 0):
    """A model, AdamW and a step LR schedule, trained two steps so the optimizer has state."""
    model = make_model(hidden, seed)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    train(model, optim, sched, steps=2)
    return model, optim, sched


def train(model, optim, sched, steps: int) -> None:
    for _ in range(steps):
        optim.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optim.step()
        sched.step()


def app_state(model, optim, sched, data=None, config=None) -> dict:
    return {"model": model, "optimizer": optim, "scheduler": sched,
            "data": data if data is not None else {"epoch": 0, "index": 0},
            "config": config if config is not None else {"model": {"hidden": 8}}}


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pid, state in sa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, sb["state"][pid][k]), (pid, k)


def test_roundtrip_restores_model_optimizer_scheduler_extras_and_rng(tmp_path: Path):
    model, optim, sched = make_training()
    ckpt = Checkpointer(tmp_path, interval=1, keep=3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save(7, app_state(model, optim, sched, data={"epoch": 1, "index": 40}, config={"model": {"hidden": 8}}))
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    fresh, fresh_optim, fresh_sched = make_training(seed=123)  # other weights, other optimizer state
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert not torch.equal(fresh[0].weight, model[0].weight)

    extras = ckpt.load(7, app_state(fresh, fresh_optim, fresh_sched))

    assert_same_model(fresh, model)
    assert_same_optimizer(fresh_optim, optim)
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_optim.param_groups[0]["lr"] == optim.param_groups[0]["lr"] == pytest.approx(0.025)
    assert extras["step"] == 7
    assert extras["data"] == {"epoch": 1, "index": 40}
    assert extras["config"] == {"model": {"hidden": 8}}
    assert extras["scheduler"] == sched.state_dict()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])


def test_resumed_training_matches_uninterrupted_training(tmp_path: Path):
    # What resume promises: 2 steps + checkpoint + 2 steps == 4 steps, bit for bit (same RNG too).
    model, optim, sched = make_training()
    ckpt = Checkpointer(tmp_path)
    torch.manual_seed(5)
    ckpt.save(2, app_state(model, optim, sched))
    train(model, optim, sched, steps=2)

    resumed, r_optim, r_sched = make_training(seed=42)
    ckpt.load(ckpt.latest(), app_state(resumed, r_optim, r_sched))
    train(resumed, r_optim, r_sched, steps=2)
    assert_same_model(resumed, model)
    assert_same_optimizer(r_optim, optim)


def test_layout_on_disk_is_the_documented_one(tmp_path: Path):
    model, optim, sched = make_training()
    path = Checkpointer(tmp_path).save(3, app_state(model, optim, sched))

    assert path == tmp_path / "step-000003"
    assert (path / COMPLETE).read_text() == "3\n"
    assert (path / ".metadata").is_file()
    assert list(path.glob("*.distcp"))
    assert [p.name for p in (path / "rng").iterdir()] == ["rank-00000.pt"]
    assert set(torch.load(path / "rng" / "rank-00000.pt", weights_only=False)) >= {"python", "numpy", "torch"}
    extra = torch.load(path / EXTRA, weights_only=False)
    assert set(extra) == {"step", "scheduler", "data", "config"}
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_prunes_the_oldest_complete_checkpoints(tmp_path: Path):
    model, optim, sched = make_training()
    ckpt = Checkpointer(tmp_path, interval=1, keep=2)
    for step in range(1, 6):
        ckpt.save(step, app_state(model, optim, sched))
    assert ckpt.complete_steps() == [4, 5]
    assert ckpt.latest() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]


def test_no_checkpoint_means_latest_is_none(tmp_path: Path):
    assert Checkpointer(tmp_path / "missing").latest() is None
    assert Checkpointer(tmp_path).complete_steps() == []


def test_a_directory_without_the_marker_is_never_loaded(tmp_path: Path):
    model, optim, sched = make_training()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, app_state(model, optim, sched))
    path = ckpt.save(2, app_state(model, optim, sched))
    (path / COMPLETE).unlink()  # every byte written except the marker

    assert ckpt.latest() == 1
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ckpt.load(2, app_state(*make_training()))

    ckpt.save(3, app_state(model, optim, sched))  # the next save clears the leftover
    assert not path.exists() and ckpt.complete_steps() == [1, 3]


CRASH_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    from kuberl_runtime.checkpoint import Checkpointer

    class KillWhenPickled:
        # extra.pt is written after the DCP shards and the RNG file: SIGKILL lands mid-save.
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    model = nn.Linear(4, 3)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"model": model, "optimizer": optim, "data": {"index": 1}})
    ckpt.save(2, {"model": model, "optimizer": optim, "data": KillWhenPickled()})
""")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_as_latest(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", CRASH_MID_SAVE, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    half = tmp_path / "step-000002.tmp"
    assert (half / ".metadata").is_file() and not (half / COMPLETE).exists()  # really half-written

    model = nn.Linear(4, 3)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest() == 1
    assert ckpt.load(1, {"model": model, "optimizer": optim})["data"] == {"index": 1}

    ckpt.save(2, {"model": model, "optimizer": optim, "data": {"index": 2}})  # the rerun saves again
    assert ckpt.complete_steps() == [1, 2]
    assert not half.exists()


def test_a_checkpoint_of_another_model_shape_is_a_config_error(tmp_path: Path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, app_state(*make_training(hidden=8)))
    with pytest.raises(ConfigError) as err:
        ckpt.load(1, app_state(*make_training(hidden=16)))
    message = str(err.value)
    assert "model.0.weight is (8, 4) there, (16, 4) here" in message
    assert "runtime.checkpoint.dir" in message


def test_a_checkpoint_of_another_architecture_names_the_missing_tensors(tmp_path: Path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"model": nn.Linear(4, 3)})
    deeper = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="model.0.weight missing from the checkpoint"):
        ckpt.load(1, {"model": deeper})


def test_config_object_or_plain_arguments(tmp_path: Path):
    from_cfg = Checkpointer(CheckpointConfig(dir=str(tmp_path), interval=10, keep=1))
    assert (from_cfg.root, from_cfg.interval, from_cfg.keep) == (tmp_path, 10, 1)
    plain = Checkpointer(tmp_path, 10, 1)
    assert (plain.root, plain.interval, plain.keep) == (tmp_path, 10, 1)
    with pytest.raises(TypeError):
        Checkpointer(CheckpointConfig(dir=str(tmp_path)), 10)


@pytest.mark.parametrize(
    ("step", "total", "due"),
    [(0, 100, False), (1, 100, False), (10, 100, True), (20, 100, True), (95, 95, True), (99, 100, False)],
)
def test_due_every_interval_and_at_the_last_step(step: int, total: int, due: bool):
    assert Checkpointer("/nonexistent", interval=10).due(step, total) is due


def test_reserved_step_key_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="reserved"):
        Checkpointer(tmp_path).save(1, {"model": nn.Linear(2, 2), "step": 1})


def test_rng_state_roundtrip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
