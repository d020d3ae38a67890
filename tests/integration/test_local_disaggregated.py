"""`kuberl local` runs a disaggregated job as local processes: 2 trainer ranks (DDP on gloo) + rollout ranks.

After every weight sync each rollout's parameters hash the same as the trainer's, tensor by tensor
(KUBERL_SYNC_DIGEST_DIR); a rollout killed mid-run fails the job fast, naming it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from local_jobs import Captured, operator_env, read_metrics, tiny_runtime

pytestmark = pytest.mark.integration


def job(tmp_path: Path, *, rollouts: int, steps: int) -> dict:
    return {
        "apiVersion": "kuberl.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "tiny-disaggregated"},
        "spec": {
            "placement": "disaggregated",
            "roles": {"trainer": {"replicas": 2, "gpus": 0}, "rollout": {"replicas": rollouts, "gpus": 0}},
            "runtime": tiny_runtime(
                algorithm={"name": "grpo", "samplesPerPrompt": 4},
                rollout={"maxNewTokens": 4},
                training={"totalSteps": steps, "globalBatchSize": 4, "microBatchSize": 4, "lr": 1.0e-3},
                checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 1000, "resume": False},
            ),
        },
    }


def read_digests(d: Path, who: str, version: int) -> dict:
    return json.loads((d / f"{who}-v{version}.json").read_text())


def test_a_killed_rollout_fails_the_job_fast_naming_it(tmp_path, monkeypatch):
    from kuberl_runtime.launch import run_local_processes

    digests = tmp_path / "digests"
    monkeypatch.setenv("KUBERL_SYNC_DIGEST_DIR", str(digests))

    def kill_rollout_1() -> None:
        target = digests / "rollout-1-v2.json"
        deadline = time.monotonic() + 180
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(json.loads(target.read_text())["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rollout_1, daemon=True)
    killer.start()
    out = Captured()
    code = run_local_processes(job(tmp_path, rollouts=2, steps=1000), out=out)
    killer.join(timeout=5)
    text = out.text
    assert code == 128 + signal.SIGKILL, text  # the first failure's code: killed by signal 9
    assert "rollout rank 1 (pid" in text and "was killed by SIGKILL" in text, text
    # The trainer noticed by itself (before the launcher stopped it) and named the lost peer.
    assert "PeerLost" in text and "peer: rollout rank 1" in text, text
    assert not (digests / "trainer-v50.json").exists()  # it stopped at once, not at the end


CONTRACT_KEYS = ("KUBERL_ROLE", "KUBERL_ROLE_RANK", "KUBERL_ROLE_REPLICAS", "KUBERL_RANK", "KUBERL_LOCAL_WORLD_SIZE",
                 "KUBERL_WORLD_SIZE", "KUBERL_TRAINER_WORLD_SIZE", "KUBERL_ROLLOUT_REPLICAS", "KUBERL_PLACEMENT",
                 "KUBERL_GPUS")


VLLM_TP2 = {"engine": "vllm", "tensorParallelSize": 2}


@pytest.mark.parametrize(
    "roles, rollout",
    [
        ({"trainer": {"replicas": 2, "gpus": 0}, "rollout": {"replicas": 2, "gpus": 0}}, {}),
        ({"trainer": {"replicas": 2, "gpus": 4}, "rollout": {"replicas": 3, "gpus": 2, "tensorParallelSize": 2}},
         VLLM_TP2),
        ({"trainer": {"replicas": 1, "gpus": 8}, "rollout": {"replicas": 1, "gpus": 1}}, {}),
        # Several engine replicas per rollout pod: 4 one-GPU builtin engines; 2 vLLM engines of 2 GPUs.
        ({"trainer": {"replicas": 2, "gpus": 0}, "rollout": {"replicas": 2, "gpus": 4}}, {}),
        ({"trainer": {"replicas": 1, "gpus": 2}, "rollout": {"replicas": 2, "gpus": 4, "tensorParallelSize": 2}},
         VLLM_TP2),
    ],
)
def test_local_processes_get_the_env_the_operator_injects(tmp_path, roles, rollout):
    """kuberl local's process env == the operator's build_env, pod by pod (trainer and rollout pods
    with several processes: per process)."""
    from kuberl_runtime.launch import plan_processes

    doc = job(tmp_path, rollouts=1, steps=1)
    doc["spec"]["roles"] = roles
    doc["spec"]["runtime"]["rollout"].update(rollout)
    doc["spec"]["runtime"]["training"].update(globalBatchSize=16, microBatchSize=1)  # splits over 8 trainer ranks
    procs = plan_processes(doc, "config.yaml", master_port=29500, gpu_count=0)
    assert [{k: p.env[k] for k in CONTRACT_KEYS} for p in procs] == operator_env(doc, CONTRACT_KEYS)
    # Local processes of one pod differ only by LOCAL_RANK, as in the pod (KUBERL_RANK + local rank).
    assert [int(p.env["KUBERL_RANK"]) + int(p.env["LOCAL_RANK"]) for p in procs] == list(range(len(procs)))
    # Rollout ranks count engine replicas: the launcher names them as the trainer's errors do.
    rollout_names = [p.name for p in procs if p.role == "rollout"]
    assert rollout_names == [f"rollout rank {i}" for i in range(len(rollout_names))]
    assert len(rollout_names) == int(procs[0].env["KUBERL_ROLLOUT_REPLICAS"])


def test_disaggregated_training_equals_colocated(tmp_path):
    """2 trainer ranks + 1 rollout process learn exactly what 2 colocated trainer ranks learn:
    the same samples (the replica samples with the caller's seed), the same updates, bit for bit."""
    from kuberl_runtime.launch import run_local_processes

    metrics = {}
    for placement in ("disaggregated", "colocated"):
        doc = job(tmp_path / placement, rollouts=1, steps=3)
        if placement == "colocated":
            doc["spec"]["placement"] = "colocated"
            del doc["spec"]["roles"]["rollout"]
        path = tmp_path / f"{placement}.jsonl"
        out = Captured()
        assert run_local_processes(doc, metrics_file=str(path), out=out) == 0, out.text
        metrics[placement] = read_metrics(path)
    assert [m["step"] for m in metrics["colocated"]] == [1, 2, 3]
    assert metrics["disaggregated"] == metrics["colocated"]


@pytest.mark.parametrize(
    "gpu_count, rollout, visible",
    [
        (8, VLLM_TP2, ["0", "1,2", "3,4"]),  # trainer GPU 0, then 2 engines of 2 GPUs each
        (8, {}, ["0", "1", "2", "3", "4"]),  # builtin engines: one GPU each
        (4, VLLM_TP2, ["", "", ""]),  # too few GPUs on this machine: everything on the CPU
    ],
)
def test_local_rollout_engines_see_their_own_gpus(tmp_path, gpu_count, rollout, visible):
    from kuberl_runtime.launch import plan_processes

    doc = job(tmp_path, rollouts=1, steps=1)
    tp = rollout.get("tensorParallelSize", 1)
    doc["spec"]["roles"] = {"trainer": {"replicas": 1, "gpus": 1}, "rollout": {"replicas": 1, "gpus": 4, "tensorParallelSize": tp}}
    doc["spec"]["runtime"]["rollout"].update(rollout)
    procs = plan_processes(doc, "config.yaml", master_port=29500, gpu_count=gpu_count)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in procs] == visible


def run_layout(tmp_path: Path, layout: str, steps: int) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    """`kuberl local` on the tiny job with its 2 rollout engine replicas laid out as one rollout pod
    with 2 GPUs (on this CPU machine: 2 engine processes) or as two CPU pods of one engine each."""
    rollout = {"replicas": 1, "gpus": 2} if layout == "one-pod-two-engines" else {"replicas": 2, "gpus": 0}
    doc = job(tmp_path / layout, rollouts=1, steps=steps)
    doc["spec"]["roles"]["rollout"] = rollout
    path, digests, metrics = tmp_path / f"{layout}.yaml", tmp_path / layout / "digests", tmp_path / f"{layout}.jsonl"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "kuberl_operator.cli", "local", str(path), "--metrics-file", str(metrics)],
        env={**os.environ, "KUBERL_SYNC_DIGEST_DIR": str(digests)},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, digests, read_metrics(metrics)


def test_kuberl_local_syncs_every_engine_replica_bit_exact_whatever_the_pod_layout(tmp_path):
    """Two rollout engine replicas, as one rollout pod of 2 GPUs (2 engine processes, rollout ranks
    0 and 1) and as two one-engine pods: after every sync each replica's parameters hash the same
    as the trainer's, tensor by tensor, and both layouts learn exactly the same (same ranks, seeds,
    samples and updates). With one replica, disaggregated equals colocated
    (test_disaggregated_training_equals_colocated); with two, replica 1 samples with its own seed,
    so what must not matter is how the replicas are packed into pods."""
    runs = {layout: run_layout(tmp_path, layout, steps=2) for layout in ("one-pod-two-engines", "two-pods")}
    for layout, (proc, digests, rows) in runs.items():
        assert "4 processes (2 trainer, 2 rollout)" in proc.stderr
        assert [r["step"] for r in rows] == [1, 2]
        trainer = [read_digests(digests, "trainer", v)["tensors"] for v in (1, 2)]
        assert trainer[0] and trainer[0] != trainer[1]  # training moved the weights each step
        for version in (1, 2):
            got = [read_digests(digests, f"rollout-{rank}", version) for rank in (0, 1)]
            assert [(g["version"], g["tensors"]) for g in got] == [(version, trainer[version - 1])] * 2, layout
            assert got[0]["pid"] != got[1]["pid"]  # two engine processes, not one answering twice
    assert "[rollout-1] kuberl rollout 1: weights version 2 loaded" in runs["one-pod-two-engines"][0].stderr
    assert runs["one-pod-two-engines"][2] == runs["two-pods"][2]
