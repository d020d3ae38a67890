"""The pure builders: process layout, ConfigMap, headless Service, env contract, GPU placement, pods.

Every test builds from a parsed spec (`parsed(...)`) and asserts on the plain manifest a user would
see with `kuberl render`.
"""

import pytest
import yaml

from kuberl_operator import labels, names
from kuberl_operator.builders import (
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    JobRef,
    build_affinity,
    build_configmap,
    build_pod,
    build_pods,
    build_resources,
    build_service,
    build_volumes,
    pod_spec_hash,
    process_layout,
    world_size,
)
from kuberl_runtime import contract
from kuberl_runtime.config import RuntimeConfig

from factories import JOB, NS, UID, parsed

REF = JobRef(JOB, NS, UID)
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

PPO = {"algorithm": {"name": "ppo"}}
# (id, make_spec kwargs, expected [(role, first rank, processes per pod, replicas)])
LAYOUTS = [
    ("trainer-only-1gpu", dict(), [("trainer", 0, 1, 1)]),
    ("trainer-cpu", dict(roles={"trainer": {"replicas": 2, "gpus": 0}}), [("trainer", 0, 1, 2)]),
    ("trainer-2x8", dict(roles={"trainer": {"replicas": 2, "gpus": 8}}), [("trainer", 0, 8, 2)]),
    ("disaggregated",
     dict(placement="disaggregated", roles={"trainer": {"replicas": 2, "gpus": 8},
                                             "rollout": {"replicas": 2, "gpus": 8, "tensorParallelSize": 2}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}),
     [("trainer", 0, 8, 2), ("rollout", 16, 4, 2)]),  # 8 GPUs / tp 2: 4 engine replicas per rollout pod
    ("disaggregated-builtin-engines",
     dict(placement="disaggregated", roles={"trainer": {"replicas": 1, "gpus": 2}, "rollout": {"replicas": 2, "gpus": 4}}),
     [("trainer", 0, 2, 1), ("rollout", 2, 4, 2)]),  # builtin engine (tp 1): one engine per GPU
    ("disaggregated-cpu-rollout",
     dict(placement="disaggregated", roles={"trainer": {"replicas": 2, "gpus": 0}, "rollout": {"replicas": 2, "gpus": 0}}),
     [("trainer", 0, 1, 2), ("rollout", 2, 1, 2)]),  # gpus: 0: one engine process per pod
    ("colocated-all-side-roles",
     dict(roles={"trainer": {"replicas": 1, "gpus": 4}, "critic": {"replicas": 1}, "reference": {"replicas": 2},
                 "reward": {"replicas": 3}}, runtime=PPO),
     [("trainer", 0, 4, 1), ("critic", 4, 1, 1), ("reference", 5, 1, 2), ("reward", 7, 1, 3)]),
    ("disaggregated-all-roles",
     dict(placement="disaggregated",
          roles={"trainer": {"gpus": 2}, "rollout": {"replicas": 3}, "critic": {"replicas": 1},
                 "reference": {"replicas": 1}, "reward": {"replicas": 1}}, runtime=PPO),
     [("trainer", 0, 2, 1), ("rollout", 2, 1, 3), ("critic", 5, 1, 1), ("reference", 6, 1, 1), ("reward", 7, 1, 1)]),
    ("zero-replica-roles-get-no-pods",
     dict(roles={"rollout": {"replicas": 0}, "reference": {"replicas": 0}}), [("trainer", 0, 1, 1)]),
]


@pytest.mark.parametrize("kw, expected", [x[1:] for x in LAYOUTS], ids=[x[0] for x in LAYOUTS])
def test_process_layout(kw, expected):
    spec = parsed(**kw)
    layout = [(role, first, per_pod, rs.replicas) for role, rs, first, per_pod in process_layout(spec)]
    assert layout == expected
    last_role, last_first, last_per_pod, last_replicas = expected[-1]
    assert world_size(spec) == last_first + last_per_pod * last_replicas


@pytest.mark.parametrize("kw", [x[1] for x in LAYOUTS], ids=[x[0] for x in LAYOUTS])
def test_ranks_cover_the_world_exactly_once(kw):
    spec = parsed(**kw)
    ranks = []
    for pod in build_pods(REF, spec, restart=0):
        env = env_of(pod)
        first, local = int(env[contract.ENV_RANK]), int(env[contract.ENV_LOCAL_WORLD_SIZE])
        ranks.extend(range(first, first + local))
        assert env[contract.ENV_WORLD_SIZE] == str(world_size(spec))
    assert sorted(ranks) == list(range(world_size(spec)))


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


# ------------------------------------------------------------------------------ ConfigMap, Service


def test_configmap_holds_the_rendered_runtime_config():
    spec = parsed(runtime={"algorithm": {"name": "ppo"}, "training": {"globalBatchSize": 32}})
    cm = build_configmap(REF, spec)
    assert cm["metadata"]["name"] == names.configmap_name(JOB) == "job-config"
    text = cm["data"][names.CONFIG_FILE]
    back = RuntimeConfig.model_validate(yaml.safe_load(text))
    assert back == spec.runtime
    assert "maxNewTokens: 256" in text  # camelCase keys, defaults filled in
    assert yaml.safe_load(text)["algorithm"]["klCoef"] == 0.001  # derived defaults are written out


def test_service_is_headless_and_resolves_unready_pods():
    svc = build_service(REF, parsed(runtime={"logging": {"port": 9000}}))
    assert svc["metadata"]["name"] == names.service_name(JOB)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {labels.JOB: JOB}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"rendezvous": 29500, "http": 9000}


@pytest.mark.parametrize("build", [build_configmap, build_service])
def test_children_are_owned_and_labelled(build):
    meta = build(REF, parsed())["metadata"]
    assert meta["namespace"] == NS
    assert meta["labels"][labels.JOB] == JOB
    assert meta["ownerReferences"] == [{
        "apiVersion": "kuberl.io/v1alpha1", "kind": "RLJob", "name": JOB, "uid": UID,
        "controller": True, "blockOwnerDeletion": True,
    }]


# -------------------------------------------------------------------------------------------- env


def test_env_contract_of_a_disaggregated_rollout_pod():
    spec = parsed(placement="disaggregated",
                  roles={"trainer": {"replicas": 2, "gpus": 4}, "rollout": {"replicas": 3, "gpus": 2}})
    pod = build_pod(REF, spec, "rollout", 2, restart=4, spec_hash="h")
    env = env_of(pod)
    assert env[contract.ENV_CONFIG] == "/etc/kuberl/config.yaml"
    assert (env[contract.ENV_JOB], env[contract.ENV_NAMESPACE]) == (JOB, NS)
    assert (env[contract.ENV_ROLE], env[contract.ENV_ROLE_RANK], env[contract.ENV_ROLE_REPLICAS]) == ("rollout", "2", "3")
    # 2 GPUs per rollout pod, builtin engine (tp 1): 2 engine processes per pod, ranks 8..13.
    assert env[contract.ENV_RANK] == "12"  # 8 trainer processes, then rollout pods 0, 1 (2 engines each)
    assert env[contract.ENV_LOCAL_WORLD_SIZE] == "2"
    assert env[contract.ENV_WORLD_SIZE] == "14"
    assert env[contract.ENV_TRAINER_WORLD_SIZE] == "8"
    assert env[contract.ENV_ROLLOUT_REPLICAS] == "6"  # engine replicas, not pods
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8470, "engine-1": 8471}  # engine i serves on the pod's port + i
    assert env[contract.ENV_MASTER_ADDR] == "job-trainer-0.job.team-a.svc"
    assert env[contract.ENV_MASTER_PORT] == str(contract.MASTER_PORT)
    assert env[contract.ENV_PLACEMENT] == "disaggregated"
    assert env[contract.ENV_GPUS] == "2"
    assert env[contract.ENV_RESTART] == "4"
    assert env[contract.ENV_POD_IP] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_env_round_trips_through_the_runtime_topology():
    spec = parsed(roles={"trainer": {"replicas": 2, "gpus": 8}})
    pod = build_pod(REF, spec, "trainer", 1, restart=0, spec_hash="h")
    env = {k: v for k, v in env_of(pod).items() if isinstance(v, str)}
    topo = contract.Topology.from_env(env)
    assert (topo.role, topo.role_rank, topo.rank, topo.local_world_size, topo.world_size) == ("trainer", 1, 8, 8, 16)
    assert not topo.is_driver


def test_user_env_comes_first_so_the_contract_wins():
    spec = parsed(env=[{"name": "A", "value": "job"}, {"name": contract.ENV_RANK, "value": "99"}],
                  roles={"trainer": {"env": [{"name": "B", "value": "role"}]}})
    env = build_pod(REF, spec, "trainer", 0, 0, "h")["spec"]["containers"][0]["env"]
    order = [e["name"] for e in env]
    assert order[:3] == ["A", contract.ENV_RANK, "B"]
    assert [e["value"] for e in env if e["name"] == contract.ENV_RANK][-1] == "0"  # the last entry wins


def test_secrets_become_env_from_secret_refs():
    spec = parsed(
        placement="disaggregated", roles={"rollout": {"replicas": 1}},
        runtime={"model": {"path": None, "hubId": "Qwen/Qwen2.5-0.5B", "tokenSecretRef": {"name": "hf", "key": "tok"}},
                 "logging": {"wandb": {"project": "p", "apiKeySecretRef": {"name": "wb", "key": "k"}}}})
    trainer, rollout = (env_of(build_pod(REF, spec, r, 0, 0, "h")) for r in ("trainer", "rollout"))
    assert trainer["HF_TOKEN"] == rollout["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert trainer["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wb", "key": "k"}}
    assert "WANDB_API_KEY" not in rollout  # only the trainer logs


# ---------------------------------------------------------------------------------- GPU placement


@pytest.mark.parametrize(
    "role, expected_limits",
    [
        ({"gpus": 8}, {"nvidia.com/gpu": "8"}),
        ({"gpus": 0}, {}),
        ({"gpus": 1, "gpuResource": "nvidia.com/mig-1g.10gb"}, {"nvidia.com/mig-1g.10gb": "1"}),
        ({"gpus": 8, "extraResources": {"rdma/ib": 1}}, {"nvidia.com/gpu": "8", "rdma/ib": "1"}),
        ({"gpus": 2, "resources": {"limits": {"memory": "64Gi"}}}, {"memory": "64Gi", "nvidia.com/gpu": "2"}),
        # a user's GPU limit is overridden by `gpus`: one source of truth
        ({"gpus": 2, "resources": {"limits": {"nvidia.com/gpu": "7"}}}, {"nvidia.com/gpu": "2"}),
    ],
)
def test_resources(role, expected_limits):
    rs = parsed(roles={"trainer": role}).roles.trainer
    assert build_resources(rs).get("limits", {}) == expected_limits


def test_extended_resource_requests_equal_limits():
    rs = parsed(roles={"trainer": {"gpus": 4, "extraResources": {"rdma/ib": 1},
                                   "resources": {"requests": {"cpu": "8", "nvidia.com/gpu": "1"}}}}).roles.trainer
    res = build_resources(rs)
    assert res["requests"] == {"cpu": "8", "nvidia.com/gpu": "4", "rdma/ib": "1"}
    assert rs.resources == {"requests": {"cpu": "8", "nvidia.com/gpu": "1"}}  # the spec is not mutated


def test_gpu_product_and_memory_become_required_node_affinity():
    rs = parsed(roles={"trainer": {"gpus": 8, "gpuProduct": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"],
                                   "gpuMemoryMib": 81559}}).roles.trainer
    terms = build_affinity(rs)["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"]},
        {"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": ["81558"]},  # Gt is strict: >= 81559
    ]}]


def test_gpu_requirements_are_anded_into_every_user_term():
    user = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
        ]}},
        "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    rs = parsed(roles={"trainer": {"gpus": 8, "gpuProduct": ["A100"], "affinity": user}}).roles.trainer
    affinity = build_affinity(rs)
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [[e["key"] for e in t["matchExpressions"]] for t in terms] == [["zone", GPU_PRODUCT_LABEL]] * 2
    assert affinity["podAffinity"] == user["podAffinity"]
    assert len(rs.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"]) == 1  # the spec is not mutated


@pytest.mark.parametrize("role", [{"gpus": 0, "gpuProduct": ["A100"]}, {"gpus": 1}])
def test_no_affinity_without_gpu_requirements(role):
    assert build_affinity(parsed(roles={"trainer": role}).roles.trainer) is None


@pytest.mark.parametrize("gpus, tolerated", [(1, True), (0, False)])
def test_gpu_pods_tolerate_the_gpu_taint(gpus, tolerated):
    extra = {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}
    spec = parsed(roles={"trainer": {"gpus": gpus, "tolerations": [extra]}})
    tolerations = build_pod(REF, spec, "trainer", 0, 0, "h")["spec"]["tolerations"]
    assert tolerations == ([extra, GPU_TOLERATION] if tolerated else [extra])


# ---------------------------------------------------------------------------------------- volumes


def test_volumes_of_a_trainer_pod():
    spec = parsed(roles={"trainer": {"shmSize": "64Gi", "volumes": [{"name": "scratch", "emptyDir": {}}],
                                     "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}},
                  volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
                  volumeMounts=[{"name": "models", "mountPath": "/models"}],
                  runtime={"checkpoint": {"dir": "/ckpt", "volume": {"persistentVolumeClaim": {"claimName": "c"}}}})
    volumes, mounts = build_volumes(REF, spec, "trainer", spec.roles.trainer)
    assert volumes == [
        {"name": "kuberl-config", "configMap": {"name": "job-config"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}},
        {"name": "kuberl-workspace", "emptyDir": {}},
        {"name": "kuberl-checkpoints", "persistentVolumeClaim": {"claimName": "c"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    assert {m["name"]: m["mountPath"] for m in mounts} == {
        "kuberl-config": "/etc/kuberl", "dshm": "/dev/shm", "kuberl-workspace": "/workspace",
        "kuberl-checkpoints": "/ckpt", "models": "/models", "scratch": "/scratch"}


@pytest.mark.parametrize("ckpt_dir, mount", [
    ("/ckpt", "/ckpt"),
    ("./runs/demo/checkpoints", "/workspace/runs/demo/checkpoints"),
    ("runs/../ckpt", "/workspace/ckpt"),
])
def test_relative_checkpoint_dirs_resolve_under_the_workspace_the_container_runs_in(ckpt_dir, mount):
    spec = parsed(runtime={"checkpoint": {"dir": ckpt_dir}})
    pod = build_pod(REF, spec, "trainer", 0, restart=0, spec_hash="abc")
    container = pod["spec"]["containers"][0]
    assert container["workingDir"] == "/workspace"
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["kuberl-checkpoints"] == mount


def test_checkpoints_default_to_an_empty_dir_and_only_trainers_mount_them():
    spec = parsed(placement="disaggregated", roles={"rollout": {"replicas": 1}})
    trainer, _ = build_volumes(REF, spec, "trainer", spec.roles.trainer)
    rollout, rollout_mounts = build_volumes(REF, spec, "rollout", spec.roles.rollout)
    assert {"name": "kuberl-checkpoints", "emptyDir": {}} in trainer
    assert "kuberl-checkpoints" not in {v["name"] for v in rollout} | {m["name"] for m in rollout_mounts}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in rollout_mounts


# -------------------------------------------------------------------------------------------- pods


def test_pod_identity_and_security():
    spec = parsed(roles={"trainer": {"replicas": 2}})
    pod = build_pod(REF, spec, "trainer", 1, restart=3, spec_hash="abc")
    meta, ps = pod["metadata"], pod["spec"]
    assert meta["name"] == names.pod_name(JOB, "trainer", 1) == "job-trainer-1"
    assert meta["labels"].items() >= {labels.JOB: JOB, labels.ROLE: "trainer", labels.REPLICA: "1",
                                      labels.RESTART: "3"}.items()
    assert meta["annotations"][labels.SPEC_HASH] == "abc"
    assert meta["ownerReferences"][0]["uid"] == UID
    assert (ps["restartPolicy"], ps["hostname"], ps["subdomain"]) == ("Never", "job-trainer-1", "job")
    assert ps["securityContext"]["runAsNonRoot"] is True and ps["securityContext"]["runAsUser"] != 0
    c = ps["containers"][0]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "runAsNonRoot": True}
    assert c["command"] == ["kuberl-runtime"]
    assert c["image"] == spec.image
    assert [p["name"] for p in c["ports"]] == ["http"]  # only trainer rank 0 serves the rendezvous


def test_trainer_rank_0_exposes_the_rendezvous_port():
    pod = build_pod(REF, parsed(), "trainer", 0, 0, "h")
    assert {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]} == {
        "http": 8470, "rendezvous": contract.MASTER_PORT}


@pytest.mark.parametrize("rollout, runtime, port, last", [
    ({"gpus": 8}, {}, 65528, 65535),  # 8 one-GPU engines: the largest valid port for this layout
    ({"gpus": 8, "tensorParallelSize": 2}, {"rollout": {"engine": "vllm", "tensorParallelSize": 2}}, 65532, 65535),
    ({"gpus": 64}, {}, 65472, 65535),
    ({"gpus": 8}, {}, 29499, 29506),  # a rollout pod's engines may pass the rendezvous port: it is not in that pod
])
def test_valid_ports_stay_in_range_and_distinct_in_every_pod_and_the_service(rollout, runtime, port, last):
    """What validation (api.RLJobSpec) guarantees and the API server requires: every declared port is in
    1..65535 and none is declared twice in one pod or in the Service."""
    spec = parsed(placement="disaggregated", roles={"rollout": {"replicas": 2, **rollout}},
                  runtime={**runtime, "logging": {"port": port}})
    for pod in build_pods(REF, spec, restart=0):
        ports = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]]
        assert all(1 <= p <= 65535 for p in ports) and len(set(ports)) == len(ports), (pod["metadata"]["name"], ports)
    rollout_pod = build_pod(REF, spec, "rollout", 1, 0, "h")
    engine_ports = [p["containerPort"] for p in rollout_pod["spec"]["containers"][0]["ports"]]
    assert engine_ports == list(range(port, last + 1))
    service_ports = [p["port"] for p in build_service(REF, spec)["spec"]["ports"]]
    assert len(set(service_ports)) == len(service_ports)


def test_pod_level_options():
    spec = parsed(image="reg/img:1", imagePullPolicy="Always", imagePullSecrets=["regcred"],
                  serviceAccountName="rl", placement="disaggregated",
                  roles={"rollout": {"replicas": 1, "image": "reg/vllm:2", "nodeSelector": {"pool": "gen"}}})
    trainer, rollout = build_pod(REF, spec, "trainer", 0, 0, "h"), build_pod(REF, spec, "rollout", 0, 0, "h")
    assert trainer["spec"]["containers"][0]["image"] == "reg/img:1"
    assert rollout["spec"]["containers"][0]["image"] == "reg/vllm:2"
    assert rollout["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert rollout["spec"]["nodeSelector"] == {"pool": "gen"} and "nodeSelector" not in trainer["spec"]
    assert trainer["spec"]["serviceAccountName"] == "rl"
    assert trainer["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_build_pods_is_deterministic():
    spec = parsed(placement="disaggregated", roles={"trainer": {"replicas": 2, "gpus": 8, "gpuProduct": ["H100"]},
                                                    "rollout": {"replicas": 2, "gpus": 8, "tensorParallelSize": 2}},
                  runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}})
    a = yaml.safe_dump_all(build_pods(REF, spec, 1))
    b = yaml.safe_dump_all(build_pods(REF, parsed(**{
        "placement": "disaggregated",
        "roles": {"trainer": {"replicas": 2, "gpus": 8, "gpuProduct": ["H100"]},
                  "rollout": {"replicas": 2, "gpus": 8, "tensorParallelSize": 2}},
        "runtime": {"rollout": {"engine": "vllm", "tensorParallelSize": 2}}}), 1))
    assert a == b
    assert [p["metadata"]["name"] for p in build_pods(REF, spec, 1)] == [
        "job-trainer-0", "job-trainer-1", "job-rollout-0", "job-rollout-1"]


# -------------------------------------------------------------------------------------- spec hash


@pytest.mark.parametrize(
    "change, reshapes_pods",
    [
        (dict(runPolicy={"backoffLimit": 9}), False),
        (dict(runPolicy={"activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 5}), False),
        (dict(runPolicy={"cleanPodPolicy": "All"}), False),
        (dict(suspend=True), False),
        (dict(roles={"trainer": {"gpus": 2}}), True),
        (dict(image="other:1"), True),
        (dict(runtime={"training": {"lr": 1e-5}}), True),
        (dict(runPolicy={"scheduling": {"queueName": "q"}}), True),
        (dict(runPolicy={"scheduling": {"priorityClassName": "high"}}), True),
    ],
)
def test_pod_spec_hash(change, reshapes_pods):
    base = pod_spec_hash(parsed())
    assert (pod_spec_hash(parsed(**change)) != base) is reshapes_pods
    assert pod_spec_hash(parsed()) == base
