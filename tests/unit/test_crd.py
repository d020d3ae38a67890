"""The generated CRD: committed file up to date, structural schema, descriptions, round trip.

The round trip validates documents against the generated openAPIV3Schema with jsonschema's
Draft4Validator: OpenAPI v3.0 schemas use Draft 4's boolean exclusiveMinimum/exclusiveMaximum,
which is what the generator emits, and Draft 4 ignores the x-kubernetes-* keys.
"""

from pathlib import Path

import jsonschema
import pytest
import yaml

from kuberl_operator.crd import CRD_FILE, build_crd, render_crd
from kuberl_operator.reference import REGENERATE

from factories import MINIMAL_YAML, make_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# What a structural schema may contain (OpenAPI v3.0 subset + Kubernetes extensions).
ALLOWED_KEYS = {
    "type", "description", "properties", "items", "required", "default", "enum", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "minItems", "maxItems", "pattern", "additionalProperties", "nullable",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def schema() -> dict:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node, path="openAPIV3Schema"):
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_is_generated():
    committed = (ROOT / CRD_FILE).read_text()
    assert committed == render_crd(), (
        f"{CRD_FILE} is stale; regenerate it (and the field reference) from the repository root:\n  {REGENERATE}")


def test_crd_identity():
    crd = build_crd()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "rljobs.kuberl.io"
    assert (crd["spec"]["group"], names["kind"], names["plural"], names["shortNames"]) == (
        "kuberl.io", "RLJob", "rljobs", ["rlj"])
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for col in ("Phase", "Step", "Reward", "Restarts", "Age"):
        assert col in columns


@pytest.mark.parametrize("path, node", list(walk(schema())), ids=lambda x: x if isinstance(x, str) else "")
def test_schema_node_is_structural(path, node):
    assert set(node) <= ALLOWED_KEYS, f"{path}: {set(node) - ALLOWED_KEYS}"
    assert node.get("type") in TYPES or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
    if "properties" in node:
        assert node["type"] == "object" and "additionalProperties" not in node, path
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node:
            assert node[bound] is True, f"{path}: {bound} must be a boolean"
            assert ("minimum" if bound == "exclusiveMinimum" else "maximum") in node, path
    if node.get("type") == "array":
        assert isinstance(node.get("items"), dict), f"{path}: arrays need items"
    if "default" in node:
        assert isinstance(node["default"], (str, int, float, bool)), path
        jsonschema.Draft4Validator({k: v for k, v in node.items() if k != "default"}).validate(node["default"])
    for req in node.get("required", []):
        assert req in node.get("properties", {}), f"{path}: required {req} is not a property"


FIELDS = [
    (path, node) for path, node in walk(schema())
    if path.count(".") >= 2 and not path.endswith("]") and not path.endswith("}")
]


@pytest.mark.parametrize("path, node", FIELDS, ids=[p for p, _ in FIELDS])
def test_every_field_has_a_description(path, node):
    assert node.get("description", "").strip(), f"{path} has no description (it is kubectl explain text)"


def test_cross_field_rules_are_in_the_crd():
    rules = [v for _, node in walk(schema()) for v in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 5
    assert all({"rule", "message"} <= set(r) for r in rules)


@pytest.fixture(scope="module")
def validator():
    s = schema()
    jsonschema.Draft4Validator.check_schema(s)
    return jsonschema.Draft4Validator(s)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_validate_against_the_schema(validator, example):
    for doc in yaml.safe_load_all(example.read_text()):
        errors = [e.message for e in validator.iter_errors(doc)]
        assert errors == []


def test_examples_exist():
    assert {e.name for e in EXAMPLES} >= {"demo-cpu.yaml", "grpo-8gpu.yaml", "ppo-disaggregated.yaml"}


def test_minimal_and_default_dumped_jobs_validate(validator):
    from kuberl_operator.api import parse_spec

    validator.validate(yaml.safe_load(MINIMAL_YAML))
    job = make_job()
    full = parse_spec(job["spec"]).model_dump(mode="json", by_alias=True, exclude_none=True)
    validator.validate({**job, "spec": full, "status": {"phase": "Running", "restarts": 1}})


@pytest.mark.parametrize(
    "spec_patch, reason",
    [
        ({"placement": "hybrid"}, "is not one of"),
        ({"roles": {"trainer": {"replicas": -1}}}, "less than the minimum"),
        ({"roles": {"trainer": {"gpus": "8"}}}, "is not of type 'integer'"),
        ({"runtime": {"model": {"path": "/m"}, "data": {"path": "/d"}, "algorithm": {"dualClip": 1.0}}},
         "less than or equal to the minimum"),
        ({"runtime": {"model": {"path": "/m"}}}, "'data' is a required property"),
        ({"runtime": None}, "'runtime' is a required property"),
        ({"runtime": {"model": {"path": "/m"}, "data": {"path": "/d"}, "training": {"adamBetas": [0.9]}}},
         "is too short"),
        ({"roles": {"trainer": {"gpuResource": "gpu"}}}, "does not match"),
    ],
)
def test_schema_rejects_invalid_documents(validator, spec_patch, reason):
    job = make_job()
    spec = {**job["spec"], **spec_patch}
    if spec_patch.get("runtime", "") is None:
        spec.pop("runtime")
    errors = [e.message for e in validator.iter_errors({**job, "spec": spec})]
    assert any(reason in e for e in errors), errors
