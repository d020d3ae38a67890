"""What every handler shares in one operator process: settings, API clients, caches, the queue.

`kuberl operator` builds an `OperatorConfig` from its options; the startup handler turns it into an
`OperatorContext` and keeps it in kopf's memo, where every handler finds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kuberl_operator.effects import Kube
from kuberl_operator.metrics import Metrics
from kuberl_operator.observe import ClusterFacts
from kuberl_operator.progress import DEFAULT_INTERVAL_S, DEFAULT_URL_TEMPLATE, ProgressReader
from kuberl_operator.workqueue import WorkQueue


@dataclass
class OperatorConfig:
    metrics_port: int = 8080
    progress_interval: float = DEFAULT_INTERVAL_S
    progress_url_template: str = DEFAULT_URL_TEMPLATE


@dataclass
class OperatorContext:
    config: OperatorConfig
    kube: Kube
    facts: ClusterFacts
    progress: ProgressReader
    metrics: Metrics
    queue: WorkQueue
