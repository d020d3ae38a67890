"""`kuberl operator`: run the RLJob controller (kopf) against the cluster KUBECONFIG points at.

    kuberl operator                          # every namespace, standalone, metrics on :8080
    kuberl operator -n team-a -n team-b      # only these namespaces
    kuberl operator --peering kuberl         # leader election through kopf's peering objects
    kuberl operator --liveness http://0.0.0.0:8081/healthz --metrics-port 9090
"""

from __future__ import annotations

import socket
import zlib

import logging

import click

from kuberl_operator.progress import DEFAULT_INTERVAL_S, DEFAULT_URL_TEMPLATE


@click.command("operator")
@click.option("--namespace", "-n", "namespaces", multiple=True, metavar="NS",
              help="Watch this namespace (repeatable; glob patterns allowed). Default: all namespaces.")
@click.option("--all-namespaces", "-A", "all_namespaces", is_flag=True,
              help="Watch every namespace (the default when no --namespace is given).")
@click.option("--liveness", "liveness", default=None, metavar="URL",
              help="Serve kopf's health probe here, e.g. http://0.0.0.0:8081/healthz.")
@click.option("--peering", "peering", default=None, metavar="NAME",
              help="Leader election through kopf's (Cluster)KopfPeering NAME (its CRDs must be installed).")
@click.option("--priority", type=int, default=None, metavar="N",
              help="Peering priority: the live replica with the highest works, the others stand by. "
                   "Default with --peering: derived from the host (pod) name, so replicas differ "
                   "(kopf pauses every replica when two share the top priority).")
@click.option("--standalone", is_flag=True, help="No peering: assume this is the only operator (default).")
@click.option("--metrics-port", default=8080, show_default=True, type=int,
              help="Port of the Prometheus /metrics endpoint (0: off).")
@click.option("--progress-interval", default=DEFAULT_INTERVAL_S, show_default=True, type=float,
              help="Seconds between two reads of one job's progress endpoint (0: never read).")
@click.option("--progress-url-template", default=DEFAULT_URL_TEMPLATE, show_default=True,
              help="URL of trainer rank 0's progress endpoint; fields {pod_ip} {port} {pod} {job} {namespace}.")
@click.option("--verbose", "-v", is_flag=True, help="Log more (kopf's verbose mode).")
@click.option("--debug", is_flag=True, help="Log everything, including API calls.")
def operator(namespaces: tuple[str, ...], all_namespaces: bool, liveness: str | None, peering: str | None,
             priority: int | None, standalone: bool, metrics_port: int, progress_interval: float, progress_url_template: str,
             verbose: bool, debug: bool) -> None:
    """Run the operator: reconcile RLJobs into pods, restart failed gangs, report status."""
    try:  # here, not at import, so that `kuberl operator --help` works on the base install
        import kopf

        from kuberl_operator import main as _registration  # noqa: F401 - registers the handlers
        from kuberl_operator.context import OperatorConfig
    except ImportError as e:  # what the CLI's LazyGroup says for the other commands' extras
        raise click.ClickException(
            f"`kuberl operator` needs more packages ({e.name} is missing): pip install 'kuberl[operator]'"
        ) from None

    if namespaces and all_namespaces:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    if peering and standalone:
        raise click.UsageError("--peering and --standalone exclude each other")
    if peering and priority is None:
        priority = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    kopf.configure(verbose=verbose, debug=debug)
    if not (verbose or debug):  # kopf logs every handler call at INFO: thousands of lines a minute
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(metrics_port=metrics_port, progress_interval=progress_interval,
                            progress_url_template=progress_url_template)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        memo=kopf.Memo(config=config),
    )
