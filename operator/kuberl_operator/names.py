"""Names of every child object: one place, used by builders, selectors and tests alike.

Names are deterministic so that a restarted operator finds what it created instead of creating
duplicates (a second create of the same name is a 409, which the effects layer treats as done).
"""

from __future__ import annotations

from kuberl_runtime.contract import MASTER_PORT

HTTP_PORT_NAME = "http"
RENDEZVOUS_PORT_NAME = "rendezvous"
RENDEZVOUS_PORT = MASTER_PORT
CONTAINER_NAME = "runtime"
CONFIG_MOUNT = "/etc/kuberl"
# Every container runs here (an emptyDir): relative paths of the runtime config (checkpoint.dir,
# logging.tensorboardDir) resolve under it, the same way `kuberl local` resolves them under its cwd.
WORKSPACE_MOUNT = "/workspace"
CONFIG_FILE = "config.yaml"
MANAGER = "kuberl.io/operator"  # value of spec.managedBy that this operator reconciles


def pod_name(job: str, role: str, index: int) -> str:
    return f"{job}-{role}-{index}"


def service_name(job: str) -> str:
    """The headless Service: pods get `<pod>.<job>.<ns>.svc` DNS names through it."""
    return job


def configmap_name(job: str) -> str:
    return f"{job}-config"


def workload_name(job: str) -> str:
    return job


def podgroup_name(job: str) -> str:
    return job


def native_podgroup_name(job: str, restart: int) -> str:
    """Kubernetes' own PodGroup of gang attempt `restart` (pods point at it; immutable, so one per attempt)."""
    return f"{job}-gang-{restart}"


def pod_dns(job: str, namespace: str, role: str, index: int, domain: str = "svc") -> str:
    return f"{pod_name(job, role, index)}.{service_name(job)}.{namespace}.{domain}"


def master_addr(job: str, namespace: str) -> str:
    """Trainer rank 0 hosts the TCPStore every process rendezvouses at."""
    return pod_dns(job, namespace, "trainer", 0)
