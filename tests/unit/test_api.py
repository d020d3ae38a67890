"""RLJobSpec: defaults, every cross-field rule with its field path, and the CEL twins of the rules.

The cross-field rules exist twice (pydantic validators and CEL `x-kubernetes-validations`); the
tables at the bottom run the same documents through both and require them to agree. CEL is
evaluated with cel-python when it is installed; the API-server integration tests cover it always.
"""

import re

import pytest
import yaml

from kuberl_operator.api import MAX_JOB_NAME, SpecError, parse_job, parse_spec
from kuberl_operator.crd import build_crd

from factories import MINIMAL_YAML, make_job, make_spec


def errors(spec: dict) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    return str(e.value)


# ------------------------------------------------------------------------------------ defaults


def test_minimal_job_is_valid_and_sensible():
    doc = yaml.safe_load(MINIMAL_YAML)
    assert len(MINIMAL_YAML.splitlines()) <= 15
    spec = parse_job(doc)
    assert spec.placement == "colocated"
    assert [r for r, _ in spec.roles.active()] == ["trainer"]
    assert (spec.roles.trainer.replicas, spec.roles.trainer.gpus) == (1, 8)
    assert spec.roles.trainer.gpu_resource == "nvidia.com/gpu"
    rt = spec.runtime
    assert rt.algorithm.name == "grpo" and rt.algorithm.advantage == "grpo"
    assert rt.algorithm.kl_coef == 0.0 and rt.algorithm.kl_in == "loss"
    assert rt.training.mini_batch_size == rt.training.global_batch_size
    assert rt.reward.rule == "numeric"
    assert spec.run_policy.backoff_limit == 3 and spec.run_policy.clean_pod_policy == "Running"
    assert spec.run_policy.scheduling.gang and spec.run_policy.scheduling.pod_group == "none"
    assert not spec.suspend and spec.managed_by is None
    assert spec.image.startswith("ghcr.io/kuberl/kuberl-runtime:")


# ----------------------------------------------------------------------------- cross-field rules

RULES = [
    # (id, spec overrides, expected "path: message" substring)
    ("two-model-sources", dict(runtime={"model": {"hubId": "Qwen/Qwen2.5-0.5B"}}),
     "spec.runtime.model: exactly one of path, hubId or init must be set (got path, hubId)"),
    ("no-model-source", dict(runtime={"model": {"path": None, "dtype": "bfloat16"}}),
     "spec.runtime.model: exactly one of path, hubId or init must be set (got none)"),
    ("two-data-sources", dict(runtime={"data": {"synthetic": {}}}),
     "spec.runtime.data: exactly one of path or synthetic must be set"),
    ("regex-does-not-compile", dict(runtime={"reward": {"rule": "regex", "pattern": "[a-"}}),
     "spec.runtime.reward.pattern: not a valid regular expression"),
    ("two-reward-kinds", dict(runtime={"reward": {"model": "/models/rm", "function": "m:f"}}),
     "spec.runtime.reward: set only one of rule, function or model (got function, model)"),
    ("dual-clip-not-above-1", dict(runtime={"algorithm": {"dualClip": 0.5}}),
     "spec.runtime.algorithm.dualClip: Input should be greater than 1"),
    ("gae-without-ppo", dict(runtime={"algorithm": {"name": "grpo", "advantage": "gae"}}),
     "spec.runtime.algorithm.advantage: gae needs a critic, which only name ppo trains"),
    ("grpo-group-of-one", dict(runtime={"algorithm": {"samplesPerPrompt": 1}}),
     "spec.runtime.algorithm.samplesPerPrompt: must be at least 2 with advantage grpo"),
    ("mini-does-not-divide-global", dict(runtime={"training": {"globalBatchSize": 48, "miniBatchSize": 32}}),
     "spec.runtime.training.miniBatchSize: must divide globalBatchSize (48), got 32"),
    ("role-tp-does-not-divide-gpus", dict(roles={"trainer": {"gpus": 6, "tensorParallelSize": 4}}),
     "spec.roles.trainer.gpus: must be divisible by tensorParallelSize (4), got 6"),
    ("rollout-role-tp", dict(placement="disaggregated", roles={"rollout": {"gpus": 4, "tensorParallelSize": 8}}),
     "spec.roles.rollout.gpus: must be divisible by tensorParallelSize (8), got 4"),
    ("runtime-tp-vs-trainer-gpus-colocated",
     dict(roles={"trainer": {"gpus": 6}}, runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 4}}),
     "spec.runtime.rollout.tensorParallelSize: must divide roles.trainer.gpus (6), got 4"),
    ("runtime-tp-vs-rollout-gpus-disaggregated",
     dict(placement="disaggregated", roles={"trainer": {"gpus": 8}, "rollout": {"gpus": 2}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 4}}),
     "spec.runtime.rollout.tensorParallelSize: must divide roles.rollout.gpus (2), got 4"),
    ("builtin-engine-tp", dict(runtime={"rollout": {"tensorParallelSize": 2}}),
     "spec.runtime.rollout.tensorParallelSize: must be 1 unless engine is vllm (kuberl's built-in engines "
     "are not tensor-parallel), got 2 with engine builtin; use engine: vllm for tensor parallelism"),
    ("rollout-role-tp-vs-engine-tp",
     dict(placement="disaggregated", roles={"rollout": {"gpus": 8, "tensorParallelSize": 4}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}),
     "spec.roles.rollout.tensorParallelSize: must equal runtime.rollout.tensorParallelSize (GPUs per engine "
     "replica), got 4 and runtime.rollout.tensorParallelSize 2"),
    ("rollout-replicas-colocated", dict(roles={"rollout": {"replicas": 2}}),
     "spec.roles.rollout.replicas: must be 0 when placement is colocated"),
    ("rollout-missing-disaggregated", dict(placement="disaggregated"),
     "spec.roles.rollout.replicas: must be at least 1 when placement is disaggregated"),
    ("rollout-zero-disaggregated", dict(placement="disaggregated", roles={"rollout": {"replicas": 0}}),
     "spec.roles.rollout.replicas: must be at least 1 when placement is disaggregated"),
    ("critic-with-grpo", dict(roles={"critic": {"replicas": 1}}),
     "spec.roles.critic: needs runtime.algorithm.name ppo"),
    ("micro-does-not-divide-rank-share", dict(runtime={"training": {"globalBatchSize": 4, "microBatchSize": 3}}),
     "spec.runtime.training.microBatchSize: must divide the 32 sequences each trainer rank gets per optimizer step, got 3"),
    ("batch-does-not-split-over-ranks", dict(roles={"trainer": {"replicas": 3, "gpus": 1}},
                                             runtime={"training": {"globalBatchSize": 4, "microBatchSize": 1}}),
     "spec.runtime.training.miniBatchSize: 4 prompts x algorithm.samplesPerPrompt 8 = 32 sequences must split evenly over 3 trainer ranks"),
    ("logging-port-is-rendezvous-port", dict(runtime={"logging": {"port": 29500}}),
     "spec.runtime.logging.port: must not be 29500: trainer rank 0 serves the rendezvous store on that port"),
    ("engine-ports-past-65535", dict(placement="disaggregated", roles={"rollout": {"gpus": 8}},
                                     runtime={"logging": {"port": 65529}}),
     "spec.runtime.logging.port: must leave room for the rollout pods' engine ports: engine replica i of a rollout "
     "pod serves on port + i, which must be at most 65535 for every replica (roles.rollout.gpus / "
     "tensorParallelSize per pod); got 65529 with 8 engine replicas per pod, so at most 65528"),
    ("no-trainer", dict(roles={"trainer": {"replicas": 0}}),
     "spec.roles.trainer.replicas: must be at least 1"),
    ("unknown-role-field", dict(roles={"trainer": {"gpu": 8}}), "spec.roles.trainer.gpu: unknown field"),
    ("unknown-spec-field", dict(backoffLimit=3), "spec.backoffLimit: unknown field"),
    ("unknown-runtime-field", dict(runtime={"algorithm": {"klCoeff": 0.1}}), "spec.runtime.algorithm.klCoeff: unknown field"),
    ("unknown-deep-field", dict(runPolicy={"scheduling": {"queue": "q"}}), "spec.runPolicy.scheduling.queue: unknown field"),
    ("bad-placement", dict(placement="hybrid"), "spec.placement: must be one of 'colocated' or 'disaggregated'"),
    ("bad-pod-group", dict(runPolicy={"scheduling": {"podGroup": "kueue"}}), "spec.runPolicy.scheduling.podGroup: must be one of"),
    ("negative-backoff", dict(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit: Input should be greater than or equal to 0"),
    ("bad-gpu-resource", dict(roles={"trainer": {"gpuResource": "gpu"}}), "spec.roles.trainer.gpuResource: String should match pattern"),
    ("env-list-index", dict(runtime={"reward": {"pythonPath": ["/a", 3]}}), "spec.runtime.reward.pythonPath[1]: Input should be a valid string"),
    ("runtime-missing", dict(runtime={"model": None, "data": None}), "spec.runtime.model: Field required"),
]


@pytest.mark.parametrize("override, expect", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule_names_the_field_path(override, expect):
    assert expect in errors(make_spec(**override))


@pytest.mark.parametrize(
    "override",
    [
        dict(roles={"rollout": {"replicas": 0}}),  # an explicit 0 is allowed when colocated
        dict(placement="disaggregated", roles={"trainer": {"gpus": 8}, "rollout": {"replicas": 2, "gpus": 8, "tensorParallelSize": 2}},
             runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}),
        dict(placement="disaggregated", roles={"rollout": {"replicas": 2, "gpus": 8}}),  # builtin: 8 one-GPU engines
        dict(roles={"critic": {"replicas": 1}}, runtime={"algorithm": {"name": "ppo"}}),
        dict(roles={"critic": {"replicas": 0}}),
        dict(roles={"trainer": {"gpus": 0}}, runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 4}}),  # CPU: TP unused
        dict(roles={"trainer": {"replicas": 2, "gpus": 8}}),
        dict(runtime={"reward": {"rule": "regex", "pattern": r"^\d+$"}}),
        dict(managedBy="kueue.x-k8s.io/multikueue"),
    ],
)
def test_valid_specs(override):
    parse_spec(make_spec(**override))


def test_all_errors_are_reported_at_once():
    e = errors(make_spec(placement="hybrid", roles={"trainer": {"gpu": 1}}))
    assert "spec.placement:" in e and "spec.roles.trainer.gpu: unknown field" in e


@pytest.mark.parametrize(
    "name, ok",
    [
        ("grpo-qwen", True),
        ("a", True),
        ("a" * MAX_JOB_NAME, True),
        ("a" * (MAX_JOB_NAME + 1), False),
        ("Grpo", False),
        ("1job", False),
        ("job-", False),
        ("job_1", False),
        ("job.1", False),
        ("", False),
    ],
)
def test_job_name(name, ok):
    doc = make_job(name=name)
    if ok:
        parse_job(doc)
    else:
        with pytest.raises(SpecError) as e:
            parse_job(doc)
        assert "metadata.name" in str(e.value)


@pytest.mark.parametrize(
    "patch, expect",
    [
        ({"apiVersion": "kuberl.io/v1"}, "apiVersion: must be kuberl.io/v1alpha1"),
        ({"kind": "Job"}, "kind: must be RLJob"),
        ({"spec": None}, "spec: is required"),
        ({"metadata": {}}, "metadata.name: is required"),
    ],
)
def test_manifest_envelope(patch, expect):
    doc = {**make_job(), **patch}
    with pytest.raises(SpecError) as e:
        parse_job(doc)
    assert expect in str(e.value)


def test_envelope_and_spec_errors_together():
    doc = {**make_job(name="Bad_Name"), "spec": make_spec(placement="x")}
    with pytest.raises(SpecError) as e:
        parse_job(doc)
    paths = [p for p, _ in e.value.errors]
    assert paths == ["metadata.name", "spec.placement"]


# ---------------------------------------------------------------------- CEL rules and their twins


def _crd_spec_schema() -> dict:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def apply_defaults(doc, schema):
    """What the API server does before CEL runs: fill in schema defaults of present objects."""
    if isinstance(doc, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in doc and "default" in sub:
                doc[key] = sub["default"]
            if key in doc:
                apply_defaults(doc[key], sub)
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for item in doc:
            apply_defaults(item, schema["items"])
    return doc


def collect_rules(schema, path=()):
    """(schema path, schema node, rule) for every x-kubernetes-validations entry."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from collect_rules(sub, (*path, key))
    if isinstance(schema.get("items"), dict):
        yield from collect_rules(schema["items"], (*path, "[]"))


SPEC_RULES = [r for r in collect_rules(_crd_spec_schema())]


def located(path: tuple, rule: dict) -> str:
    """A CEL rule's message as the API server reports it: the field (schema path + fieldPath) first."""
    where = ".".join(path) + rule.get("fieldPath", "")
    return f"{where.strip('.')}: {rule['message']}"


def test_cel_rules_exist_for_the_cross_field_rules():
    messages = {located(path, rule) for path, _, rule in SPEC_RULES}
    for expected in ("roles.trainer.gpus: must be divisible by tensorParallelSize",
                     "roles.rollout.gpus: must be divisible by tensorParallelSize",
                     "roles.rollout.replicas: must be 0 when placement is colocated (the trainer pods generate)",
                     "roles.rollout.replicas: must be at least 1 when placement is disaggregated",
                     "roles.critic: needs runtime.algorithm.name ppo (only PPO trains a critic)",
                     "runtime.rollout.tensorParallelSize: must be 1 unless engine is vllm (kuberl's built-in "
                     "engines are not tensor-parallel); use engine: vllm for tensor parallelism",
                     "roles.rollout.tensorParallelSize: must equal runtime.rollout.tensorParallelSize (GPUs per "
                     "engine replica)",
                     "runtime.logging.port: must not be 29500: trainer rank 0 serves the rendezvous store on that "
                     "port (its pod and the job's Service would declare the port twice)",
                     "runtime.logging.port: must leave room for the rollout pods' engine ports: engine replica i of a "
                     "rollout pod serves on port + i, which must be at most 65535 for every replica "
                     "(roles.rollout.gpus / tensorParallelSize per pod)",
                     "managedBy: field is immutable"):
        assert expected in messages


def _required(schema, path):
    node = schema
    for key in path[:-1]:
        node = node["properties"][key]
    return path[-1] in node.get("required", []) or "default" in node["properties"].get(path[-1], {})


@pytest.mark.parametrize("path, node, rule", SPEC_RULES, ids=[r[2]["message"][:40] for r in SPEC_RULES])
def test_cel_has_is_guarded(path, node, rule):
    """cel-go's has(a.b.c) errors when a.b is absent: every intermediate field must be guaranteed
    (required or defaulted) or tested with has() first in the same rule."""
    for var, chain in re.findall(r"has\(((?:old)?[sS]elf)((?:\.\w+)+)\)", rule["rule"]):
        fields = chain.strip(".").split(".")
        for i in range(1, len(fields)):
            prefix = f"{var}.{'.'.join(fields[:i])}"
            guarded = f"has({prefix})" in rule["rule"]
            assert guarded or _required(node, fields[:i]), f"{prefix} may be absent in rule {rule['rule']!r}"


def _rollout_ports(gpus: int | None, tp: int, port: int) -> dict:
    """A disaggregated job on `port` whose rollout pods have `gpus` (None: the default 1) and run
    gpus / tp engine replicas each (one without GPUs)."""
    rollout = {} if gpus is None else {"gpus": gpus}
    runtime: dict = {"logging": {"port": port}}
    if tp > 1:
        rollout["tensorParallelSize"] = tp
        runtime["rollout"] = {"engine": "vllm", "tensorParallelSize": tp}
    return dict(placement="disaggregated", roles={"rollout": rollout}, runtime=runtime)


ENGINES_FULL = "runtime.logging.port: must leave room for the rollout pods' engine ports"
# (rollout gpus (None: the default 1), tensorParallelSize, engine replicas per pod): the largest valid
# port is 65536 - engines; one more puts the last engine on 65536.
ENGINE_LAYOUTS = [(8, 1, 8), (64, 1, 64), (8, 2, 4), (3, 1, 3)]
ENGINE_PORT_TWINS = [
    (_rollout_ports(gpus, tp, 65536 - engines + over), ENGINES_FULL if over else None)
    for gpus, tp, engines in ENGINE_LAYOUTS for over in (0, 1)
] + [
    # One engine per pod (one GPU, or none): the field's own maximum is the largest valid port.
    (_rollout_ports(None, 1, 65535), None),
    (_rollout_ports(0, 1, 65535), None),
    # Only rollout pods add engine ports: trainer processes share their pod's one HTTP port.
    (dict(roles={"trainer": {"gpus": 64}}, runtime={"logging": {"port": 65535}}), None),
    # No rollout pods to serve them: only the colocated rule fails.
    (dict(roles={"rollout": {"gpus": 8}}, runtime={"logging": {"port": 65535}}),
     "roles.rollout.replicas: must be 0 when placement is colocated"),
]

# (spec overrides, message of the rule that must fail or None when every rule passes)
TWINS = [
    (dict(), None),
    (dict(roles=None), None),  # no roles at all: every rule must still evaluate
    (dict(roles={"rollout": {"replicas": 1}}), "roles.rollout.replicas: must be 0 when placement is colocated"),
    (dict(roles={"rollout": {}}), "roles.rollout.replicas: must be 0 when placement is colocated"),  # default replicas 1
    (dict(roles={"rollout": {"replicas": 0}}), None),
    (dict(placement="disaggregated"), "roles.rollout.replicas: must be at least 1 when placement is disaggregated"),
    (dict(placement="disaggregated", roles={"rollout": {"replicas": 0}}), "roles.rollout.replicas: must be at least 1"),
    (dict(placement="disaggregated", roles={"rollout": {}}), None),
    (dict(roles={"critic": {}}), "roles.critic: needs runtime.algorithm.name ppo"),
    (dict(roles={"critic": {"replicas": 0}}), None),
    (dict(roles={"critic": {}}, runtime={"algorithm": {"name": "ppo"}}), None),
    (dict(roles={"trainer": {"gpus": 6, "tensorParallelSize": 4}}), "roles.trainer.gpus: must be divisible by tensorParallelSize"),
    (dict(roles={"trainer": {"gpus": 8, "tensorParallelSize": 4}}), None),
    (dict(roles={"trainer": {"gpus": 0, "tensorParallelSize": 4}}), None),
    (dict(placement="disaggregated", roles={"rollout": {"gpus": 3, "tensorParallelSize": 2}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}),
     "roles.rollout.gpus: must be divisible by tensorParallelSize"),
    (dict(runtime={"rollout": {"tensorParallelSize": 2}}),
     "runtime.rollout.tensorParallelSize: must be 1 unless engine is vllm (kuberl's built-in engines are not tensor-parallel)"),
    (dict(runtime={"rollout": {"engine": "builtin", "tensorParallelSize": 1}}), None),
    (dict(roles={"trainer": {"gpus": 8}}, runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}), None),
    (dict(placement="disaggregated", roles={"rollout": {"gpus": 8, "tensorParallelSize": 2}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}), None),
    (dict(placement="disaggregated", roles={"rollout": {"gpus": 8, "tensorParallelSize": 4}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}),
     "roles.rollout.tensorParallelSize: must equal runtime.rollout.tensorParallelSize (GPUs per engine replica)"),
    (dict(placement="disaggregated", roles={"rollout": {"gpus": 8}},
          runtime={"rollout": {"engine": "vllm", "tensorParallelSize": 2}}),
     "roles.rollout.tensorParallelSize: must equal runtime.rollout.tensorParallelSize"),
    (dict(roles={"trainer": {"gpus": 8, "tensorParallelSize": 2}}), None),  # colocated: the rule is about rollout pods
    # Ports: rollout pods declare port .. port + engines - 1; trainer rank 0 declares port and 29500.
    *ENGINE_PORT_TWINS,
    (dict(runtime={"logging": {"port": 29500}}), "runtime.logging.port: must not be 29500"),
    (dict(runtime={"logging": {"port": 29499}}), None),
    (dict(runtime={"logging": {"port": 29501}}), None),
    # A rollout pod's engine ports may pass 29500: the rendezvous store is only in trainer rank 0's pod.
    (dict(placement="disaggregated", roles={"rollout": {"gpus": 8}}, runtime={"logging": {"port": 29499}}), None),
]


def _spec_without_roles_if_asked(override):
    spec = make_spec(**{k: v for k, v in override.items() if k != "roles" or v is not None})
    if "roles" in override and override["roles"] is None:
        spec.pop("roles")
    return spec


@pytest.mark.parametrize("override, failing", TWINS)
def test_pydantic_twin(override, failing):
    spec = _spec_without_roles_if_asked(override)
    if failing is None:
        parse_spec(spec)
    else:
        assert f"spec.{failing}" in re.sub(r" \(\d+\)", "", errors(spec))  # CEL messages carry no values


def _cel_failures(doc: dict, old: dict | None = None) -> list[str]:
    celpy = pytest.importorskip("celpy", reason="cel-python not installed: CEL is covered by the integration tests")
    env = celpy.Environment()
    failed = []
    for path, _, rule in SPEC_RULES:
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and old is None:
            continue  # transition rules run only on update
        nodes = [doc]
        for key in path:
            nodes = [n[key] for n in nodes if isinstance(n, dict) and key in n]
        for node in nodes:
            act = {"self": celpy.json_to_cel(node)}
            if uses_old:
                act["oldSelf"] = celpy.json_to_cel(old)
            result = env.program(env.compile(rule["rule"])).evaluate(act)
            if isinstance(result, Exception) or not bool(result):
                failed.append(located(path, rule))
    return failed


@pytest.mark.parametrize("override, failing", TWINS)
def test_cel_rule(override, failing):
    doc = apply_defaults(_spec_without_roles_if_asked(override), _crd_spec_schema())
    failed = _cel_failures(doc)
    if failing is None:
        assert failed == []
    else:
        assert len(failed) == 1 and failing in failed[0]


@pytest.mark.parametrize(
    "old, new, ok",
    [
        ({}, {}, True),
        ({"managedBy": "a/b"}, {"managedBy": "a/b"}, True),
        ({}, {"managedBy": "a/b"}, False),
        ({"managedBy": "a/b"}, {}, False),
        ({"managedBy": "a/b"}, {"managedBy": "c/d"}, False),
    ],
)
def test_cel_managed_by_is_immutable(old, new, ok):
    schema = _crd_spec_schema()
    old_doc = apply_defaults(make_spec(**old), schema)
    new_doc = apply_defaults(make_spec(**new), schema)
    failed = _cel_failures(new_doc, old=old_doc)
    assert failed == ([] if ok else ["managedBy: field is immutable"])
