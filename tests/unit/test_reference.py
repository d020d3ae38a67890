"""docs/reference.md: generated from the models, complete, and never stale; every field described."""

import functools
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from kuberl_operator import api
from kuberl_operator.cli import main
from kuberl_operator.crd import build_crd
from kuberl_operator.reference import REFERENCE_FILE, REGENERATE, render_reference

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_generated():
    committed = (ROOT / REFERENCE_FILE).read_text()
    assert committed == render_reference(), (
        f"{REFERENCE_FILE} is stale; regenerate it (and the CRD) from the repository root:\n  {REGENERATE}")


def test_cli_prints_the_reference():
    result = CliRunner().invoke(main, ["reference"])
    assert result.exit_code == 0
    assert result.output == render_reference()


def test_regeneration_command_is_documented_at_the_top():
    head = render_reference().split("## Contents")[0]
    assert REGENERATE in head


def schema_fields(node: dict, path: str):
    """(parent path, field name) of every property in the CRD schema, lists and maps included."""
    for key, sub in (node.get("properties") or {}).items():
        yield path, key
        yield from schema_fields(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from schema_fields(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_fields(node["additionalProperties"], f"{path}{{}}")


@functools.cache
def sections() -> dict[str, str]:
    """Every path a section documents (its heading and its 'Also at' paths) -> the section text."""
    out = {}
    for chunk in render_reference().split("\n## ")[1:]:
        heading, _, body = chunk.partition("\n")
        paths = [heading.strip()]
        for line in body.splitlines():
            if line.startswith("Also at "):
                paths += [p.strip("`., ") for p in line[len("Also at "):].split(", ")]
        for p in paths:
            out[p] = body
    return out


OPENAPI = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
FIELDS = [*schema_fields(OPENAPI["spec"], "spec"), *schema_fields(OPENAPI["status"], "status")]


@pytest.mark.parametrize("parent, name", FIELDS, ids=[f"{p}.{n}" for p, n in FIELDS])
def test_every_field_is_in_the_reference(parent, name):
    docs = sections()
    assert parent in docs, f"no section for {parent}"
    assert f"| `{name}` |" in docs[parent], f"{parent}.{name} is missing from {REFERENCE_FILE}"


def test_a_row_shows_type_default_allowed_and_description():
    docs = sections()
    row = next(line for line in docs["spec.runPolicy"].splitlines() if line.startswith("| `cleanPodPolicy` |"))
    assert row == ("| `cleanPodPolicy` | string | `Running` | one of `None`, `Running`, `All` | "
                   "Pods deleted when the job finishes: None, Running (still running) or All. |")
    rollout = docs["spec.roles.rollout"]
    assert "| `replicas` | integer | `1` | ≥ 0; ≤ 1024 |" in rollout
    assert "- `gpus`: must be divisible by tensorParallelSize" in rollout  # CEL rules, with their field
    assert "- `roles.rollout.replicas`: must be 0 when placement is colocated" in docs["spec"]
    assert "| `adamBetas` | []number | `[0.9, 0.999]` | exactly 2 items |" in docs["spec.runtime.training"]
    assert "| `runtime` | [RuntimeConfig](#spec-runtime) | required |" in docs["spec"]


def models(root: type[BaseModel]):
    """Every pydantic model reachable from `root` through its fields."""
    seen, todo = [], [root]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            stack = [f.annotation]
            while stack:
                a = stack.pop()
                if isinstance(a, type) and issubclass(a, BaseModel):
                    todo.append(a)
                stack.extend(typing.get_args(a))
    return seen


MODEL_FIELDS = [(m, name) for root in (api.RLJobSpec, api.RLJobStatus) for m in models(root) for name in m.model_fields]


@pytest.mark.parametrize("model, name", MODEL_FIELDS, ids=[f"{m.__name__}.{n}" for m, n in MODEL_FIELDS])
def test_every_model_field_has_a_one_line_description(model, name):
    description = model.model_fields[name].description or ""
    assert description.strip(), f"{model.__name__}.{name} needs Field(description=...): it is kubectl explain text"
    assert "\n" not in description and len(description) <= 200, f"{model.__name__}.{name}: keep it to one line"
