"""A rollout pod of several engine replicas: one process per engine, ready when all of them are.

Local rank 0 serves the pod's /readyz (the readiness probe) and asks its siblings, whose addresses
it reads from the job's store (real TCPStore, real HTTP servers on 127.0.0.1, real engines); and
`kuberl-runtime` run as a rollout pod with 2 GPUs starts 2 engine processes that both take part
in every weight sync.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from kuberl_runtime.config import ModelConfig, ModelInit
from kuberl_runtime.contract import Topology
from kuberl_runtime.engines import HFRolloutEngine
from kuberl_runtime.models import build_policy
from kuberl_runtime.rollout_server import ADDRESS_KEY, RolloutServer, RolloutService, _sibling_addresses
from procs import free_port, stop_tree

pytestmark = pytest.mark.integration
VOCAB = 32


def make_engine() -> HFRolloutEngine:
    cfg = ModelConfig(init=ModelInit(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                                     vocab_size=VOCAB, seed=3), tokenizer="builtin:arithmetic")
    model = build_policy(cfg, VOCAB, torch.device("cpu"), torch.float32).eval().requires_grad_(False)
    return HFRolloutEngine(model, pad_token_id=0, eos_token_id=2, shares_module=False)


def readyz(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/readyz")
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    return resp.status, doc["reason"]


def test_the_pods_readiness_waits_for_every_engine_replica():
    # Rollout pod 1 of a job with 3 engine replicas per pod: rollout ranks 3, 4, 5 (local ranks 0, 1, 2).
    topo = Topology(role="rollout", role_rank=1, local_world_size=3, rank=5, world_size=8, trainer_world_size=2,
                    rollout_replicas=6, placement="disaggregated")
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=10))
    servers = []
    try:
        first = RolloutServer(RolloutService(make_engine(), siblings=_sibling_addresses(store, topo, 3)),
                              host="127.0.0.1").start()
        servers.append(first)
        assert readyz(first.port) == (503, "rollout rank 4 (local rank 1): engine loading")  # nothing published yet

        loading = RolloutServer(RolloutService(None), host="127.0.0.1").start()
        behind = RolloutServer(RolloutService(make_engine(), target_version=2), host="127.0.0.1").start()
        servers += [loading, behind]
        store.set(f"{ADDRESS_KEY}4", f"127.0.0.1:{loading.port}")
        store.set(f"{ADDRESS_KEY}5", f"127.0.0.1:{behind.port}")
        assert readyz(first.port) == (503, "rollout rank 4 (local rank 1): engine loading")

        loading.service.set_engine(make_engine(), VOCAB)
        assert readyz(first.port) == (
            503, "rollout rank 5 (local rank 2): holds weights version 0, trainer is at 2")
        behind.service.target_version = 0  # as if the sync had landed: every replica holds the current version
        assert readyz(first.port) == (200, "ready")

        # A sibling that vanished makes the pod unready, naming it.
        port = behind.port
        behind.close()
        servers.remove(behind)
        status, reason = readyz(first.port)
        assert status == 503 and reason.startswith(f"rollout rank 5 (local rank 2): not answering at 127.0.0.1:{port}")
        # The siblings answer only for themselves (no aggregation loop).
        assert readyz(loading.port) == (200, "ready")
    finally:
        for s in servers:
            s.close()


# ------------------------------------------------------------------ a rollout pod as kuberl-runtime

ENTRY = str(Path(sys.executable).parent / "kuberl-runtime")
REWARD = '''
import os, time
from pathlib import Path

def reward(prompt, completion, row):
    d = Path(os.environ["POD_TEST_DIR"])
    while not (d / "go").exists():  # the test looks at the pods while training waits here
        time.sleep(0.05)
    return float(len(completion) % 2)
'''


def pod(tmp: Path, role: str, *, index: int, rank: int, per_pod: int, gpus: int, master_port: int) -> tuple:
    """`kuberl-runtime` with the env build_env gives pod `index` of `role` (trainer pod: 1 process;
    one rollout pod of 2 engines): (Popen, HTTP port, termination log, output file)."""
    port, log, out = free_ports(per_pod), tmp / f"termination-{role}", tmp / f"{role}.log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERL_") and k not in ("LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    env.update({
        "KUBERL_CONFIG": str(tmp / "config.yaml"), "KUBERL_JOB": "rollout-pod", "KUBERL_NAMESPACE": "test",
        "KUBERL_ROLE": role, "KUBERL_ROLE_RANK": str(index), "KUBERL_ROLE_REPLICAS": "1", "KUBERL_RANK": str(rank),
        "KUBERL_LOCAL_WORLD_SIZE": str(per_pod), "KUBERL_WORLD_SIZE": "3", "KUBERL_TRAINER_WORLD_SIZE": "1",
        "KUBERL_ROLLOUT_REPLICAS": "2", "KUBERL_MASTER_ADDR": "127.0.0.1", "KUBERL_MASTER_PORT": str(master_port),
        "KUBERL_PLACEMENT": "disaggregated", "KUBERL_GPUS": str(gpus), "KUBERL_RESTART": "0",
        "KUBERL_POD_IP": "127.0.0.1", "KUBERL_RENDEZVOUS_TIMEOUT": "60", "KUBERL_HTTP_PORT": str(port),
        "KUBERL_TERMINATION_LOG": str(log), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "POD_TEST_DIR": str(tmp),
        "KUBERL_SYNC_DIGEST_DIR": str(tmp / "digests"),
    })
    with open(out, "wb") as f:
        proc = subprocess.Popen([ENTRY], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, port, log, out


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free (engine i of a pod serves on the pod's port + i)."""
    while True:
        p = free_port()
        if p + n <= 65536 and all(_free(p + i) for i in range(1, n)):
            return p


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.mark.timeout(180)
def test_a_rollout_pod_with_two_gpus_runs_two_engine_replicas(tmp_path):
    """KUBERL_ROLE=rollout, KUBERL_GPUS=2, KUBERL_LOCAL_WORLD_SIZE=2 (builtin engine, tp 1): the pod's
    kuberl-runtime starts two engine processes (rollout ranks 0, 1), each its own GPU (CUDA_VISIBLE_DEVICES
    0 and 1; none exist here, so both run on the CPU), both receive every weight sync, the pod answers
    /readyz for both, and it exits 0 when the trainer is done."""
    (tmp_path / "podreward.py").write_text(REWARD)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model": {"init": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "numKvHeads": 1, "intermediateSize": 32},
                  "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 4, "numExamples": 64}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 4},
        "rollout": {"maxNewTokens": 2},
        "training": {"totalSteps": 2, "globalBatchSize": 2, "microBatchSize": 8, "lr": 1e-2},
        "reward": {"function": "podreward:reward", "pythonPath": [str(tmp_path)]},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 100},
    }))
    master = free_port()
    pods = [pod(tmp_path, "trainer", index=0, rank=0, per_pod=1, gpus=0, master_port=master),
            pod(tmp_path, "rollout", index=0, rank=1, per_pod=2, gpus=2, master_port=master)]
    try:
        # Training holds in the reward of step 1: both engines are up and hold version 0, the current one.
        deadline = time.monotonic() + 120
        while get(pods[1][1], "/readyz") != 200:
            exited = [p for p, *_ in pods if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                pytest.fail("the rollout pod never became ready:\n" + "\n".join(o.read_text()[-3000:] for *_, o in pods))
            time.sleep(0.1)
        assert get(pods[1][1] + 1, "/readyz") == 200  # engine 1 serves on the pod's port + 1
        (tmp_path / "go").touch()
        codes = [p.wait(timeout=120) for p, *_ in pods]
    finally:
        for p, *_ in pods:
            stop_tree(p)  # the rollout pod's two engine processes too, when the test failed mid-way
    output = pods[1][3].read_text()
    assert codes == [0, 0], "\n".join(o.read_text()[-3000:] for *_, o in pods)
    assert "kuberl-runtime: starting 2 rollout processes (ranks 1..2)" in output
    for rank in (0, 1):
        assert f"kuberl rollout {rank}: weights version 2 loaded" in output
    digests = [json.loads((tmp_path / "digests" / f"rollout-{r}-v2.json").read_text()) for r in (0, 1)]
    trainer = json.loads((tmp_path / "digests" / "trainer-v2.json").read_text())
    assert digests[0]["tensors"] == digests[1]["tensors"] == trainer["tensors"]
    assert digests[0]["pid"] != digests[1]["pid"]
