"""Generate docs/reference.md: every RLJob field with its type, default, allowed values and description.

The walk goes over the CRD's structural schema (what the API server enforces and `kubectl explain`
prints) and, beside it, over the pydantic models the schema came from, which still know the
defaults the CRD cannot carry (lists, maps, tuples). One section per object type; a type used at
several paths (RoleSpec under every role) is described once and lists its paths.

    kuberl reference > docs/reference.md     # tests/unit/test_reference.py fails when this drifts
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from kuberl_operator import api
from kuberl_operator.crd import CRD_FILE, openapi_schema

REFERENCE_FILE = "docs/reference.md"
REGENERATE = f"kuberl crd > {CRD_FILE} && kuberl reference > {REFERENCE_FILE}"

Obj = dict[str, Any]


@dataclass
class Row:
    name: str
    type: str
    default: str
    allowed: str
    description: str


@dataclass
class Section:
    paths: list[str]
    title: str  # the model's name, or the path for free-form objects
    doc: str
    rules: list[str]
    rows: list[Row] = field(default_factory=list)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """pydantic models inside an annotation: X, X | None, list[X], dict[str, X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            out.extend(_models_in(arg))
    return out


def _field(model: type[BaseModel] | None, alias: str) -> Any:
    if model is None:
        return None
    return next((f for n, f in model.model_fields.items() if (f.alias or n) == alias), None)


def _default(schema: Obj, f: Any, required: bool) -> str:
    if required:
        return "required"
    value = schema.get("default")
    if f is not None and not f.is_required():
        value = f.default_factory() if f.default_factory is not None else f.default
    if value is None or isinstance(value, BaseModel):
        return ""
    value = to_jsonable_python(value)
    return f"`{value}`" if isinstance(value, str) and value else f"`{json.dumps(value)}`"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _allowed(s: Obj) -> str:
    parts = []
    if "enum" in s:
        parts.append("one of " + ", ".join(f"`{v}`" for v in s["enum"]))
    if "minimum" in s:
        parts.append((">" if s.get("exclusiveMinimum") else "≥") + " " + _number(s["minimum"]))
    if "maximum" in s:
        parts.append(("<" if s.get("exclusiveMaximum") else "≤") + " " + _number(s["maximum"]))
    if "pattern" in s:
        parts.append(f"matches `{s['pattern']}`")
    for key, what in (("minLength", "at least {} characters"), ("maxLength", "at most {} characters")):
        if key in s:
            parts.append(what.format(s[key]))
    if "minItems" in s and s.get("minItems") == s.get("maxItems"):
        parts.append(f"exactly {s['minItems']} items")
    else:
        for key, what in (("minItems", "at least {} items"), ("maxItems", "at most {} items")):
            if key in s:
                parts.append(what.format(s[key]))
    items = s.get("items")
    if isinstance(items, dict) and _allowed(items) and "properties" not in items:
        parts.append("items: " + _allowed(items))
    return "; ".join(parts)


def _anchor(path: str) -> str:
    return path.replace(".", "-").replace("[]", "").replace("{}", "").lower()


class _Walk:
    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.by_model: dict[type[BaseModel], Section] = {}

    def object(self, path: str, s: Obj, model: type[BaseModel] | None) -> str:
        """Describe the object at `path` (once per model); return the anchor its rows link to."""
        if model is not None and model in self.by_model:
            section = self.by_model[model]
            section.paths.append(path)
            return _anchor(section.paths[0])
        doc = " ".join((model.__doc__ or "").split()) if model is not None and model.__doc__ else ""
        rules = [f"`{r['fieldPath'].lstrip('.')}`: {r['message']}" if r.get("fieldPath") else r["message"]
                 for r in s.get("x-kubernetes-validations", [])]
        section = Section([path], model.__name__ if model is not None else path, doc, rules)
        self.sections.append(section)
        if model is not None:
            self.by_model[model] = section
        required = set(s.get("required", []))
        for name, sub in s["properties"].items():
            f = _field(model, name)
            sub_models = _models_in(f.annotation) if f is not None else []
            section.rows.append(Row(
                name=name,
                type=self.type(f"{path}.{name}", sub, sub_models[0] if sub_models else None),
                default=_default(sub, f, name in required),
                allowed=_allowed(sub),
                description=sub.get("description", ""),
            ))
        return _anchor(path)

    def type(self, path: str, s: Obj, model: type[BaseModel] | None) -> str:
        if "properties" in s:
            return f"[{model.__name__ if model else 'object'}](#{self.object(path, s, model)})"
        t = s.get("type", "object")
        if t == "array":
            return "[]" + self.type(f"{path}[]", s["items"], model)
        if t == "object" and isinstance(s.get("additionalProperties"), dict):
            return "map[string]" + self.type(f"{path}{{}}", s["additionalProperties"], model)
        if t == "object":
            return "object (free-form)"
        return t


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    walk = _Walk()
    spec = openapi_schema(api.RLJobSpec)
    status = openapi_schema(api.RLJobStatus)
    walk.object("spec", spec, api.RLJobSpec)
    walk.object("status", status, api.RLJobStatus)
    out = [
        "<!-- Generated by `kuberl reference` from kuberl_operator.api and kuberl_runtime.config. "
        "Do not edit by hand. -->",
        "# RLJob reference",
        "",
        f"`apiVersion: {api.API_VERSION}`, `kind: {api.KIND}` (plural `{api.PLURAL}`, short name "
        f"`{api.SHORT_NAMES[0]}`), namespaced. Every field of `spec` and `status`, generated from the API "
        "models; `kubectl explain rljob.spec.<path>` prints the same descriptions from the cluster.",
        "",
        "`metadata.name` must be a DNS-1035 label (lower-case letters, digits and `-`, starting with a "
        f"letter) of at most {api.MAX_JOB_NAME} characters: it becomes the Service's name, the pods' "
        "`<job>-<role>-<index>` hostnames and label values (a CEL rule at the root of the CRD).",
        "",
        "Field names are the YAML names (camelCase). *Allowed* lists what the CRD schema and the "
        "operator enforce per field; *Rules* are cross-field checks, enforced by the API server "
        "(CEL) and again by `kuberl validate` and the operator. Derived defaults (\"Default: ... for "
        "grpo\") are filled in when the job is parsed.",
        "",
        "Regenerate this page and the CRD after changing a model (a unit test fails until you do):",
        "",
        "```sh",
        REGENERATE,
        "```",
        "",
        "## Contents",
        "",
    ]
    for sec in walk.sections:
        out.append(f"- [{sec.paths[0]}](#{_anchor(sec.paths[0])}) ({sec.title})")
    for sec in walk.sections:
        out += ["", f'<a id="{_anchor(sec.paths[0])}"></a>', "", f"## {sec.paths[0]}", ""]
        if len(sec.paths) > 1:
            out += ["Also at " + ", ".join(f"`{p}`" for p in sec.paths[1:]) + ".", ""]
        if sec.doc:
            out += [f"{sec.title}: {sec.doc}", ""]
        if sec.rules:
            out += ["Rules:", ""] + [f"- {r}" for r in sec.rules] + [""]
        out += ["| Field | Type | Default | Allowed | Description |", "|---|---|---|---|---|"]
        for r in sec.rows:
            out.append(f"| `{r.name}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.allowed)} | "
                       f"{_cell(r.description)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
