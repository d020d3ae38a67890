"""`kuberl-runtime`: the program every trainer pod runs.

    KUBERL_CONFIG=/etc/kuberl/config.yaml kuberl-runtime

Reads the rendered RuntimeConfig (the RLJob's spec.runtime) from $KUBERL_CONFIG and the process's
place in the job from the KUBERL_* environment (`contract.Topology`), joins the job's process
groups when there is more than one process, runs the recipe, and exits with a code the operator
understands (`errors.exit_code_for`): 0 done, 78 bad config, 65 bad data or NaN, 75 a peer was
lost, 71 out of memory, 1 anything else.

- One process per GPU: a trainer pod with KUBERL_LOCAL_WORLD_SIZE=N > 1 (and no LOCAL_RANK) starts
  N children of this same entry with LOCAL_RANK=0..N-1 (rank KUBERL_RANK + LOCAL_RANK, CUDA device
  LOCAL_RANK), like torchrun: SIGTERM is forwarded to them; the first child to fail stops the
  others and the pod exits with that child's code and termination message (`launch.supervise`).
- The first process of every trainer pod serves /healthz, /readyz (200 once the process groups
  formed), /metrics and /progress (trainer rank 0's is the one the operator mirrors) on the pod's
  HTTP port: $KUBERL_HTTP_PORT, else logging.port.
- Every exit writes the termination message (/dev/termination-log, or $KUBERL_TERMINATION_LOG):
  the final progress document, then the human message (`contract.format_termination_message`),
  so the operator sees the last step of a job that has finished.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import yaml
from pydantic import ValidationError

from kuberl_runtime import errors
from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.contract import (
    ENV_CONFIG,
    ENV_GPUS,
    ENV_HTTP_PORT,
    ENV_LOCAL_WORLD_SIZE,
    ENV_TERMINATION_LOG,
    Topology,
    format_termination_message,
)
from kuberl_runtime.errors import ConfigError


def load_config(path: str | os.PathLike[str] | None) -> RuntimeConfig:
    """The RuntimeConfig in YAML file `path`; ConfigError naming the field when it is invalid."""
    if not path:
        raise ConfigError(f"${ENV_CONFIG} is not set: point it at the rendered runtime config", field=ENV_CONFIG)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist", field=ENV_CONFIG)
    try:
        return RuntimeConfig.model_validate(yaml.safe_load(p.read_text()) or {})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{p}: {first['msg']}", field=f"runtime.{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}", field=ENV_CONFIG) from None


def local_rank() -> int:
    """This process's index in its pod (LOCAL_RANK, set by the pod's launcher; 0 when alone)."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def progress_reporter(cfg: RuntimeConfig, topology: Topology, *, serve: bool = True):
    """This trainer process's ProgressReporter, started: the pod's first process serves it on the
    pod's HTTP port ($KUBERL_HTTP_PORT, else logging.port), the others serve nothing."""
    from kuberl_runtime.progress import ProgressReporter

    port = None
    if serve and local_rank() == 0:
        port = int(os.environ.get(ENV_HTTP_PORT) or cfg.logging.port)
    return ProgressReporter(cfg.training.total_steps, port=port, rank=topology.rank + local_rank()).start()


def _use_local_gpu() -> None:
    """CUDA device LOCAL_RANK when the pod's GPUs are all visible (one process per GPU)."""
    import torch

    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())


def run_trainer(cfg: RuntimeConfig, topology: Topology, *, progress_bar: bool = False, metrics_file: str | None = None,
                serve_progress: bool = True, progress=None):
    """One trainer process: process groups (if any), the HTTP endpoint, the recipe.

    `progress`: a started ProgressReporter the caller owns (and closes); else one of its own.
    Returns the finished `recipes.Job` (its progress document and last metrics)."""
    from kuberl_runtime.recipes import run
    from kuberl_runtime.tracking import Tracker

    own = progress is None
    if own:
        progress = progress_reporter(cfg, topology, serve=serve_progress)  # /healthz while we wait for peers
    groups = tracker = None
    roles: dict = {}
    try:
        _use_local_gpu()
        if topology.world_size > 1:
            from kuberl_runtime.distributed import rendezvous

            groups = rendezvous(topology, local_rank=local_rank())
        rank = groups.trainer_rank if groups else 0
        rollout = None
        if groups is not None and topology.placement == "disaggregated" and topology.rollout_replicas:
            from kuberl_runtime.remote_rollout import RemoteRolloutEngine

            rollout = RemoteRolloutEngine.connect(groups)  # generation over HTTP, weights over the sync group
        if groups is not None:
            from kuberl_runtime.remote_roles import connect_roles

            roles = connect_roles(groups)  # critic/reference/reward pods, when the job has them
        tracker = Tracker(cfg.logging, enabled=rank == 0, total_steps=cfg.training.total_steps,
                          progress_bar=progress_bar, metrics_file=metrics_file if rank == 0 else None)
        progress.set_ready(True)  # the process groups formed: the pod is Ready
        job = run(cfg, topology=topology, group=groups.trainer if groups else None, progress=progress,
                  tracker=tracker, rollout=rollout, **roles)
        if rollout is not None:
            rollout.close()  # the rollout processes stop when the trainer is done
        if roles:
            from kuberl_runtime.remote_roles import stop_roles

            stop_roles(groups, roles)  # and so do the critic/reference/reward servers
        return job
    except BaseException as exc:
        progress.finish("failed", errors.describe(exc))
        raise
    finally:
        if tracker is not None:
            tracker.close()
        if own:
            progress.close()
        if groups is not None:
            groups.close()


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not interrupt the shutdown
    raise _Terminated


def engine_devices(local: int, local_world_size: int, env=os.environ) -> str:
    """CUDA_VISIBLE_DEVICES of engine replica `local` of a rollout pod: its own consecutive slice of
    the pod's GPUs (tensorParallelSize of them), taken from the pod's CUDA_VISIBLE_DEVICES when set,
    else 0..KUBERL_GPUS-1 (what the device plugin exposes in the container)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible is not None else [str(i) for i in range(int(env.get(ENV_GPUS) or 0))]
    devices = [d.strip() for d in devices if d.strip()]
    if devices and len(devices) < local_world_size:
        # Each engine would get no GPU and quietly generate on the CPU: say so instead.
        raise ConfigError(
            f"the pod sees {len(devices)} GPUs ({','.join(devices)}) but runs {local_world_size} engine "
            f"processes of tensorParallelSize GPUs each: give it roles.rollout.gpus GPUs",
            field="roles.rollout.gpus",
        )
    per = len(devices) // local_world_size
    return ",".join(devices[local * per:(local + 1) * per])


def run_pod(topology: Topology) -> tuple[int, str]:
    """A trainer pod's KUBERL_LOCAL_WORLD_SIZE processes, as torchrun would start them; or a rollout
    pod's engine replicas (one per tensorParallelSize GPUs, each seeing only its own GPUs).

    Returns (exit code, termination message): 0 and local rank 0's message when all succeed, else
    the first failure's classified code and message (128+N for a child killed by signal N)."""
    from kuberl_runtime.launch import Proc, _describe_exit, _stop, supervise

    with tempfile.TemporaryDirectory(prefix="kuberl-pod-") as tmp:
        logs = [Path(tmp) / f"termination-{i}" for i in range(topology.local_world_size)]
        procs = []
        for i, log in enumerate(logs):
            log.touch()  # each child writes its own termination message; we pass on the one that matters
            env = {"LOCAL_RANK": str(i), ENV_TERMINATION_LOG: str(log), "PYTHONUNBUFFERED": "1"}
            if topology.role == "rollout":
                env["CUDA_VISIBLE_DEVICES"] = engine_devices(i, topology.local_world_size)
                env[ENV_LOCAL_WORLD_SIZE] = str(topology.local_world_size)  # (as in the pod) names it by rollout rank
            procs.append(Proc(topology.role, topology.role_rank, topology.rank + i, env))
        print(f"kuberl-runtime: starting {len(procs)} {topology.role} processes (ranks {procs[0].rank}.."
              f"{procs[-1].rank})", flush=True)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            code, failed = supervise(procs, [sys.executable, "-m", "kuberl_runtime.main"], out=sys.stdout,
                                     label="kuberl-runtime")
        except _Terminated:
            _stop(procs)  # again, in case the signal came while supervise() was stopping them
            return 128 + signal.SIGTERM, f"terminated (SIGTERM): stopped the pod's {len(procs)} processes"
        finally:
            signal.signal(signal.SIGTERM, previous)
        first = failed or procs[0]
        message = logs[procs.index(first)].read_text(encoding="utf-8").strip()
        if code and not message:  # killed before it could say why
            message = f"{first.name} {_describe_exit(first.popen.returncode)}"
        return code, message


def main() -> None:
    progress = pod = None
    try:
        try:
            topology = Topology.from_env()
        except ValueError as e:  # a KUBERL_*_TIMEOUT a user set in spec.env: every restart would fail alike
            raise errors.ConfigError(str(e), field="spec.env") from None
        cfg = load_config(os.environ.get(ENV_CONFIG))
        if topology.role in ("trainer", "rollout") and topology.local_world_size > 1 and "LOCAL_RANK" not in os.environ:
            pod = run_pod(topology)  # one child per GPU (trainer) or engine replica (rollout), back in main()
        elif topology.role != "trainer":
            # Rollout/critic/reference/reward pods serve their engine or model to the trainer
            # (rollout_server, role_servers), they do not run the training loop.
            from kuberl_runtime.launch import run_role

            run_role(cfg, topology)
        else:
            progress = progress_reporter(cfg, topology)
            run_trainer(cfg, topology, progress=progress)
            final = progress.document()
            errors.write_termination_message(
                format_termination_message(f"succeeded at step {final.step} of {final.total_steps}", final))
    except BaseException as exc:  # noqa: BLE001 - every failure leaves with its classified code
        if not isinstance(exc, (errors.RuntimeFailure, KeyboardInterrupt)):
            traceback.print_exc()
        message = errors.describe(exc)
        print(f"kuberl-runtime: {message}", file=sys.stderr, flush=True)
        # What the operator shows in status and Events, after the final progress document.
        errors.write_termination_message(format_termination_message(message, progress and progress.document()))
        sys.exit(errors.exit_code_for(exc))
    finally:
        if progress is not None:
            progress.close()
    if pod is not None:
        code, message = pod
        errors.write_termination_message(message)
        if code:
            print(f"kuberl-runtime: {message.splitlines()[-1] if message else code}", file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
