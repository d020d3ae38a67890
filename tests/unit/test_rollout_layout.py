"""How many processes a pod starts and which GPUs each rollout engine process sees (pure functions)."""

import pytest

from kuberl_runtime.contract import processes_per_pod
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.main import engine_devices


@pytest.mark.parametrize(
    "role, gpus, tp, expected",
    [
        ("trainer", 8, 1, 8),  # one FSDP rank per GPU
        ("trainer", 0, 1, 1),
        ("rollout", 8, 2, 4),  # data parallel engine replicas of tp GPUs each
        ("rollout", 8, 1, 8),
        ("rollout", 8, 8, 1),
        ("rollout", 0, 1, 1),  # CPU rollout pod: one engine process
        ("critic", 4, 1, 1),  # server roles: one process per pod
        ("reference", 2, 2, 1),
    ],
)
def test_processes_per_pod(role, gpus, tp, expected):
    assert processes_per_pod(role, gpus, tp) == expected


@pytest.mark.parametrize(
    "env, local, per_pod, expected",
    [
        ({"KUBERL_GPUS": "8"}, 0, 4, "0,1"),  # no CUDA_VISIBLE_DEVICES: the container's GPUs 0..G-1
        ({"KUBERL_GPUS": "8"}, 3, 4, "6,7"),
        ({"KUBERL_GPUS": "2"}, 1, 2, "1"),
        ({"KUBERL_GPUS": "4", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 1, 2, "6,7"),  # a slice of what the pod sees
        ({"KUBERL_GPUS": "2", "CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}, 1, 2, "GPU-b"),  # UUIDs too
        ({"KUBERL_GPUS": "2", "CUDA_VISIBLE_DEVICES": ""}, 0, 2, ""),  # a CPU-only launch stays on the CPU
    ],
)
def test_engine_devices(env, local, per_pod, expected):
    assert engine_devices(local, per_pod, env) == expected


def test_fewer_gpus_than_engines_is_a_config_error_not_a_cpu_run():
    with pytest.raises(ConfigError, match="sees 2 GPUs .* runs 4 engine processes") as e:
        engine_devices(0, 4, {"KUBERL_GPUS": "8", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert e.value.field == "roles.rollout.gpus"
