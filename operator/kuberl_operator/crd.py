"""Generate the RLJob CustomResourceDefinition from the pydantic API models.

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema. The
conversion inlines `$ref`s, turns `Optional[X]` into X, drops what structural schemas forbid
(`additionalProperties: false` next to `properties`, titles, `prefixItems`), rewrites numeric
`exclusiveMinimum` into the boolean form, and keeps only scalar defaults (so the API server
defaults what a reader of `kubectl get -o yaml` expects, and CEL rules see them).

`kuberl crd` prints the result; crds/kuberl.io_rljobs.yaml is that output, checked by a test.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kuberl_operator import api

CRD_FILE = "crds/kuberl.io_rljobs.yaml"
_DROP = {"title", "discriminator", "$schema"}
# api.parse_job's name rule, enforced at admission: the name becomes the Service's name (a DNS-1035
# label), pod hostnames `<job>-<role>-<index>` (at most 63 characters) and label values. CEL may
# read metadata.name at the schema's root, nothing else of metadata.
NAME_RULE = {
    "rule": f"self.metadata.name.size() <= {api.MAX_JOB_NAME} && "
            "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": f"metadata.name: must be a DNS-1035 label of at most {api.MAX_JOB_NAME} characters "
               "(pod names append -<role>-<index>)",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(s: dict[str, Any]) -> dict[str, Any]:
    s = dict(s)
    # Optional[X] -> X; the field is simply not required.
    for key in ("anyOf", "oneOf"):
        if key in s:
            options = [o for o in s.pop(key) if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express a union of {len(options)} types structurally: {options}")
            merged = {**options[0], **s}
            if s.get("default") is None:
                merged.pop("default", None)
            s = merged
    for k in _DROP:  # after the merge: X's own title would come back with it
        s.pop(k, None)
    if "const" in s:
        s["enum"] = [s.pop("const")]
    if "prefixItems" in s:  # fixed-length tuples of one type
        items = s.pop("prefixItems")
        s["items"] = items[0]
        s["minItems"] = s["maxItems"] = len(items)
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(s.get(bound), (int, float)) and not isinstance(s.get(bound), bool):
            s[plain] = s.pop(bound)
            s[bound] = True
    if "default" in s and not isinstance(s["default"], (str, int, float, bool)):
        s.pop("default")
    if s.get("default") is None:
        s.pop("default", None)
    if s.get("x-kubernetes-preserve-unknown-fields"):
        s["type"] = "object"
        s.pop("additionalProperties", None)
    if "properties" in s:
        s.pop("additionalProperties", None)
        s["type"] = "object"
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    elif s.get("additionalProperties") is True:
        s.pop("additionalProperties")
        s["x-kubernetes-preserve-unknown-fields"] = True
    if isinstance(s.get("items"), dict):
        s["items"] = _structural(s["items"])
    if s.get("type") == "array" and "items" not in s:
        s["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return s


def openapi_schema(model: type) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def build_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(api.RLJobSpec)
    spec_schema["description"] = api.RLJobSpec.__doc__.strip()
    status_schema = openapi_schema(api.RLJobStatus)
    status_schema["description"] = "Observed state of the job, written by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kuberl", "app.kubernetes.io/part-of": "kuberl"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "kuberl"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
                        {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps", "priority": 1},
                        {"name": "Reward", "type": "string", "jsonPath": ".status.progress.rewardMean"},
                        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
                        {"name": "Placement", "type": "string", "jsonPath": ".spec.placement", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "RLJob runs reinforcement-learning post-training of an LLM "
                            "(GRPO, PPO) as a gang of GPU pods per role.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [NAME_RULE],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated by `kuberl crd` from kuberl_operator.api. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
