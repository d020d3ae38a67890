"""Checkpoints with torch.distributed.checkpoint (DCP), and resume from the latest complete one.

    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.interval, cfg.checkpoint.keep,
                        rank=rank, world_size=trainer_world_size)   # or Checkpointer(cfg.checkpoint, ...)
    app_state = {"model": policy, "optimizer": optim,                 # nn.Module / Optimizer: DCP
                 "scheduler": sched,                                  # has state_dict(): restored in place
                 "data": loader.position(), "config": cfg.model_dump()}  # anything else: extra.pt
    step = ckpt.latest() if cfg.checkpoint.resume else None
    if step is not None:
        extras = ckpt.load(step, app_state)      # every rank; modules, optimizers, scheduler in place
        loader.seek(extras["data"])
    ...
    if ckpt.due(step, total_steps):
        ckpt.save(step, app_state)               # every rank calls it

On disk, under `checkpoint.dir`:

    step-000042/              one complete checkpoint, named by the RL steps completed
      .metadata               DCP's index of every tensor below
      __<rank>_0.distcp       DCP shards: the state dict of each module and optimizer, under its
                              app_state key ("model", "optimizer", "critic", ...); sharded by
                              FSDP2 or replicated (DDP, plain) -- DCP writes each tensor once
      extra.pt                torch.save by rank 0 of {"step": 42, **every other app_state value}:
                              scheduler state (objects with state_dict() are stored as that),
                              data position, config, metrics
      rng/rank-00000.pt       each rank's RNG state (python, numpy, torch CPU, CUDA), see rng_state()
      COMPLETE                written last (its text: the step); a directory without it is never
                              loaded
    step-000050.tmp/          a save in progress; renamed to step-000050/ once every rank is done

A save writes into `step-NNNNNN.tmp/`; after every rank finished (a barrier), rank 0 writes
COMPLETE and renames the directory. Killed at any point, a run leaves at most a `.tmp` directory (or,
on a file system without atomic rename, a directory without COMPLETE), which `latest()` skips and
the next save removes. Older complete
checkpoints beyond `checkpoint.keep` are deleted after each save.

Modules and optimizers go through `torch.distributed.checkpoint.state_dict`, which unwraps DDP and
gathers/reshards FSDP2, so a checkpoint loads into the same model wrapped differently or on another
number of ranks (the RNG files are then skipped). With one rank no process group is needed.

Before loading, every model tensor's shape is compared with the checkpoint's index, so a checkpoint
of another model fails with a ConfigError naming the tensors that differ, not deep inside DCP.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import CheckpointConfig
from .errors import ConfigError

COMPLETE = "COMPLETE"
EXTRA = "extra.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


class Checkpointer:
    """Saves and loads `app_state` dicts; every rank of the trainer group calls save and load.

    `dir`, `interval` and `keep` mean what `checkpoint.dir/interval/keep` of the runtime config
    mean; a `CheckpointConfig` may be passed as `dir` instead of the three. `process_group` is the
    trainer group when the default group also holds other roles; it defaults to the default group.
    With `world_size == 1` no collective is used at all.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str] | CheckpointConfig,
        interval: int | None = None,
        keep: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
    ):
        if isinstance(dir, CheckpointConfig):
            if interval is not None or keep is not None:
                raise TypeError("pass interval and keep inside the CheckpointConfig, not beside it")
            dir, interval, keep = dir.dir, dir.interval, dir.keep
        defaults = CheckpointConfig.model_fields
        self.root = Path(dir)
        self.interval = defaults["interval"].default if interval is None else interval
        self.keep = defaults["keep"].default if keep is None else keep
        if self.interval < 1 or self.keep < 1:
            raise ValueError(f"checkpoint interval ({self.interval}) and keep ({self.keep}) must be >= 1")
        self.rank = rank
        self.world_size = world_size
        self.group = process_group
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"Checkpointer with world_size={world_size} needs an initialised process group")

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the loop saves after `step`: every `interval` steps and at the last step."""
        return step > 0 and (step % self.interval == 0 or step == total_steps)

    # ---------------------------------------------------------------------------------- queries

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        steps = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / COMPLETE).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _incomplete(self) -> list[Path]:
        """Leftovers of killed saves: `.tmp` directories and step directories without COMPLETE."""
        return [d for d in self.root.glob("step-*")
                if d.is_dir() and (d.name.endswith(".tmp") or not (d / COMPLETE).is_file())]

    def latest(self) -> int | None:
        """Step of the latest complete checkpoint, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    # ------------------------------------------------------------------------------------- save

    def save(self, step: int, app_state: dict[str, Any]) -> Path:
        """Write checkpoint `step`; returns its directory once it is complete on every rank."""
        final, tmp = self.path(step), self.root / f"{step_dir_name(step)}.tmp"
        if self.rank == 0:
            # Leftovers of a save that was killed; nobody else writes while rank 0 clears them.
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self._incomplete():
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self._barrier()

        tensors, extras = _split(app_state)
        extras = {k: v.state_dict() if _is_stateful(v) else v for k, v in extras.items()}
        with _quiet_single_process():
            dcp.save(self._state_dict(tensors), checkpoint_id=str(tmp), **self._dcp_kwargs())
        _save_file(rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            _save_file({"step": step, **extras}, tmp / EXTRA)
        self._barrier()  # every rank's shards and RNG file are on disk

        if self.rank == 0:
            _write_durably(tmp / COMPLETE, f"{step}\n")
            if final.exists():  # an incomplete directory of the same step (non-atomic rename)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)  # the rename itself survives a node crash
            self._prune()
        self._barrier()  # nobody looks for the checkpoint before it has its final name
        return final

    def _prune(self) -> None:
        for old in self.complete_steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)

    # ------------------------------------------------------------------------------------- load

    def load(self, step: int, app_state: dict[str, Any]) -> dict[str, Any]:
        """Restore modules, optimizers and stateful objects of `app_state` in place, and this
        rank's RNG state. Every rank calls it with the same step.

        Returns the extras saved with the checkpoint ({"step": ..., "scheduler": ..., ...}).
        Raises ConfigError when there is no complete checkpoint `step` or it does not fit.
        """
        self._check_same_step(step)
        path = self.path(step)
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"no complete checkpoint {path}", field="runtime.checkpoint.dir")
        tensors, stateful = _split(app_state)
        state = self._state_dict(tensors)
        _check_fits(path, tensors, state)
        try:
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=str(path), **self._dcp_kwargs())
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise ConfigError(
                f"checkpoint {path} does not fit this model or optimizer ({_first_line(e)}); point "
                "checkpoint.dir elsewhere or set checkpoint.resume false",
                field="runtime.checkpoint.dir",
            ) from e
        for key, value in tensors.items():
            if isinstance(value, nn.Module):
                set_model_state_dict(value, state[key])
            else:
                set_optimizer_state_dict(_owner(key, value, tensors), value, state[key])

        extras = torch.load(path / EXTRA, map_location="cpu", weights_only=False)
        for key, value in stateful.items():
            if _is_stateful(value) and key in extras:
                value.load_state_dict(extras[key])
        rng = path / "rng" / f"rank-{self.rank:05d}.pt"
        if rng.is_file() and len(list((path / "rng").iterdir())) == self.world_size:
            set_rng_state(torch.load(rng, weights_only=False))
        return extras

    def _check_same_step(self, step: int) -> None:
        # Ranks that list the directory at different moments could pick different steps; loading
        # those would silently mix two checkpoints.
        if not self._distributed():
            return
        steps: list[int | None] = [None] * self.world_size
        dist.all_gather_object(steps, step, group=self.group)
        if len(set(steps)) != 1:
            raise RuntimeError(f"ranks disagree on the checkpoint step to load: {steps}")

    # -------------------------------------------------------------------------------- internals

    def _state_dict(self, tensors: dict[str, Any]) -> dict[str, Any]:
        # Keyed like app_state, so the checkpoint reads "model.<param>", "optimizer.state.<param>...".
        out: dict[str, Any] = {}
        for key, value in tensors.items():
            if isinstance(value, nn.Module):
                out[key] = get_model_state_dict(value)
            else:
                out[key] = get_optimizer_state_dict(_owner(key, value, tensors), value)
        return out

    def _distributed(self) -> bool:
        return self.world_size > 1

    def _dcp_kwargs(self) -> dict[str, Any]:
        if self._distributed():
            return {"process_group": self.group}
        return {"no_dist": True}

    def _barrier(self) -> None:
        if self._distributed():
            dist.barrier(group=self.group)


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _split(app_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Modules and optimizers (saved by DCP) apart from everything else (saved in extra.pt)."""
    tensors = {k: v for k, v in app_state.items() if isinstance(v, (nn.Module, torch.optim.Optimizer))}
    extras = {k: v for k, v in app_state.items() if k not in tensors}
    if "step" in extras:
        raise ValueError("app_state key 'step' is reserved: the checkpoint records its step itself")
    return tensors, extras


def _owner(key: str, optim: torch.optim.Optimizer, tensors: dict[str, Any]) -> nn.Module:
    """The module of app_state whose parameters `optim` updates (DCP keys optimizer state by FQN)."""
    first = next(p for group in optim.param_groups for p in group["params"])
    for value in tensors.values():
        if isinstance(value, nn.Module) and any(p is first for p in value.parameters()):
            return value
    raise ValueError(f"app_state[{key!r}]: the optimizer's parameters belong to no module in app_state")


def _check_fits(path: Path, tensors: dict[str, Any], state: dict[str, Any]) -> None:
    """ConfigError naming the model tensors whose shapes differ from the checkpoint's, if any."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    problems = []
    for key, value in tensors.items():
        if not isinstance(value, nn.Module):
            continue  # an optimizer fits when its model does
        ours = {f"{key}.{name}": t for name, t in _flat(state[key])}
        theirs = {k: m for k, m in saved.items() if k.startswith(f"{key}.") and isinstance(m, TensorStorageMetadata)}
        for fqn, t in ours.items():
            if fqn not in theirs:
                problems.append(f"{fqn} missing from the checkpoint")
            elif tuple(theirs[fqn].size) != tuple(t.shape):
                problems.append(f"{fqn} is {tuple(theirs[fqn].size)} there, {tuple(t.shape)} here")
        problems += [f"{fqn} is in the checkpoint but not in the model" for fqn in theirs.keys() - ours.keys()]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ConfigError(
            f"checkpoint {path} was written for another model: {'; '.join(sorted(problems)[:3])}{more}; "
            "use the model config it was written with, point checkpoint.dir elsewhere, or set "
            "checkpoint.resume false",
            field="runtime.checkpoint.dir",
        )


def _flat(state: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in state.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{name}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{name}", value


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # DCP's CheckpointException carries the rank's traceback; its last line is the cause.
    text = lines[-1].strip() if isinstance(e, CheckpointException) and lines else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load; that is our intent, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """This process's random number generator states: python, numpy (if installed), torch, CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device only: one GPU per rank
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned; generators missing on either side are left alone."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np

            np.random.set_state(state["numpy"])
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
