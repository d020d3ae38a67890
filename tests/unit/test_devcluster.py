"""The dev cluster's pure parts: the Kubernetes wrapper go.mod, GPU pool parsing, fake node
shapes and the kwok stage files (the running cluster: tests/integration/test_local_cluster.py)."""

from importlib import resources

import pytest
import yaml

from kuberl_operator.devcluster.build import BuildError, _k8s_wrapper_go_mod
from kuberl_operator.devcluster.cluster import STAGE_FILES
from kuberl_operator.devcluster.nodes import (GPU_RESOURCE, KWOK_ANNOTATION, POD_DELAY,
                                              POD_EXIT_CODE, POD_FAIL, POD_SUCCEED, GPUPool,
                                              build_nodes)

UPSTREAM_GO_MOD = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tk8s.io/api v0.0.0
\tk8s.io/apimachinery v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/apimachinery => ./staging/src/k8s.io/apimachinery
\tk8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
)
"""


def test_wrapper_go_mod_pins_every_staging_module_and_keeps_godebug():
    go_mod = _k8s_wrapper_go_mod(UPSTREAM_GO_MOD)

    assert "go 1.26.0" in go_mod and "godebug default=go1.26" in go_mod
    assert "require k8s.io/kubernetes v1.36.3" in go_mod
    assert [line.strip() for line in go_mod.splitlines() if "=>" in line] == [
        "k8s.io/api => k8s.io/api v0.36.3",
        "k8s.io/apimachinery => k8s.io/apimachinery v0.36.3",
        "k8s.io/cri-streaming => k8s.io/cri-streaming v0.36.3",
    ]


def test_wrapper_go_mod_refuses_a_go_mod_without_staging_replaces():
    with pytest.raises(BuildError, match="k8s.io/kubernetes"):
        _k8s_wrapper_go_mod("module k8s.io/kubernetes\n\ngo 1.26.0\n")


@pytest.mark.parametrize("text, expected", [
    ("4xNVIDIA-H100-80GB-HBM3", GPUPool(4, "NVIDIA-H100-80GB-HBM3", 8)),
    ("2xNVIDIA-H200:4", GPUPool(2, "NVIDIA-H200", 4)),
    ("1xNVIDIA-L4:1:23034", GPUPool(1, "NVIDIA-L4", 1, 23034)),
])
def test_gpu_pool_parses(text, expected):
    assert GPUPool.parse(text) == expected


@pytest.mark.parametrize("text", ["NVIDIA-H100", "4x", "x4:NVIDIA", "2xH100:eight"])
def test_gpu_pool_rejects(text):
    with pytest.raises(ValueError, match="COUNTxPRODUCT"):
        GPUPool.parse(text)


def test_default_nodes_are_four_h100_nodes_and_one_cpu_node():
    nodes = build_nodes()

    gpu = [n for n in nodes if "nvidia.com/gpu.product" in n["metadata"]["labels"]]
    assert [n["metadata"]["name"] for n in nodes] == [
        *(f"kwok-gpu-h100-80gb-hbm3-{i}" for i in range(4)), "kwok-cpu-0"]
    assert all(n["metadata"]["annotations"][KWOK_ANNOTATION] == "fake" for n in nodes)
    for node in gpu:
        assert node["status"]["capacity"][GPU_RESOURCE] == "8"
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        assert {k: node["metadata"]["labels"][k] for k in (
            "nvidia.com/gpu.product", "nvidia.com/gpu.memory", "nvidia.com/gpu.count")} == {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559",
            "nvidia.com/gpu.count": "8"}
        assert node["spec"]["taints"] == [
            {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
    assert nodes[-1]["spec"]["taints"] == [] and GPU_RESOURCE not in nodes[-1]["status"]["capacity"]


def test_pools_with_the_same_product_would_collide():
    with pytest.raises(ValueError, match="same node names"):
        build_nodes((GPUPool(1, "NVIDIA-H200"), GPUPool(1, "NVIDIA-H200", 4)), cpu_nodes=0)


def test_stage_files_are_kwok_stages_and_name_the_documented_annotations():
    stages = resources.files("kuberl_operator.devcluster") / "stages"
    texts = {name: (stages / name).read_text() for name in STAGE_FILES}

    assert all(yaml.safe_load(t)["kind"] == "Stage" for t in texts.values())
    for annotation in (POD_FAIL, POD_EXIT_CODE, POD_DELAY):
        assert annotation in texts["pod-fail.yaml"]
    assert POD_SUCCEED in texts["pod-succeed.yaml"]
