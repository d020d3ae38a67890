"""`kuberl local FILE`: run an RLJob on this machine, through the same code path as in pods.

    kuberl local examples/demo-cpu.yaml                     # the embedded demo, ~1 minute on 2 cores
    kuberl local job.yaml --steps 20 --checkpoint-dir /tmp/ckpt --metrics-file m.jsonl

A colocated job with one trainer process runs in this process with a progress bar on stderr
(step, reward, tokens/s); TensorBoard event files are written when
spec.runtime.logging.tensorboardDir is set or --tensorboard is given. A job that needs more than
one process (several trainer replicas or GPUs, or disaggregated rollout) is handed to the
distributed launcher, `kuberl_runtime.launch.run_local_processes`, which starts every role as a
local process with the environment the operator would inject.

This module imports only the base install at import time (click, pyyaml, pydantic), so
`kuberl --help` stays fast; torch and transformers load when a job runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml


def _job_document(path: str) -> dict[str, Any]:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise click.ClickException(f"{path}: not valid YAML: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RLJob"]
    if len(jobs) != 1:
        raise click.ClickException(f"{path}: expected exactly one RLJob document, found {len(jobs)}")
    return jobs[0]


def processes_needed(spec) -> int:
    """Processes a job runs: trainer replicas x GPUs (at least one each), plus rollout engine replicas."""
    from kuberl_runtime.contract import processes_per_pod

    trainers = spec.roles.trainer.replicas * max(spec.roles.trainer.gpus, 1)
    ro = spec.roles.rollout
    rollout = ro.replicas * processes_per_pod("rollout", ro.gpus, ro.tensor_parallel_size) \
        if spec.placement == "disaggregated" and ro else 0
    servers = sum(rs.replicas for rs in (spec.roles.critic, spec.roles.reference, spec.roles.reward) if rs)
    return trainers + rollout + servers


@click.command("local")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--steps", type=int, default=None, help="Override spec.runtime.training.totalSteps.")
@click.option("--checkpoint-dir", default=None, help="Override spec.runtime.checkpoint.dir.")
@click.option("--no-resume", is_flag=True, help="Start fresh even when checkpoint.dir holds a checkpoint.")
@click.option("--tensorboard", "tensorboard_dir", default=None, help="Write TensorBoard event files here.")
@click.option("--metrics-file", default=None, help="Append every step's metrics to this JSONL file.")
@click.option("--seed", type=int, default=None, help="Override spec.runtime.training.seed.")
@click.option("--progress-bar/--no-progress-bar", default=None,
              help="One redrawn status line instead of a line per step (default: when stderr is a terminal).")
def local(file: str, steps: int | None, checkpoint_dir: str | None, no_resume: bool, tensorboard_dir: str | None,
          metrics_file: str | None, seed: int | None, progress_bar: bool | None) -> None:
    """Run an RLJob on this machine (the embedded demo: examples/demo-cpu.yaml)."""
    import importlib.util

    from kuberl_operator import api

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"`kuberl local` needs {', '.join(missing)}: pip install 'kuberl[runtime]'")

    doc = _job_document(file)
    runtime = doc.setdefault("spec", {}).setdefault("runtime", {})
    overrides = {
        ("training", "totalSteps"): steps,
        ("training", "seed"): seed,
        ("checkpoint", "dir"): checkpoint_dir,
        ("checkpoint", "resume"): False if no_resume else None,
        ("logging", "tensorboardDir"): tensorboard_dir,
    }
    for (group, key), value in overrides.items():
        if value is not None:
            runtime.setdefault(group, {})[key] = value
    try:
        spec = api.parse_job(doc)
    except api.SpecError as e:
        raise click.ClickException("\n".join(f"{file}: {p}: {m}" if p else f"{file}: {m}" for p, m in e.errors)) from None

    if processes_needed(spec) > 1:
        try:
            from kuberl_runtime.launch import run_local_processes
        except ImportError:
            raise click.ClickException(f"{file}: needs {processes_needed(spec)} processes; this build runs one") from None

        sys.exit(run_local_processes(doc, metrics_file=metrics_file))
    sys.exit(run_in_process(spec.runtime, progress_bar=sys.stderr.isatty() if progress_bar is None else progress_bar,
                            metrics_file=metrics_file))


def run_in_process(cfg, *, progress_bar: bool, metrics_file: str | None) -> int:
    """Run a one-process colocated job here; returns the exit code (errors.exit_code_for)."""
    from kuberl_runtime import errors
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.main import run_trainer

    t0 = time.monotonic()
    try:
        job = run_trainer(cfg, Topology(), progress_bar=progress_bar, metrics_file=metrics_file, serve_progress=False)
    except BaseException as exc:  # noqa: BLE001 - reported the way kuberl-runtime reports it
        if not isinstance(exc, (errors.RuntimeFailure, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
        click.echo(f"kuberl local: {errors.describe(exc)}", err=True)
        return errors.exit_code_for(exc)
    doc = job.progress.document()
    reward = f", last reward/mean {doc.reward_mean:.3f}" if doc.reward_mean is not None else ""
    click.echo(f"kuberl local: done, step {doc.step}/{doc.total_steps} in {time.monotonic() - t0:.0f} s{reward}; "
               f"checkpoints in {cfg.checkpoint.dir}", err=True)
    return 0
