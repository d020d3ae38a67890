"""The contract between the operator and the runtime: environment, exit codes, progress document.

The operator writes these environment variables into every pod, reads the exit codes of failed
containers to choose between retrying and failing, and mirrors the progress document that trainer
rank 0 serves at `GET /progress` into `status.progress` (and, once trainer rank 0 has exited, the
final one from its termination message: `parse_termination_message`). This module imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# ----------------------------------------------------------------------------------- environment
ENV_CONFIG = "KUBERL_CONFIG"  # path of the rendered RuntimeConfig YAML
ENV_JOB = "KUBERL_JOB"  # RLJob name
ENV_NAMESPACE = "KUBERL_NAMESPACE"
ENV_ROLE = "KUBERL_ROLE"  # trainer | rollout | critic | reference | reward
ENV_ROLE_RANK = "KUBERL_ROLE_RANK"  # replica index within the role
ENV_ROLE_REPLICAS = "KUBERL_ROLE_REPLICAS"
ENV_RANK = "KUBERL_RANK"  # job-wide rank of this pod's first process (trainers first, then other roles)
ENV_LOCAL_WORLD_SIZE = "KUBERL_LOCAL_WORLD_SIZE"  # processes this pod starts: one per GPU for trainers,
# one per engine replica (gpus / tensorParallelSize) for rollout pods: `processes_per_pod`
ENV_WORLD_SIZE = "KUBERL_WORLD_SIZE"  # processes in the job-wide group
ENV_TRAINER_WORLD_SIZE = "KUBERL_TRAINER_WORLD_SIZE"  # trainer processes (replicas x GPUs per pod)
ENV_ROLLOUT_REPLICAS = "KUBERL_ROLLOUT_REPLICAS"  # rollout engine replicas of the job (pods x engines per pod)
# Pods of the roles that run as servers beside the trainer (0: colocated in the trainer pods).
ENV_CRITIC_REPLICAS = "KUBERL_CRITIC_REPLICAS"
ENV_REFERENCE_REPLICAS = "KUBERL_REFERENCE_REPLICAS"
ENV_REWARD_REPLICAS = "KUBERL_REWARD_REPLICAS"
ENV_MASTER_ADDR = "KUBERL_MASTER_ADDR"  # trainer rank 0's stable DNS name (headless Service)
ENV_MASTER_PORT = "KUBERL_MASTER_PORT"  # TCPStore / rendezvous port on trainer rank 0
ENV_PLACEMENT = "KUBERL_PLACEMENT"  # colocated | disaggregated
ENV_GPUS = "KUBERL_GPUS"  # GPUs of this pod
ENV_RESTART = "KUBERL_RESTART"  # gang restart count (0 on first start)
ENV_POD_IP = "KUBERL_POD_IP"  # from the downward API: where this pod's servers can be reached
ENV_RENDEZVOUS_TIMEOUT = "KUBERL_RENDEZVOUS_TIMEOUT"  # seconds to wait for every peer
ENV_COLLECTIVE_TIMEOUT = "KUBERL_COLLECTIVE_TIMEOUT"  # seconds a collective waits for its peers (at least
# the rendezvous timeout: `distributed.collective_timeout`); set it through spec.env
ENV_HTTP_PORT = "KUBERL_HTTP_PORT"  # overrides logging.port (local runs, the e2e pod runner; 0: any free port)
ENV_TERMINATION_LOG = "KUBERL_TERMINATION_LOG"  # overrides /dev/termination-log (tests, a pod's child processes)

MASTER_PORT = 29500
RENDEZVOUS_TIMEOUT_S = 600
# torch's default for the groups new_group makes on "gloo" and on "cpu:gloo,cuda:nccl" (30 min on both legs;
# its 10 min is for a plain "nccl" backend only). Colocated generation is not bounded by anything shorter:
# trainer ranks whose completions ended early wait in the next collective for the rank still generating.
COLLECTIVE_TIMEOUT_S = 1800

# ------------------------------------------------------------------------------------ exit codes
# sysexits(3) numbers: distinct from Python's 1 and from the kernel's 128+signal codes.
EXIT_OK = 0
EXIT_DATA_ERROR = 65  # EX_DATAERR: NaN/inf loss, unusable data; retrying repeats it
EXIT_OUT_OF_MEMORY = 71  # EX_OSERR: GPU or host memory ran out; retried (a restart frees memory)
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: a peer vanished or never arrived (rendezvous/NCCL timeout)
EXIT_CONFIG_ERROR = 78  # EX_CONFIG: bad config, missing model/data path, bad reward function
NON_RETRYABLE_EXIT_CODES = frozenset({EXIT_CONFIG_ERROR, EXIT_DATA_ERROR})

Role = Literal["trainer", "rollout", "critic", "reference", "reward"]
ROLES: tuple[Role, ...] = ("trainer", "rollout", "critic", "reference", "reward")


def processes_per_pod(role: str, gpus: int, tensor_parallel_size: int = 1) -> int:
    """Processes one pod of `role` starts. Trainer pods: one per GPU (FSDP ranks). Rollout pods: one
    engine replica per `tensor_parallel_size` GPUs (data parallel over the pod's GPUs, as verl lays
    out its rollout workers). Every other role, and every pod without GPUs: one."""
    if role == "trainer":
        return max(gpus, 1)
    if role == "rollout" and gpus > 0:
        return max(gpus // max(tensor_parallel_size, 1), 1)
    return 1


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the job, read from the environment the operator injected."""

    role: Role = "trainer"
    role_rank: int = 0
    role_replicas: int = 1
    rank: int = 0
    local_world_size: int = 1
    world_size: int = 1
    trainer_world_size: int = 1
    rollout_replicas: int = 0
    critic_replicas: int = 0
    reference_replicas: int = 0
    reward_replicas: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = MASTER_PORT
    placement: Literal["colocated", "disaggregated"] = "colocated"
    restart: int = 0
    pod_ip: str = "127.0.0.1"
    rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S
    collective_timeout_s: int = COLLECTIVE_TIMEOUT_S  # as set; the groups use distributed.collective_timeout

    def replicas_of(self, role: Role) -> int:
        """Processes of a server role: rollout engine replicas (gpus / tensorParallelSize per pod), or
        critic, reference or reward pods (one process each)."""
        return getattr(self, f"{role}_replicas")

    def first_rank_of(self, role: Role) -> int:
        """Job-wide rank of `role`'s replica 0: trainers first, then rollout, critic, reference, reward."""
        rank = self.trainer_world_size
        for r in ROLES[1:]:
            if r == role:
                return rank
            rank += self.replicas_of(r)
        raise ValueError(f"{role!r} is not a server role")

    @property
    def rollout_rank_base(self) -> int:
        """Rollout rank of this pod's first engine replica (rollout ranks count engine replicas)."""
        return self.role_rank * self.local_world_size

    @property
    def is_driver(self) -> bool:
        """Trainer rank 0 drives the loop: it owns the data, the store and the progress endpoint."""
        return self.role == "trainer" and self.role_rank == 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Topology:
        e = os.environ if env is None else env
        role = e.get(ENV_ROLE, "trainer")
        if role not in ROLES:
            raise ValueError(f"{ENV_ROLE}={role!r} is not one of {', '.join(ROLES)}")

        def num(name: str, default: int) -> int:
            raw = e.get(name)
            try:
                return default if raw in (None, "") else int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None

        def positive(name: str, default: int) -> int:
            value = num(name, default)
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1 (seconds)")
            return value

        return cls(
            role=role,  # type: ignore[arg-type]
            role_rank=num(ENV_ROLE_RANK, 0),
            role_replicas=num(ENV_ROLE_REPLICAS, 1),
            rank=num(ENV_RANK, 0),
            local_world_size=num(ENV_LOCAL_WORLD_SIZE, 1),
            world_size=num(ENV_WORLD_SIZE, 1),
            trainer_world_size=num(ENV_TRAINER_WORLD_SIZE, 1),
            rollout_replicas=num(ENV_ROLLOUT_REPLICAS, 0),
            critic_replicas=num(ENV_CRITIC_REPLICAS, 0),
            reference_replicas=num(ENV_REFERENCE_REPLICAS, 0),
            reward_replicas=num(ENV_REWARD_REPLICAS, 0),
            master_addr=e.get(ENV_MASTER_ADDR, "127.0.0.1"),
            master_port=num(ENV_MASTER_PORT, MASTER_PORT),
            placement="disaggregated" if e.get(ENV_PLACEMENT) == "disaggregated" else "colocated",
            restart=num(ENV_RESTART, 0),
            pod_ip=e.get(ENV_POD_IP, "127.0.0.1"),
            rendezvous_timeout_s=num(ENV_RENDEZVOUS_TIMEOUT, RENDEZVOUS_TIMEOUT_S),
            collective_timeout_s=positive(ENV_COLLECTIVE_TIMEOUT, COLLECTIVE_TIMEOUT_S),
        )


# ------------------------------------------------------------------------------ progress document


class _Doc(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class TimeSplit(_Doc):
    generate: float = Field(0.0, description="Seconds spent generating in the last step.")
    score: float = Field(0.0, description="Seconds spent on rewards, reference and critic in the last step.")
    train: float = Field(0.0, description="Seconds spent in the policy/critic update in the last step.")
    sync: float = Field(0.0, description="Seconds spent moving weights to the rollout engine in the last step.")


class Progress(_Doc):
    """What a trainer pod serves at GET /progress; the operator mirrors trainer rank 0's into status.progress."""

    state: Literal["starting", "running", "succeeded", "failed"] = "starting"
    step: int = Field(0, description="RL steps completed.")
    total_steps: int = Field(0, description="RL steps the job runs.")
    reward_mean: float | None = Field(None, description="Mean reward of the last step's completions.")
    reward_std: float | None = Field(None, description="Std of the last step's rewards.")
    kl: float | None = Field(None, description="Mean KL to the reference model in the last step.")
    entropy: float | None = Field(None, description="Mean token entropy of the policy in the last step.")
    response_length: float | None = Field(None, description="Mean completion length in tokens.")
    tokens_per_second: float | None = Field(None, description="Generated tokens per second of wall time.")
    weights_version: int = Field(0, description="Version of the weights the rollout engine runs.")
    last_checkpoint_step: int | None = Field(None, description="Step of the latest complete checkpoint.")
    resumed_from_step: int | None = Field(None, description="Step the run resumed from after a restart.")
    time: TimeSplit = Field(default_factory=TimeSplit)
    message: str | None = Field(None, description="Why the run failed, naming the config field to change.")
    rank: int = Field(0, description="Job-wide rank of the trainer process serving this document (0: the driver, "
                      "whose document the operator mirrors; every trainer pod serves its own).")


# --------------------------------------------------------------------------- termination message
# Every trainer process writes one when it exits, success included (the operator polls /progress
# only while the pod runs, so the last steps would be lost otherwise):
#
#     kuberl-progress: {"state":"succeeded","step":150,"totalSteps":150,...}
#     succeeded at step 150 of 150
#
# line 1: the prefix and the final Progress document as compact camelCase JSON (None fields and
# `message` left out); then the human message (errors.describe(exc) on failure). Within Kubernetes'
# 4096-byte limit, the human message last (the operator shows a message's last 1024 characters).
# A message without the first line (a crash that wrote nothing: the kubelet falls back to the log's
# tail) parses to (None, text).
TERMINATION_PROGRESS_PREFIX = "kuberl-progress: "
TERMINATION_MESSAGE_BYTES = 4096  # Kubernetes keeps at most this much of a termination message


def format_termination_message(message: str, progress: Progress | None = None) -> str:
    """The termination message: the final progress document (when given), then `message`."""
    head = ""
    if progress is not None:
        head = TERMINATION_PROGRESS_PREFIX + progress.model_dump_json(by_alias=True, exclude_none=True,
                                                                      exclude={"message"}) + "\n"
    room = TERMINATION_MESSAGE_BYTES - len(head.encode())
    body = message.strip().encode()
    if len(body) > room:
        body = body[: max(room - 3, 0)].decode(errors="ignore").encode() + b"..."
    return head + body.decode()


def parse_termination_message(text: str | None) -> tuple[Progress | None, str]:
    """(final Progress or None, human message) of a container's termination message.

    The failure message goes into `Progress.message` when the document says the run failed."""
    text = (text or "").strip()
    first, _, rest = text.partition("\n")
    if not first.startswith(TERMINATION_PROGRESS_PREFIX):
        return None, text
    try:
        progress = Progress.model_validate_json(first[len(TERMINATION_PROGRESS_PREFIX):])
    except ValueError:  # pydantic's ValidationError is a ValueError
        return None, text
    message = rest.strip()
    if progress.state == "failed" and message:
        progress.message = message
    return progress, message
