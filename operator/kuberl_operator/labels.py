"""Labels and annotations kuberl puts on its objects, and the selectors built from them."""

from __future__ import annotations

JOB = "kuberl.io/job"
ROLE = "kuberl.io/role"
REPLICA = "kuberl.io/replica"
RESTART = "kuberl.io/restart"  # gang attempt the pod belongs to (status.restarts when created)
SPEC_HASH = "kuberl.io/spec-hash"  # hash of the spec fields that shape pods
MANAGED_BY = "app.kubernetes.io/managed-by"

KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_GROUP_TOTAL = "kueue.x-k8s.io/pod-group-total-count"
VOLCANO_GROUP = "scheduling.k8s.io/group-name"  # Volcano's pod -> PodGroup annotation
COSCHEDULING_GROUP = "scheduling.x-k8s.io/pod-group"  # scheduler-plugins' pod -> PodGroup label

# kopf's own bookkeeping goes to annotations under this prefix, never into status.
KOPF_PREFIX = "kuberl.io"


def job_labels(job: str) -> dict[str, str]:
    return {
        JOB: job,
        "app.kubernetes.io/name": "kuberl",
        "app.kubernetes.io/instance": job,
        MANAGED_BY: "kuberl",
    }


def pod_labels(job: str, role: str, index: int, restart: int) -> dict[str, str]:
    return {**job_labels(job), ROLE: role, REPLICA: str(index), RESTART: str(restart)}


def job_selector(job: str) -> str:
    """Label selector string for every object of a job."""
    return f"{JOB}={job}"
