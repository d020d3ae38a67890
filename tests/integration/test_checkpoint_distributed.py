"""Checkpointer in a real two-process gloo group with an FSDP2-sharded model on CPU.

One spawn runs the whole scenario (starting two torch processes is the expensive part): train,
save three checkpoints with keep=2, leave a half-written checkpoint behind, restore into a freshly
built sharded model on both ranks, then try a checkpoint of another model shape. Each rank writes
what it saw to a file; the assertions run here in the parent.
"""

from __future__ import annotations

import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kuberl_runtime.checkpoint import COMPLETE, Checkpointer
from kuberl_runtime.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same seed on every rank: fully_shard expects identical initial weights
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def make_sharded_training(mesh, hidden: int = 8, seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    model = make_model(hidden, seed)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    return model, optim, sched


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def worker(rank: int, port: int, ckpt_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    model, optim, sched = make_sharded_training(mesh)
    torch.manual_seed(1000)  # the same batches on both ranks, so the gradients agree
    for _ in range(2):
        optim.zero_grad()
        model(torch.randn(6, 4)).pow(2).mean().backward()
        optim.step()
        sched.step()

    torch.manual_seed(100 + rank)  # from here on each rank's RNG differs, as in a real run
    ckpt = Checkpointer(ckpt_dir, interval=1, keep=2, rank=rank, world_size=WORLD)
    for step in (1, 2, 3):
        ckpt.save(step, {"model": model, "optimizer": optim, "scheduler": sched, "data": {"index": step}})
    seen: dict = {"saved_params": full_params(model), "saved_lr": optim.param_groups[0]["lr"],
                  "draw_after_save": torch.rand(4), "local_shape": tuple(model[0].weight.to_local().shape)}

    if rank == 0:  # what a crash leaves behind: a fully written directory without its marker, and a .tmp
        root = Path(ckpt_dir)
        shutil.copytree(root / "step-000003", root / "step-000004")
        (root / "step-000004" / COMPLETE).unlink()
        (root / "step-000005.tmp").mkdir()
        (root / "step-000005.tmp" / ".metadata").write_bytes(b"\0" * 7)
    dist.barrier()

    model2, optim2, sched2 = make_sharded_training(mesh, seed=7)
    torch.manual_seed(12345)
    seen["latest"] = ckpt.latest()
    seen["complete_steps"] = ckpt.complete_steps()
    extras = ckpt.load(seen["latest"], {"model": model2, "optimizer": optim2, "scheduler": sched2})
    seen.update(loaded_params=full_params(model2), loaded_lr=optim2.param_groups[0]["lr"],
                draw_after_load=torch.rand(4), data=extras["data"], sched_epoch=sched2.last_epoch)

    wider, wider_optim, _ = make_sharded_training(mesh, hidden=16)
    try:
        ckpt.load(3, {"model": wider, "optimizer": wider_optim})
    except ConfigError as e:
        seen["wider_error"] = str(e)
    dist.barrier()
    torch.save(seen, Path(out_dir) / f"rank-{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_save_prune_skip_half_written_and_restore_the_same_state(tmp_path: Path):
    ckpt_dir, out_dir = tmp_path / "ckpt", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(worker, args=(free_port(), str(ckpt_dir), str(out_dir)), nprocs=WORLD, join=True)
    ranks = [torch.load(out_dir / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]

    for seen in ranks:
        assert seen["local_shape"] == (4, 4)  # really sharded: half of the (8, 4) weight per rank
        assert seen["complete_steps"] == [2, 3]  # keep=2 pruned step 1; step 4 has no marker
        assert seen["latest"] == 3
        assert seen["data"] == {"index": 3}
        assert seen["sched_epoch"] == 2
        assert seen["loaded_lr"] == seen["saved_lr"] == pytest.approx(0.025)
        for name, saved in seen["saved_params"].items():
            assert torch.equal(seen["loaded_params"][name], saved), name
        assert torch.equal(seen["draw_after_load"], seen["draw_after_save"])  # this rank's own RNG
        assert "model.0.weight is (8, 4) there, (16, 4) here" in seen["wider_error"]

    for name, p in ranks[0]["loaded_params"].items():
        assert torch.equal(p, ranks[1]["loaded_params"][name]), name
    assert not torch.equal(ranks[0]["draw_after_load"], ranks[1]["draw_after_load"])

    # The sharded checkpoint also loads into a plain, unsharded model in one process (2 -> 1 ranks).
    plain = make_model(8, seed=3)
    Checkpointer(ckpt_dir).load(3, {"model": plain})
    for name, p in plain.named_parameters():
        assert torch.equal(p.detach(), ranks[0]["saved_params"][name]), name
