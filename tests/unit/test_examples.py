"""The YAML users copy: examples/*.yaml and the RLJob in README.md validate and plan as they claim.

Each example's header comment promises a shape (CPU only, one 8-GPU node colocated, PPO across
nodes with tensor-parallel rollout); the tests hold the rendered pods to those promises.
"""

import re
from pathlib import Path

import pytest
import yaml

from kuberl_operator import labels
from kuberl_operator.api import parse_job
from kuberl_operator.planner import plan

from factories import observe

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def pods_of(doc: dict) -> list[dict]:
    job = {**doc, "metadata": {**doc["metadata"], "namespace": "ns", "uid": "u", "generation": 1}, "status": {}}
    return plan(job, observe()).create_pods


def env(pod: dict) -> dict:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_and_plans(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and path.read_text().startswith("#"), f"{path.name}: start with a comment saying what it shows"
    for doc in docs:
        parse_job(doc)
        assert pods_of(doc), f"{path.name}: no pods planned"


def test_readme_rljob_validates():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    jobs = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and d.get("kind") == "RLJob"]
    assert jobs
    for job in jobs:
        parse_job(job)


def test_demo_runs_on_cpus_without_downloads():
    doc = load("demo-cpu.yaml")
    spec = parse_job(doc)
    assert spec.runtime.model.init is not None and spec.runtime.model.tokenizer.startswith("builtin:")
    assert spec.runtime.data.synthetic is not None
    (pod,) = pods_of(doc)
    assert not any("gpu" in k for k in pod["spec"]["containers"][0]["resources"].get("limits", {}))
    assert pod["spec"]["tolerations"] == [] and "affinity" not in pod["spec"]


def test_grpo_on_one_8_gpu_node_colocated():
    doc = load("grpo-8gpu.yaml")
    spec = parse_job(doc)
    assert (spec.placement, spec.runtime.algorithm.name) == ("colocated", "grpo")
    (pod,) = pods_of(doc)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert env(pod)["KUBERL_LOCAL_WORLD_SIZE"] == "8"
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["key"] == "nvidia.com/gpu.product"


def test_ppo_disaggregated_across_nodes():
    doc = load("ppo-disaggregated.yaml")
    spec = parse_job(doc)
    assert (spec.placement, spec.runtime.algorithm.name) == ("disaggregated", "ppo")
    assert spec.runtime.rollout.tensor_parallel_size == 2 and spec.roles.rollout.tensor_parallel_size == 2
    pods = pods_of(doc)
    roles = [(p["metadata"]["labels"][labels.ROLE], p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
             for p in pods]
    assert roles == [("trainer", "8"), ("trainer", "8"), ("rollout", "8"), ("rollout", "8")]
    assert spec.runtime.rollout.engine == "vllm"  # the built-in engine is not tensor-parallel
    assert {env(p)["KUBERL_WORLD_SIZE"] for p in pods} == {"24"}  # 16 FSDP ranks + 2 pods x 4 vLLM engines (tp 2)
    assert [env(p)["KUBERL_LOCAL_WORLD_SIZE"] for p in pods] == ["8", "8", "4", "4"]
    assert {env(p)["KUBERL_ROLLOUT_REPLICAS"] for p in pods} == {"8"}
    assert {env(p)["KUBERL_TRAINER_WORLD_SIZE"] for p in pods} == {"16"}
    assert all(p["metadata"]["labels"][labels.KUEUE_QUEUE] == "gpu-team" for p in pods)
