"""Read what a reconcile pass plans from: the job itself, its pods, the nodes, the cluster's APIs.

Every pass reads the job fresh (not the watch event's copy) so it plans from the newest status and
resourceVersion. Node names and API discovery change rarely and are shared by all jobs, so they are
cached for a few seconds instead of being read per pass.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from kuberl_operator import labels
from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.effects import Kube, call
from kuberl_operator.scheduling import WORKLOAD_API_VERSION

Obj = dict[str, Any]
NODES_TTL_S = 10.0
DISCOVERY_TTL_S = 60.0


def read_job(kube: Kube, namespace: str, name: str) -> Obj | None:
    return call(kube.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, ok=(404,))


def list_pods(kube: Kube, namespace: str, job: str) -> list[Obj]:
    resp = kube.core.list_namespaced_pod(namespace, label_selector=labels.job_selector(job),
                                         _preload_content=False)
    return json.loads(resp.data)["items"]


class ClusterFacts:
    """Node names and whether the cluster serves Kubernetes' gang scheduling API, cached."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self._lock = threading.Lock()
        self._nodes: tuple[float, set[str] | None] = (0.0, None)
        self._gang: tuple[float, bool] = (0.0, False)

    def nodes(self, needed: set[str] = frozenset()) -> set[str] | None:
        """Node names; re-read when the cache is old or lacks one of `needed` (a node may be new)."""
        with self._lock:
            at, value = self._nodes
            if time.monotonic() - at < NODES_TTL_S and value is not None and needed <= value:
                return value
        resp = self.kube.core.list_node(_preload_content=False)
        value = {n["metadata"]["name"] for n in json.loads(resp.data)["items"]}
        with self._lock:
            self._nodes = (time.monotonic(), value)
        return value

    def native_gang(self) -> bool:
        """Whether scheduling.k8s.io serves both workloads and podgroups (GenericWorkload gate)."""
        with self._lock:
            at, value = self._gang
            if time.monotonic() - at < DISCOVERY_TTL_S:
                return value
        group, version = WORKLOAD_API_VERSION.split("/")
        resp = call(self.kube.custom.get_api_resources, group, version, ok=(404, 503), _preload_content=False)
        served = set()
        if resp is not None:
            served = {r["name"] for r in json.loads(resp.data).get("resources", [])}
        value = {"workloads", "podgroups"} <= served
        with self._lock:
            self._gang = (time.monotonic(), value)
        return value
