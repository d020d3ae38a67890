"""The HTTP endpoint of a runtime process: /progress, /metrics, /healthz, /readyz.

The first process of every trainer pod serves the `contract.Progress` document at GET /progress
(its `rank` says whose it is); the operator polls trainer rank 0's and mirrors it into the RLJob's
`status.progress`. Every pod answers its readiness probe here:

    GET /progress   the Progress document, camelCase JSON
    GET /metrics    Prometheus text: every metric passed to update() as a gauge, `reward/mean` ->
                    `kuberl_reward_mean`, plus kuberl_step, kuberl_total_steps,
                    kuberl_weights_version and kuberl_last_checkpoint_step
    GET /healthz    200 while the process lives (liveness)
    GET /readyz     200 after set_ready(True), 503 before (readiness)

    progress = ProgressReporter(total_steps=cfg.training.total_steps, port=cfg.logging.port).start()
    progress.update(step, metrics, weights_version=version)
    progress.checkpointed(step)
    progress.finish("failed", describe(exc))

The server runs in a daemon thread and keeps everything in memory; all methods are thread-safe.
Each reporter has its own Prometheus registry, so several can live in one process (tests, local
runs with all roles in one process). Non-finite values are served as JSON null.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler
from typing import Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from .contract import Progress
from .errors import ConfigError
from .http_service import ThreadedServer

# Metric name -> Progress field (the operator-facing subset of the metrics).
PROGRESS_FIELDS = {
    "reward/mean": "reward_mean",
    "reward/std": "reward_std",
    "train/kl": "kl",
    "train/entropy": "entropy",
    "rollout/response_length": "response_length",
    "rollout/tokens_per_s": "tokens_per_second",
}
TIME_FIELDS = {
    "time/generate_s": "generate",
    "time/score_s": "score",
    "time/train_s": "train",
    "time/sync_s": "sync",
}


def prometheus_name(metric: str) -> str:
    """`reward/mean` -> `kuberl_reward_mean`; any character Prometheus forbids becomes `_`."""
    return "kuberl_" + re.sub(r"[^a-zA-Z0-9_]", "_", metric)


class ProgressReporter:
    """Holds the Progress document and the gauges; serves them over HTTP when given a port.

    port: None serves nothing (a pod's processes other than its first, tests); 0 picks a free port,
    read `.port` after `start()`. rank: the job-wide trainer rank, written into the document.
    """

    def __init__(self, total_steps: int, port: int | None = None, host: str = "0.0.0.0", rank: int = 0):
        self._lock = threading.Lock()
        self._progress = Progress(total_steps=total_steps, rank=rank)
        self._ready = False
        self._registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self._requested_port = port
        self._host = host
        self._server: ThreadedServer | None = None
        self.port: int | None = None
        self._gauge("step").set(0)
        self._gauge("total_steps").set(total_steps)

    # --------------------------------------------------------------------------------- updates

    def update(self, step: int, metrics: dict[str, float], weights_version: int | None = None) -> None:
        """Record a finished step: its metrics become Progress fields (where named) and gauges."""
        with self._lock:
            p = self._progress
            p.state = "running"
            p.step = step
            if weights_version is not None:
                p.weights_version = weights_version
                self._gauge("weights_version").set(weights_version)
            for name, value in metrics.items():
                if name in PROGRESS_FIELDS:
                    setattr(p, PROGRESS_FIELDS[name], float(value))
                elif name in TIME_FIELDS:
                    setattr(p.time, TIME_FIELDS[name], float(value))
                self._gauge(name).set(float(value))
            self._gauge("step").set(step)

    def checkpointed(self, step: int) -> None:
        """Checkpoint `step` is complete (call after Checkpointer.save returned)."""
        with self._lock:
            self._progress.last_checkpoint_step = step
            self._gauge("last_checkpoint_step").set(step)

    def resumed(self, step: int) -> None:
        """The run restarted from checkpoint `step`: progress continues from there."""
        with self._lock:
            self._progress.resumed_from_step = step
            self._progress.last_checkpoint_step = step
            self._progress.step = step
            self._gauge("step").set(step)
            self._gauge("last_checkpoint_step").set(step)

    def finish(self, state: Literal["succeeded", "failed"], message: str | None = None) -> None:
        """The final state; on failure `message` is errors.describe(exc), naming the field to change."""
        with self._lock:
            self._progress.state = state
            self._progress.message = message

    def set_ready(self, ready: bool = True) -> None:
        with self._lock:
            self._ready = ready

    def document(self) -> Progress:
        """A copy of the current Progress document."""
        with self._lock:
            return self._progress.model_copy(deep=True)

    def _gauge(self, metric: str) -> Gauge:
        name = prometheus_name(metric)
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, metric, registry=self._registry)
        return self._gauges[name]

    # ---------------------------------------------------------------------------------- server

    def start(self) -> ProgressReporter:
        if self._requested_port is None or self._server is not None:
            return self
        try:
            self._server = ThreadedServer(_handler(self), self._host, self._requested_port, name="kuberl-progress")
        except OSError as e:
            raise ConfigError(
                f"cannot serve progress on {self._host}:{self._requested_port}: {e.strerror or e}",
                field="runtime.logging.port",
            ) from e
        self.port = self._server.port
        self._server.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> ProgressReporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/progress":
            return 200, "application/json", self.document().model_dump_json(by_alias=True).encode()
        if path == "/metrics":
            with self._lock:
                body = generate_latest(self._registry)
            return 200, CONTENT_TYPE_LATEST, body
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            with self._lock:
                ready = self._ready
            return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"not ready\n")
        return 404, "text/plain", b"not found\n"


def _handler(reporter: ProgressReporter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            status, content_type, body = reporter._respond(self.path.split("?", 1)[0])
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the operator polls every few seconds; access logs would drown the run's output

    return Handler
