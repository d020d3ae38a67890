"""The RLJob API (kuberl.io/v1alpha1): spec and status as pydantic models.

The CRD under crds/ is generated from these models (`kuberl crd`); cross-field rules live here
twice on purpose: as pydantic validators (messages naming the field path, used by `kuberl
validate` and by the operator) and as CEL `x-kubernetes-validations` (enforced by the API server
before anything reaches the operator). tests/unit/test_api.py keeps the two in agreement.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from kuberl_runtime.config import Model, RuntimeConfig
from kuberl_runtime.contract import MASTER_PORT, processes_per_pod

GROUP = "kuberl.io"
VERSION = "v1alpha1"
KIND = "RLJob"
PLURAL = "rljobs"
SINGULAR = "rljob"
SHORT_NAMES = ["rlj"]
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_IMAGE = "ghcr.io/kuberl/kuberl-runtime:0.1.0"

Obj = dict[str, Any]  # a Kubernetes object fragment kept as-is (affinity, volumes, env entries)

# Ports the pods declare besides runtime.logging.port itself (builders.build_pod): trainer rank 0 also
# serves the rendezvous store on MASTER_PORT, and engine replica i of a rollout pod serves on port + i.
MAX_PORT = 65535
RENDEZVOUS_PORT_CLASH = (
    f"must not be {MASTER_PORT}: trainer rank 0 serves the rendezvous store on that port "
    "(its pod and the job's Service would declare the port twice)"
)
ENGINE_PORTS_OVERFLOW = (
    "must leave room for the rollout pods' engine ports: engine replica i of a rollout pod serves on port + i, "
    f"which must be at most {MAX_PORT} for every replica (roles.rollout.gpus / tensorParallelSize per pod)"
)


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> Obj:
    v: Obj = {"rule": rule, "message": message}
    if field_path:
        v["fieldPath"] = field_path
    if reason:
        v["reason"] = reason
    return v


class RoleSpec(Model):
    """One role's pods: how many, which GPUs, where they may run."""

    model_config = Model.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.gpus) || !has(self.tensorParallelSize) || self.gpus == 0 || self.gpus % self.tensorParallelSize == 0",
                    "must be divisible by tensorParallelSize",
                    ".gpus",
                ),
            ]
        }
    }

    replicas: int = Field(1, ge=0, le=1024, description="Pods of this role (one process group rank each).")
    gpus: int = Field(
        1, ge=0, le=64, description="GPUs per pod, requested as the gpuResource limit. 0 runs on CPUs."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="GPUs per engine replica of a rollout pod, which runs gpus / tensorParallelSize "
        "replicas; divides gpus and equals runtime.rollout.tensorParallelSize."
    )
    image: str | None = Field(None, description="Container image. Default: spec.image.")
    resources: Obj | None = Field(
        None,
        description="Container resources (requests/limits for cpu, memory, ...). The GPU limit is set from gpus.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    gpu_product: list[str] = Field(
        default_factory=list,
        description="Allowed GPU products (node label nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3.",
    )
    gpu_memory_mib: int | None = Field(
        None, ge=1, description="Minimum GPU memory in MiB (node label nvidia.com/gpu.memory)."
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$",
        description="Extended resource requested for GPUs; a MIG profile such as nvidia.com/mig-1g.10gb.",
    )
    extra_resources: dict[str, int] = Field(
        default_factory=dict, description="More extended resources per pod, e.g. {rdma/ib: 1} for RDMA NICs."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    affinity: Obj | None = Field(
        None,
        description="Pod affinity merged with the GPU node affinity kuberl adds.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    tolerations: list[Obj] = Field(
        default_factory=list,
        description="Extra tolerations; nvidia.com/gpu:NoSchedule is added for GPU pods.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    env: list[Obj] = Field(
        default_factory=list,
        description="Extra container environment variables (Kubernetes EnvVar entries).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    volumes: list[Obj] = Field(
        default_factory=list,
        description="Extra pod volumes (Kubernetes Volume entries).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    volume_mounts: list[Obj] = Field(
        default_factory=list,
        description="Extra container volume mounts (Kubernetes VolumeMount entries).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    shm_size: str = Field("16Gi", description="Size limit of the memory-backed /dev/shm (NCCL needs it).")

    @model_validator(mode="after")
    def _tp(self) -> RoleSpec:
        if self.gpus and self.gpus % self.tensor_parallel_size:
            raise ValueError(
                f"gpus: must be divisible by tensorParallelSize ({self.tensor_parallel_size}), got {self.gpus}"
            )
        return self


class Roles(Model):
    """Pods per role. critic/reference/reward run inside the trainer pods unless given replicas here."""

    trainer: RoleSpec = Field(default_factory=RoleSpec, description="Policy training; rank 0 drives the loop.")
    rollout: RoleSpec | None = Field(None, description="Generation pods (disaggregated placement only).")
    critic: RoleSpec | None = Field(None, description="Separate critic pods (PPO only).")
    reference: RoleSpec | None = Field(None, description="Separate reference-model pods.")
    reward: RoleSpec | None = Field(None, description="Separate reward-model pods.")

    def active(self) -> list[tuple[str, RoleSpec]]:
        """Roles that get pods, in rank order (trainers first)."""
        out: list[tuple[str, RoleSpec]] = []
        for name in ("trainer", "rollout", "critic", "reference", "reward"):
            spec = getattr(self, name)
            if spec is not None and spec.replicas > 0:
                out.append((name, spec))
        return out


class Scheduling(Model):
    """How the gang is placed and queued."""

    gang: bool = Field(
        True,
        description="All pods start together or none does: Kubernetes' Workload API when the cluster "
        "serves it (GangScheduling gate), plus the PodGroup of `podGroup`.",
    )
    queue_name: str | None = Field(
        None, description="Kueue LocalQueue; pods get Kueue's plain-pod-group labels and annotations."
    )
    pod_group: Literal["none", "volcano", "scheduler-plugins"] = Field(
        "none", description="Also create a PodGroup for this scheduler and set the pods' schedulerName."
    )
    scheduler_name: str | None = Field(None, description="Pod schedulerName. Default: the podGroup scheduler or the cluster's.")
    priority_class_name: str | None = Field(None, description="PriorityClass of every pod.")


class RunPolicy(Model):
    """Restarts, deadlines and clean-up."""

    backoff_limit: int = Field(3, ge=0, description="Gang restarts before the job fails.")
    backoff_seconds: int = Field(
        10, ge=0, description="Delay before restart n is backoffSeconds x 2^(n-1), capped at 600 s."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job once it has run this long (counted from its start or its last resume)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this long after it succeeded or failed."
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods deleted when the job finishes: None, Running (still running) or All."
    )
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Gang scheduling and queueing.")


class RLJobSpec(Model):
    """An RL post-training job: roles, placement, run policy and the runtime config."""

    model_config = Model.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.placement != 'colocated' || !has(self.roles) || !has(self.roles.rollout) || self.roles.rollout.replicas == 0",
                    "must be 0 when placement is colocated (the trainer pods generate)",
                    ".roles.rollout.replicas",
                ),
                cel(
                    "self.placement != 'disaggregated' || (has(self.roles) && has(self.roles.rollout) && self.roles.rollout.replicas >= 1)",
                    "must be at least 1 when placement is disaggregated",
                    ".roles.rollout.replicas",
                ),
                cel(
                    "!has(self.roles) || !has(self.roles.critic) || self.roles.critic.replicas == 0 || "
                    "(has(self.runtime.algorithm) && self.runtime.algorithm.name == 'ppo')",
                    "needs runtime.algorithm.name ppo (only PPO trains a critic)",
                    ".roles.critic",
                ),
                cel(
                    "!has(self.roles) || !has(self.roles.critic) || self.roles.critic.replicas <= 1",
                    "must be at most 1: the critic's optimizer state lives in one pod (a critic over several "
                    "pods is not supported yet)",
                    ".roles.critic.replicas",
                ),
                cel(
                    "!has(self.runtime.rollout) || !has(self.runtime.rollout.tensorParallelSize) || "
                    "self.runtime.rollout.tensorParallelSize == 1 || "
                    "(has(self.runtime.rollout.engine) && self.runtime.rollout.engine == 'vllm')",
                    "must be 1 unless engine is vllm (kuberl's built-in engines are not tensor-parallel); "
                    "use engine: vllm for tensor parallelism",
                    ".runtime.rollout.tensorParallelSize",
                ),
                cel(
                    "self.placement != 'disaggregated' || !has(self.roles) || !has(self.roles.rollout) || "
                    "(has(self.roles.rollout.tensorParallelSize) ? self.roles.rollout.tensorParallelSize : 1) == "
                    "(has(self.runtime.rollout) && has(self.runtime.rollout.tensorParallelSize) ? "
                    "self.runtime.rollout.tensorParallelSize : 1)",
                    "must equal runtime.rollout.tensorParallelSize (GPUs per engine replica)",
                    ".roles.rollout.tensorParallelSize",
                ),
                cel(
                    f"!has(self.runtime.logging) || self.runtime.logging.port != {MASTER_PORT}",
                    RENDEZVOUS_PORT_CLASH,
                    ".runtime.logging.port",
                ),
                cel(
                    "self.placement != 'disaggregated' || !has(self.roles) || !has(self.roles.rollout) || "
                    "self.roles.rollout.replicas == 0 || !has(self.runtime.logging) || "
                    "self.runtime.logging.port - 1 + (self.roles.rollout.gpus >= self.roles.rollout.tensorParallelSize ? "
                    f"self.roles.rollout.gpus / self.roles.rollout.tensorParallelSize : 1) <= {MAX_PORT}",
                    ENGINE_PORTS_OVERFLOW,
                    ".runtime.logging.port",
                ),
                cel(
                    "has(self.managedBy) == has(oldSelf.managedBy) && (!has(self.managedBy) || self.managedBy == oldSelf.managedBy)",
                    "field is immutable",
                    ".managedBy",
                ),
            ]
        }
    }

    placement: Literal["colocated", "disaggregated"] = Field(
        "colocated",
        description="colocated: each trainer GPU also generates (hybrid engine). "
        "disaggregated: rollout pods generate and receive weights over NCCL.",
    )
    image: str = Field(DEFAULT_IMAGE, description="Default container image of every role.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy of every container."
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secret names for pulling images.")
    service_account_name: str | None = Field(None, description="ServiceAccount of the pods.")
    roles: Roles = Field(default_factory=Roles, description="Pods per role.")
    volumes: list[Obj] = Field(
        default_factory=list,
        description="Volumes added to every pod (models, data), Kubernetes Volume entries.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    volume_mounts: list[Obj] = Field(
        default_factory=list,
        description="Mounts added to every container, Kubernetes VolumeMount entries.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    env: list[Obj] = Field(
        default_factory=list,
        description="Environment variables added to every container, Kubernetes EnvVar entries.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, clean-up, scheduling.")
    suspend: bool = Field(
        False, description="Suspend the job: its pods are deleted, status and checkpoints kept; false resumes it."
    )
    managed_by: str | None = Field(
        None,
        max_length=63,
        description="Controller that reconciles this job. Unset or kuberl.io/operator: kuberl. Immutable.",
    )
    runtime: RuntimeConfig = Field(description="What the runtime runs: model, data, algorithm, reward, ...")

    @model_validator(mode="after")
    def _cross_field(self) -> RLJobSpec:
        rollout = self.roles.rollout
        if self.placement == "colocated" and rollout is not None and rollout.replicas:
            raise ValueError(
                "roles.rollout.replicas: must be 0 when placement is colocated (the trainer pods generate)"
            )
        if self.placement == "disaggregated" and (rollout is None or rollout.replicas < 1):
            raise ValueError("roles.rollout.replicas: must be at least 1 when placement is disaggregated")
        if self.roles.critic is not None and self.roles.critic.replicas and self.runtime.algorithm.name != "ppo":
            raise ValueError("roles.critic: needs runtime.algorithm.name ppo (only PPO trains a critic)")
        if self.roles.critic is not None and self.roles.critic.replicas > 1:
            raise ValueError(
                "roles.critic.replicas: must be at most 1: the critic's optimizer state lives in one pod (a critic "
                f"over several pods is not supported yet), got {self.roles.critic.replicas}"
            )
        tp = self.runtime.rollout.tensor_parallel_size
        gen_role = rollout if self.placement == "disaggregated" else self.roles.trainer
        if gen_role is not None and gen_role.gpus and gen_role.gpus % tp:
            gen = "rollout" if self.placement == "disaggregated" else "trainer"
            raise ValueError(
                f"runtime.rollout.tensorParallelSize: must divide roles.{gen}.gpus ({gen_role.gpus}), got {tp}"
            )
        if self.placement == "disaggregated" and rollout.tensor_parallel_size != tp:
            # Each rollout pod runs gpus / tensorParallelSize engine replicas of tp GPUs each.
            raise ValueError(
                "roles.rollout.tensorParallelSize: must equal runtime.rollout.tensorParallelSize (GPUs per engine "
                f"replica), got {rollout.tensor_parallel_size} and runtime.rollout.tensorParallelSize {tp}"
            )
        port = self.runtime.logging.port
        if port == MASTER_PORT:
            raise ValueError(f"runtime.logging.port: {RENDEZVOUS_PORT_CLASH}")
        if self.placement == "disaggregated":
            engines = processes_per_pod("rollout", rollout.gpus, rollout.tensor_parallel_size)
            if port + engines - 1 > MAX_PORT:
                raise ValueError(
                    f"runtime.logging.port: {ENGINE_PORTS_OVERFLOW}; got {port} with {engines} engine replicas per "
                    f"pod, so at most {MAX_PORT + 1 - engines}"
                )
        if self.roles.trainer.replicas < 1:  # before check_world, which divides by the trainer ranks
            raise ValueError("roles.trainer.replicas: must be at least 1 (trainer rank 0 drives the job)")
        try:
            self.runtime.check_world(self.roles.trainer.replicas * max(self.roles.trainer.gpus, 1))
        except ValueError as e:
            raise ValueError(f"runtime.{e}") from None
        return self


# ------------------------------------------------------------------------------------------ status

Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class Condition(Model):
    """One observation of the job's state (Kubernetes API conventions)."""

    type: str = Field(description="Valid, Admitted, Suspended, PodsReady, Running, Restarting, ReplicaFailure, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason constant.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation this condition describes.")


class RoleStatus(Model):
    """Pods of one role."""

    ready: int = Field(0, description="Pods of the role that are Running and ready.")
    total: int = Field(0, description="Pods the role should have.")


class FailureInfo(Model):
    """The first failing pod of the last failure."""

    role: str = Field(description="Role of the pod.")
    pod: str = Field(description="Pod name.")
    container: str | None = Field(None, description="Container that terminated.")
    exit_code: int | None = Field(None, description="Its exit code.")
    reason: str = Field(description="OOMKilled, Evicted, Error, NodeLost, ...")
    message: str = Field("", description="Its message.")
    node: str | None = Field(None, description="Node the pod ran on.")
    retryable: bool = Field(True, description="Whether this failure class allows a gang restart.")


class ProgressStatus(Model):
    """Mirrored from trainer rank 0's progress endpoint."""

    step: int = Field(0, description="RL steps completed.")
    total_steps: int = Field(0, description="RL steps the job runs.")
    reward_mean: str | None = Field(None, description="Mean reward of the last step (decimal string).")
    kl: str | None = Field(None, description="Mean KL to the reference model (decimal string).")
    tokens_per_second: str | None = Field(None, description="Generated tokens per second (decimal string).")
    weights_version: int = Field(0, description="Weights version of the rollout engine.")
    last_checkpoint_step: int | None = Field(None, description="Step of the latest complete checkpoint.")
    resumed_from_step: int | None = Field(None, description="Step the current run resumed from.")
    updated_at: str | None = Field(
        None, description="When these fields last changed, as the operator saw it (RFC 3339); a read with nothing new "
        "leaves it. Far older than a step takes while Running: the trainer is stuck.")


class RLJobStatus(Model):
    """Observed state of the job, written by the operator."""

    phase: Phase = Field("Pending", description="Pending, Running, Restarting, Suspended, Succeeded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Latest observations of the job's state.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(None, description="metadata.generation the status describes.")
    roles: dict[str, RoleStatus] = Field(default_factory=dict, description="Ready/total pods per role.")
    restarts: int = Field(0, description="Gang restarts so far.")
    start_time: str | None = Field(None, description="When the job started, or last resumed (RFC 3339).")
    completion_time: str | None = Field(None, description="When it succeeded or failed (RFC 3339).")
    last_restart_time: str | None = Field(None, description="When the gang last restarted (RFC 3339).")
    failure: FailureInfo | None = Field(None, description="The first failing pod of the last failure.")
    progress: ProgressStatus | None = Field(None, description="Training progress from trainer rank 0.")


# ---------------------------------------------------------------------------------------- helpers


class SpecError(ValueError):
    """A spec that fails validation; `errors` are (field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in errors))


def _path(loc: tuple[Any, ...], prefix: str) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The YAML names allowed in the object that `loc` (a pydantic error location) points into."""
    model: Any = RLJobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if f is None:
            return []
        inner = [a for a in (f.annotation, *typing.get_args(f.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return [f.alias or n for n, f in model.model_fields.items()]


# A validator's message may start with the field it is about, relative to the object it checks
# ("roles.rollout.replicas: must be 0 ..."); parse_spec moves that into the reported path.
_LEADING_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*): (.+)$", re.S)


def _split_field(path: str, msg: str) -> tuple[str, str]:
    m = _LEADING_FIELD.match(msg)
    if m is None:
        return path, msg
    return (f"{path}.{m.group(1)}" if path else m.group(1)), m.group(2)


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(tuple(err["loc"]))
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        msg = "unknown field" + (f"; did you mean {close[0]}?" if close else "")
        if allowed:
            msg += f" (allowed: {', '.join(allowed)})"
    elif err["type"] == "literal_error":
        msg = f"must be one of {err['ctx']['expected']}"
    return msg


def parse_spec(spec: Obj, prefix: str = "spec") -> RLJobSpec:
    """Validate a spec dict; raise SpecError whose messages name the field path."""
    try:
        return RLJobSpec.model_validate(spec)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            loc = tuple(str(x) if not isinstance(x, int) else x for x in err["loc"])
            errors.append(_split_field(_path(loc, prefix), _message(err)))
        raise SpecError(errors) from None


def parse_job(obj: Obj) -> RLJobSpec:
    """Validate a whole RLJob manifest (apiVersion, kind, metadata.name, spec)."""
    errors: list[tuple[str, str]] = []
    if obj.get("apiVersion") != API_VERSION:
        errors.append(("apiVersion", f"must be {API_VERSION}"))
    if obj.get("kind") != KIND:
        errors.append(("kind", f"must be {KIND}"))
    name = (obj.get("metadata") or {}).get("name")
    if not name:
        errors.append(("metadata.name", "is required"))
    elif not _valid_job_name(name):
        errors.append(
            ("metadata.name", "must be a DNS-1035 label of at most 40 characters (pod names append -<role>-<index>)")
        )
    if not isinstance(obj.get("spec"), dict):
        errors.append(("spec", "is required"))
        raise SpecError(errors)
    try:
        spec = parse_spec(obj["spec"])
    except SpecError as e:
        errors.extend(e.errors)
        raise SpecError(errors) from None
    if errors:
        raise SpecError(errors)
    return spec


MAX_JOB_NAME = 40


def _valid_job_name(name: str) -> bool:
    return len(name) <= MAX_JOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None
