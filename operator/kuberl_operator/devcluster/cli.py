"""``kuberl dev-cluster up|down|status|build``: a local control plane with fake GPU nodes.

The group is registered by the main ``kuberl`` CLI and also runs as
``python -m kuberl_operator.devcluster``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .build import BuildError, ensure_binaries, locate_binaries
from .cluster import (DEFAULT_FEATURE_GATES, DEFAULT_RUNTIME_CONFIG, ClusterError, LocalCluster,
                      default_state_dir, describe)
from .nodes import GPUPool

state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=default_state_dir,
    show_default="~/.cache/kuberl/dev-cluster (or $KUBERL_DEV_CLUSTER_DIR)",
    help="Where certificates, etcd data, logs and the kubeconfig live.")


def _err(message: str) -> None:
    click.echo(message, err=True)


def _parse_gates(values: tuple[str, ...]) -> dict[str, bool]:
    gates = dict(DEFAULT_FEATURE_GATES)
    for value in values:
        for item in value.split(","):
            name, _, on = item.partition("=")
            gates[name.strip()] = on.strip().lower() != "false"
    return gates


@click.group("dev-cluster")
def dev_cluster() -> None:
    """A local Kubernetes control plane (built from source) with kwok-simulated GPU nodes."""


@dev_cluster.command()
def build() -> None:
    """Build the control-plane binaries into the cache (once per machine; minutes cold)."""
    try:
        binaries = ensure_binaries(log=lambda message: _err(f"[kuberl build] {message}"))
    except BuildError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(binaries.bin_dir)


@dev_cluster.command()
@state_dir_option
@click.option("--gpu-nodes", type=int, default=4, show_default=True,
              help="Nodes in the default GPU pool (ignored when --gpu-pool is given).")
@click.option("--gpus-per-node", type=int, default=8, show_default=True)
@click.option("--gpu-product", default="NVIDIA-H100-80GB-HBM3", show_default=True,
              help="nvidia.com/gpu.product label of the default GPU pool.")
@click.option("--gpu-pool", "gpu_pools", multiple=True, metavar="COUNTxPRODUCT[:GPUS[:MIB]]",
              help="A GPU pool, e.g. 2xNVIDIA-H200:8; repeat for several pools.")
@click.option("--cpu-nodes", type=int, default=1, show_default=True)
@click.option("--feature-gates", "gates", multiple=True, metavar="NAME=BOOL,...",
              help="Extra or overriding feature gates (default: GenericWorkload and GangScheduling "
                   "on), passed to apiserver, scheduler and controller-manager.")
@click.option("--runtime-config", "runtime_config", multiple=True, metavar="GROUP/VERSION=BOOL",
              help="Extra kube-apiserver --runtime-config entries "
                   "(default: scheduling.k8s.io/v1alpha2=true).")
def up(state_dir, gpu_nodes, gpus_per_node, gpu_product, gpu_pools, cpu_nodes, gates,
       runtime_config) -> None:
    """Start the cluster in the background and print its kubeconfig."""
    try:
        pools = tuple(GPUPool.parse(p) for p in gpu_pools) or (
            (GPUPool(gpu_nodes, gpu_product, gpus_per_node),) if gpu_nodes else ())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    runtime = dict(DEFAULT_RUNTIME_CONFIG)
    for item in runtime_config:
        key, _, value = item.partition("=")
        runtime[key] = value or "true"
    cluster = LocalCluster(state_dir, gpu_pools=pools, cpu_nodes=cpu_nodes,
                           feature_gates=_parse_gates(gates), runtime_config=runtime,
                           tie_to_parent=False, log=_err)
    try:
        cluster.up()
    except (BuildError, ClusterError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kubeconfig: {cluster.kubeconfig}")
    click.echo(f"export KUBECONFIG={cluster.kubeconfig}")
    click.echo(f"export PATH={locate_binaries().bin_dir}:$PATH   # kubectl, helm")


@dev_cluster.command()
@state_dir_option
def down(state_dir) -> None:
    """Stop every process of the cluster and drop its etcd data."""
    cluster = LocalCluster(state_dir, tie_to_parent=False, log=_err)
    was_running = cluster.is_running()
    cluster.down()
    click.echo("dev cluster stopped" if was_running else "no dev cluster was running")


@dev_cluster.command()
@state_dir_option
def status(state_dir) -> None:
    """Show the server, kubeconfig and which components are alive; exit 1 if none run."""
    state = describe(state_dir)
    if not state.get("pids"):
        _err(f"no dev cluster recorded in {state_dir}")
        sys.exit(1)
    click.echo(json.dumps({k: state[k] for k in ("server", "kubeconfig", "version", "alive")},
                          indent=2))
    if not any(state["alive"].values()):
        sys.exit(1)
