"""The GRPO recipe on two real gloo trainer ranks (DDP on CPU): each rank generates for its own
prompts, the replicas stay bit-identical, metrics are all-reduced (the same on both ranks), the
data position advances by the global batch on both, and the two write one checkpoint together.
(test_multirank.py checks the engine's exactness: 2 ranks x 4 sequences == 1 rank x 8.)
"""

from __future__ import annotations

import pytest
import torch

from procs import job_env, run_ranks, values

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def worker(env):
    from kuberl_runtime.config import RuntimeConfig
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.recipes import Job
    from kuberl_runtime.recipes.grpo import grpo

    topo = Topology.from_env(env)
    groups = rendezvous(topo)

    cfg = RuntimeConfig.model_validate({
        "model": {"init": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "numKvHeads": 1, "intermediateSize": 32},
                  "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 4, "numExamples": 64}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 4},
        "rollout": {"maxNewTokens": 3},
        "training": {"totalSteps": 2, "globalBatchSize": 4, "microBatchSize": 4, "lr": 1e-2},
        "checkpoint": {"dir": env["CKPT_DIR"], "interval": 2},
    })
    job = Job.build(cfg, topo, group=groups.trainer)
    engines = []
    build_engine = job.train_engine
    job.train_engine = lambda model, lr: engines.append(build_engine(model, lr=lr)) or engines[-1]  # keep a handle
    grpo(job)
    params = torch.cat([p.detach().flatten() for p in engines[0].module.parameters()])
    groups.close()
    return {"metrics": job.last_metrics, "params": params, "rows_seen": job.order.state_dict()}


def test_two_gloo_ranks(tmp_path):
    envs = [{**e, "CKPT_DIR": str(tmp_path / "ckpt")} for e in job_env(trainers=2, rollouts=0)]
    r0, r1 = values(run_ranks(worker, envs, timeout=240))
    assert r0["metrics"] == r1["metrics"] and "reward/mean" in r0["metrics"]
    assert torch.equal(r0["params"], r1["params"])  # DDP kept the replicas identical
    assert r0["rows_seen"] == r1["rows_seen"] == {"epoch": 0, "index": 8}  # 2 steps x 4 prompts, shared order
    assert (tmp_path / "ckpt" / "step-000002" / "COMPLETE").exists()
