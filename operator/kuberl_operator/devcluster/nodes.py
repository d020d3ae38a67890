"""Fake nodes for the dev cluster: GPU nodes shaped like GPU Feature Discovery labels them.

kwok manages only nodes that carry the ``kwok.x-k8s.io/node: fake`` annotation
(``KWOK_NODE_SELECTOR``) and only pods bound to those nodes; any other node (one that a local pod
runner acts as kubelet for, say) and its pods are left alone. A node is created with its status
(capacity and allocatable, ``nvidia.com/gpu`` included) in the same POST; kwok's node-initialize
stage then marks it Ready and keeps its lease fresh.

The ``POD_*`` annotations drive the kuberl stages (stages/pod-fail.yaml, stages/pod-succeed.yaml):
a Running pod on a kwok node turns Failed or Succeeded on demand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_SELECTOR = f"{KWOK_ANNOTATION}=fake"  # kwok --manage-nodes-with-annotation-selector

# Pod annotations the kuberl kwok stages react to (values are strings).
POD_FAIL = "kwok.kuberl.io/fail"  # value: the termination reason, e.g. "OOMKilled" or "Error"
POD_EXIT_CODE = "kwok.kuberl.io/exit-code"  # exit code of the failed container, default "1"
POD_MESSAGE = "kwok.kuberl.io/message"  # state.terminated.message
POD_FAIL_CONTAINER = "kwok.kuberl.io/container"  # only this container fails (others: 137)
POD_SUCCEED = "kwok.kuberl.io/succeed"  # any value: Succeeded, every container exit code 0
POD_DELAY = "kwok.kuberl.io/delay"  # e.g. "30s": wait after Running before failing/succeeding
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
ZONE = "kuberl-local-a"

# nvidia.com/gpu.memory (MiB) as GPU Feature Discovery reports it, for products a user may ask for.
GPU_MEMORY_MIB = {
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H200": 143771,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-L40S": 46068,
    "NVIDIA-L4": 23034,
}


@dataclass(frozen=True)
class GPUPool:
    """``count`` nodes with ``gpus`` GPUs of one product each."""

    count: int = 4
    product: str = "NVIDIA-H100-80GB-HBM3"
    gpus: int = 8
    memory_mib: int | None = None

    @property
    def memory(self) -> int:
        return self.memory_mib or GPU_MEMORY_MIB.get(self.product, 81559)

    @property
    def slug(self) -> str:
        short = re.sub(r"[^a-z0-9]+", "-", self.product.lower()).strip("-")
        return short.removeprefix("nvidia-")[:30].strip("-")

    @classmethod
    def parse(cls, text: str) -> "GPUPool":
        """Parse ``COUNTxPRODUCT[:GPUS[:MEMORY_MIB]]``, e.g. ``2xNVIDIA-H200:8``."""
        match = re.fullmatch(r"(\d+)x([A-Za-z0-9._-]+)(?::(\d+))?(?::(\d+))?", text.strip())
        if not match:
            raise ValueError(f"GPU pool {text!r}: expected COUNTxPRODUCT[:GPUS[:MEMORY_MIB]], "
                             "for example 4xNVIDIA-H100-80GB-HBM3:8")
        count, product, gpus, memory = match.groups()
        return cls(int(count), product, int(gpus or 8), int(memory) if memory else None)


DEFAULT_GPU_POOLS = (GPUPool(),)


def _node(name: str, labels: dict, capacity: dict, taints: list) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": ZONE,
                "type": "kwok",
                **labels,
            },
        },
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def build_gpu_node(pool: GPUPool, index: int) -> dict:
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": pool.product,
        "nvidia.com/gpu.memory": str(pool.memory),
        "nvidia.com/gpu.count": str(pool.gpus),
        "node.kubernetes.io/instance-type": f"kwok-gpu-{pool.gpus}x-{pool.slug}",
    }
    capacity = {"cpu": str(24 * pool.gpus), "memory": f"{256 * pool.gpus}Gi",
                "ephemeral-storage": "2Ti", "pods": "110", GPU_RESOURCE: str(pool.gpus)}
    return _node(f"kwok-gpu-{pool.slug}-{index}", labels, capacity, [dict(GPU_TAINT)])


def build_cpu_node(index: int) -> dict:
    capacity = {"cpu": "32", "memory": "128Gi", "ephemeral-storage": "500Gi", "pods": "110"}
    return _node(f"kwok-cpu-{index}", {"node.kubernetes.io/instance-type": "kwok-cpu-32"},
                 capacity, [])


def build_nodes(gpu_pools=DEFAULT_GPU_POOLS, cpu_nodes: int = 1) -> list[dict]:
    """Every node of the cluster, GPU pools first."""
    nodes = [build_gpu_node(pool, i) for pool in gpu_pools for i in range(pool.count)]
    nodes += [build_cpu_node(i) for i in range(cpu_nodes)]
    names = [n["metadata"]["name"] for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"two GPU pools give the same node names: {sorted(names)}")
    return nodes
