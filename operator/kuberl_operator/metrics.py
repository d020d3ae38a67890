"""The operator's Prometheus metrics (prometheus-client), served on --metrics-port.

Names are prefixed `kuberl_operator_`. Jobs by phase is a gauge recomputed from the last phase the
operator saw of each job, so a deleted job drops out of it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kuberl_operator.api import RLJobStatus

PHASES = list(RLJobStatus.model_fields["phase"].annotation.__args__)  # type: ignore[union-attr]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("kuberl_operator_reconciles", "Reconcile passes by result (ok, retry, error).",
                                  ["result"], registry=r)
        self.errors = Counter("kuberl_operator_reconcile_errors", "Reconcile passes that raised an error.",
                              registry=r)
        self.latency = Histogram("kuberl_operator_reconcile_duration_seconds", "Duration of a reconcile pass.",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.jobs = Gauge("kuberl_operator_jobs", "RLJobs by phase, as last seen by this operator.", ["phase"],
                          registry=r)
        self.restarts = Counter("kuberl_operator_gang_restarts", "Gang restarts the operator started.", registry=r)
        self.pods_created = Counter("kuberl_operator_pods_created", "Pods created.", registry=r)
        self.pods_deleted = Counter("kuberl_operator_pods_deleted", "Pods deleted.", registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.jobs.labels(phase).set(0)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)

    def job_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Record a job's phase (None: the job is gone)."""
        old = self._phases.pop(key, None)
        if old is not None:
            self.jobs.labels(old).dec()
        if phase is not None:
            self._phases[key] = phase
            self.jobs.labels(phase).inc()
