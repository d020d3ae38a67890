"""Shared by the `kuberl local` tests (test_local_roles, test_local_disaggregated): the tiny job's
runtime, the launcher's output captured, the metrics file read back without timings, and the env
the operator would give each process.

    doc = {"apiVersion": ..., "spec": {"roles": ..., "runtime": tiny_runtime(algorithm=..., training=...)}}
    out = Captured(); code = run_local_processes(doc, metrics_file=str(path), out=out)
    rows = read_metrics(path)    # one dict a step, timings dropped: equal across runs that learn the same
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Timings differ from run to run; everything else a step logs must not.
TIMINGS = ("time/", "rollout/tokens_per_s", "rollout/replica_tokens_per_s")


def tiny_runtime(**sections: dict[str, Any]) -> dict[str, Any]:
    """spec.runtime of the tiny local job: a 1-layer qwen2 on single-digit addition, rewarded by a
    rule, plus `sections` (algorithm, rollout, training, checkpoint: what each test varies)."""
    return {
        "model": {
            "init": {"architecture": "qwen2", "hiddenSize": 32, "numLayers": 1, "numHeads": 4,
                     "numKvHeads": 2, "intermediateSize": 64},
            "tokenizer": "builtin:arithmetic",
        },
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 9, "numExamples": 64}},
        # Odd digits anywhere in the completion: rewards vary from the first step, so the weights
        # really change from step to step.
        "reward": {"rule": "regex", "pattern": "[13579]"},
        **sections,
    }


class Captured:
    """The launcher's `out`: keeps every line it writes (`.text`) for asserts and failure messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.append(s)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.lines)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The --metrics-file rows, one a step, without TIMINGS."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMINGS)} for r in rows]


def operator_env(doc: dict[str, Any], keys: tuple[str, ...]) -> list[dict[str, str | None]]:
    """`keys` of the env the operator's build_env gives each process of the job, in launch order
    (a pod's env once per process it starts)."""
    from kuberl_operator import api, builders

    spec = api.parse_job(doc)
    ref = builders.JobRef(doc["metadata"]["name"], "default", "uid")
    expected = []
    for role, rs, first, per_pod in builders.process_layout(spec):
        for index in range(rs.replicas):
            env = {e["name"]: e.get("value") for e in builders.build_env(ref, spec, role, rs, index, first, per_pod, 0)}
            expected += [{k: env[k] for k in keys}] * per_pod
    return expected
