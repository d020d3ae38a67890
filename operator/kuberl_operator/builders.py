"""Pure builders of an RLJob's children: the ConfigMap, the headless Service and the pods.

No API calls here. `build_*` functions take the parsed spec plus the job's identity (`JobRef`) and
return plain manifests; the planner decides which of them to create or delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from kuberl_operator import labels, names
from kuberl_operator.api import API_VERSION, DEFAULT_IMAGE, KIND, RLJobSpec, RoleSpec
from kuberl_operator.scheduling import pod_scheduling
from kuberl_runtime import contract

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_TAINT_KEY = "nvidia.com/gpu"
RUN_AS_USER = 1000
# The operator's default runtime image (the Helm chart sets it from `runtimeImage`).
DEFAULT_IMAGE_ENV = "KUBERL_DEFAULT_RUNTIME_IMAGE"

Obj = dict[str, Any]


@dataclass(frozen=True)
class JobRef:
    """Identity of the RLJob that owns the children."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> Obj:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, extra_labels: dict[str, str] | None = None) -> Obj:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {**labels.job_labels(self.name), **(extra_labels or {})},
            "ownerReferences": [self.owner_reference()],
        }


def pod_spec_hash(spec: RLJobSpec) -> str:
    """Hash of everything that shapes pods; run-policy fields that apply in place are left out."""
    doc = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    run_policy = doc.pop("runPolicy")
    doc.pop("suspend", None)
    doc["scheduling"] = run_policy["scheduling"]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def process_layout(spec: RLJobSpec) -> list[tuple[str, RoleSpec, int, int]]:
    """(role, role spec, first job-wide rank, processes per pod) for each role with pods.

    Trainer pods start one process per GPU (FSDP ranks); rollout pods one engine replica per
    tensorParallelSize GPUs (`contract.processes_per_pod`); every other role one process per pod.
    """
    out, rank = [], 0
    for role, rs in spec.roles.active():
        per_pod = contract.processes_per_pod(role, rs.gpus, rs.tensor_parallel_size)
        out.append((role, rs, rank, per_pod))
        rank += rs.replicas * per_pod
    return out


def world_size(spec: RLJobSpec) -> int:
    return sum(rs.replicas * per_pod for _, rs, _, per_pod in process_layout(spec))


def build_configmap(job: JobRef, spec: RLJobSpec) -> Obj:
    text = yaml.safe_dump(spec.runtime.to_yaml_dict(), sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": job.metadata(names.configmap_name(job.name)),
        "data": {names.CONFIG_FILE: text},
    }


def build_service(job: JobRef, spec: RLJobSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": job.metadata(names.service_name(job.name)),
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is ready: DNS must resolve unready pods too.
            "publishNotReadyAddresses": True,
            "selector": {labels.JOB: job.name},
            "ports": [
                {"name": names.RENDEZVOUS_PORT_NAME, "port": names.RENDEZVOUS_PORT, "protocol": "TCP"},
                {"name": names.HTTP_PORT_NAME, "port": spec.runtime.logging.port, "protocol": "TCP"},
            ],
        },
    }


def _env(name: str, value: Any) -> Obj:
    return {"name": name, "value": str(value)}


def build_env(job: JobRef, spec: RLJobSpec, role: str, rs: RoleSpec, index: int, first_rank: int,
              per_pod: int, restart: int) -> list[Obj]:
    trainer = spec.roles.trainer
    rollout = spec.roles.rollout
    engines = rollout.replicas * contract.processes_per_pod("rollout", rollout.gpus, rollout.tensor_parallel_size) \
        if rollout else 0
    env: list[Obj] = [
        _env(contract.ENV_CONFIG, f"{names.CONFIG_MOUNT}/{names.CONFIG_FILE}"),
        _env(contract.ENV_JOB, job.name),
        _env(contract.ENV_NAMESPACE, job.namespace),
        _env(contract.ENV_ROLE, role),
        _env(contract.ENV_ROLE_RANK, index),
        _env(contract.ENV_ROLE_REPLICAS, rs.replicas),
        _env(contract.ENV_RANK, first_rank + index * per_pod),
        _env(contract.ENV_LOCAL_WORLD_SIZE, per_pod),
        _env(contract.ENV_WORLD_SIZE, world_size(spec)),
        _env(contract.ENV_TRAINER_WORLD_SIZE, trainer.replicas * max(trainer.gpus, 1)),
        _env(contract.ENV_ROLLOUT_REPLICAS, engines),  # engine replicas, not pods
        *(_env(name, getattr(spec.roles, r).replicas if getattr(spec.roles, r) else 0) for r, name in (
            ("critic", contract.ENV_CRITIC_REPLICAS), ("reference", contract.ENV_REFERENCE_REPLICAS),
            ("reward", contract.ENV_REWARD_REPLICAS))),
        _env(contract.ENV_MASTER_ADDR, names.master_addr(job.name, job.namespace)),
        _env(contract.ENV_MASTER_PORT, names.RENDEZVOUS_PORT),
        _env(contract.ENV_PLACEMENT, spec.placement),
        _env(contract.ENV_GPUS, rs.gpus),
        _env(contract.ENV_RESTART, restart),
        {"name": contract.ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        _env("PYTHONUNBUFFERED", "1"),
        # Surface NCCL failures as errors (and exit codes) instead of hangs.
        _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        _env("NCCL_DEBUG", "WARN"),
    ]
    model = spec.runtime.model
    if model.token_secret_ref:
        ref = model.token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    wandb = spec.runtime.logging.wandb
    if wandb and wandb.api_key_secret_ref and role == "trainer":
        ref = wandb.api_key_secret_ref
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    # User entries first: for duplicate names the last entry wins, so kuberl's contract holds.
    return [*spec.env, *rs.env, *env]


def build_affinity(rs: RoleSpec) -> Obj | None:
    """The user's affinity with GPU product/memory requirements ANDed into every node term."""
    affinity = json.loads(json.dumps(rs.affinity or {}))
    exprs: list[Obj] = []
    if rs.gpus and rs.gpu_product:
        exprs.append({"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(rs.gpu_product)})
    if rs.gpus and rs.gpu_memory_mib:
        exprs.append({"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(rs.gpu_memory_mib - 1)]})
    if exprs:
        node = affinity.setdefault("nodeAffinity", {})
        required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
        terms = required.setdefault("nodeSelectorTerms", [])
        if not terms:
            terms.append({})
        for term in terms:
            term["matchExpressions"] = [*term.get("matchExpressions", []), *exprs]
    return affinity or None


def build_resources(rs: RoleSpec) -> Obj:
    resources = json.loads(json.dumps(rs.resources or {}))
    limits = resources.setdefault("limits", {})
    if rs.gpus:
        limits[rs.gpu_resource] = str(rs.gpus)
    for name, count in rs.extra_resources.items():
        limits[name] = str(count)
    # Extended resources cannot be overcommitted: requests must equal limits or be absent.
    requests = resources.get("requests")
    if requests:
        for name in [rs.gpu_resource, *rs.extra_resources]:
            if name in limits:
                requests[name] = limits[name]
    return resources


def build_volumes(job: JobRef, spec: RLJobSpec, role: str, rs: RoleSpec) -> tuple[list[Obj], list[Obj]]:
    volumes: list[Obj] = [
        {"name": "kuberl-config", "configMap": {"name": names.configmap_name(job.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": rs.shm_size}},
    ]
    mounts: list[Obj] = [
        {"name": "kuberl-config", "mountPath": names.CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes.append({"name": "kuberl-workspace", "emptyDir": {}})
    mounts.append({"name": "kuberl-workspace", "mountPath": names.WORKSPACE_MOUNT})
    if role in ("trainer", "critic"):  # a critic pod checkpoints its own state beside the trainer's
        ckpt = spec.runtime.checkpoint
        volumes.append({"name": "kuberl-checkpoints", **(ckpt.volume or {"emptyDir": {}})})
        mounts.append({"name": "kuberl-checkpoints", "mountPath": in_workspace(ckpt.dir)})
    return [*volumes, *spec.volumes, *rs.volumes], [*mounts, *spec.volume_mounts, *rs.volume_mounts]


def in_workspace(path: str) -> str:
    """Where a runtime-config path lives in the container: relative paths resolve under the
    workspace (the container's workingDir), so one job YAML works for `kuberl local` and a cluster."""
    return posixpath.normpath(posixpath.join(names.WORKSPACE_MOUNT, path))


def container_image(spec: RLJobSpec, rs: RoleSpec) -> str:
    """The role's image, else spec.image. A spec.image left at the API's default (the API server
    fills it in) gives way to the operator's KUBERL_DEFAULT_RUNTIME_IMAGE, so a cluster can point
    every job at a mirrored runtime image without editing the jobs."""
    if rs.image:
        return rs.image
    if spec.image == DEFAULT_IMAGE:
        return os.environ.get(DEFAULT_IMAGE_ENV) or DEFAULT_IMAGE
    return spec.image


def build_pod(job: JobRef, spec: RLJobSpec, role: str, index: int, restart: int, spec_hash: str,
              native_gang: bool = False) -> Obj:
    """One pod of the gang: `<job>-<role>-<index>`, restartPolicy Never (the operator restarts gangs)."""
    layout = {r: (rs, first, per_pod) for r, rs, first, per_pod in process_layout(spec)}
    rs, first_rank, per_pod = layout[role]
    name = names.pod_name(job.name, role, index)
    volumes, mounts = build_volumes(job, spec, role, rs)
    port = spec.runtime.logging.port
    ports = [{"name": names.HTTP_PORT_NAME, "containerPort": port, "protocol": "TCP"}]
    if role == "trainer" and index == 0:
        ports.append({"name": names.RENDEZVOUS_PORT_NAME, "containerPort": names.RENDEZVOUS_PORT, "protocol": "TCP"})
    if role == "rollout":  # engine replica i of the pod serves on port + i (rollout_server.serve_rollout)
        ports += [{"name": f"engine-{i}", "containerPort": port + i, "protocol": "TCP"} for i in range(1, per_pod)]
    container: Obj = {
        "name": names.CONTAINER_NAME,
        "image": container_image(spec, rs),
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["kuberl-runtime"],
        "workingDir": names.WORKSPACE_MOUNT,
        "env": build_env(job, spec, role, rs, index, first_rank, per_pod, restart),
        "ports": ports,
        "resources": build_resources(rs),
        "volumeMounts": mounts,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": names.HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    tolerations = list(rs.tolerations)
    if rs.gpus:
        tolerations.append({"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
    sched = pod_scheduling(job.name, spec, restart, native_gang)
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": names.service_name(job.name),
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "tolerations": tolerations,
        **sched.pod_spec,
    }
    if rs.node_selector:
        pod_spec["nodeSelector"] = dict(rs.node_selector)
    affinity = build_affinity(rs)
    if affinity:
        pod_spec["affinity"] = affinity
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    meta = job.metadata(name, {**labels.pod_labels(job.name, role, index, restart), **sched.labels})
    meta["annotations"] = {labels.SPEC_HASH: spec_hash, **sched.annotations}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def build_pods(job: JobRef, spec: RLJobSpec, restart: int, native_gang: bool = False) -> list[Obj]:
    spec_hash = pod_spec_hash(spec)
    return [
        build_pod(job, spec, role, i, restart, spec_hash, native_gang)
        for role, rs, _, _ in process_layout(spec)
        for i in range(rs.replicas)
    ]
