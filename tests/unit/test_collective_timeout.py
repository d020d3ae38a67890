"""The collective timeout of the job's process groups: read from the env contract, never below the
rendezvous timeout, and settable by users through the RLJob's `spec.env`.

The groups themselves (their timeout applied, a real gloo collective timing out) are tested in
tests/integration/test_rendezvous.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kuberl_operator.builders import JobRef, build_pod
from kuberl_runtime import contract
from kuberl_runtime.distributed import collective_timeout

from factories import JOB, NS, UID, parsed

RDV, COLL = contract.ENV_RENDEZVOUS_TIMEOUT, contract.ENV_COLLECTIVE_TIMEOUT


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, 1800),  # both defaults: 30 min, what torch gave the trainer and sync groups before
        ({COLL: "3600"}, 3600),  # long generations: wait longer
        ({COLL: "60"}, 600),  # never below the rendezvous timeout (600 by default)
        ({COLL: "60", RDV: "30"}, 60),
        ({RDV: "2400"}, 2400),  # a longer rendezvous timeout lengthens the collectives' too
        ({COLL: "", RDV: "120"}, 1800),  # empty: the default
    ],
)
def test_collective_timeout_from_the_env(env: dict[str, str], seconds: int):
    assert collective_timeout(contract.Topology.from_env(env)) == seconds


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl"])  # CPU machines, GPU machines
def test_the_default_is_not_shorter_than_what_torch_gave_the_groups_before(backend: str):
    # Before every group got this timeout, the trainer and sync groups (new_group without a timeout) had
    # torch's default for the job's backend: 30 min, on both legs of "cpu:gloo,cuda:nccl" too (10 min is
    # a plain "nccl" backend's). Colocated generation can keep a trainer rank out of the trainer group's
    # next collective that long, so the default must not cut it short.
    from torch.distributed.distributed_c10d import Backend, _get_default_timeout

    before = _get_default_timeout(Backend(backend)).total_seconds()
    assert collective_timeout(contract.Topology.from_env({})) >= before == 1800


def test_an_explicit_rendezvous_timeout_takes_part_too():
    topo = contract.Topology.from_env({COLL: "20"})
    assert collective_timeout(topo, rendezvous_timeout_s=45) == 45
    assert collective_timeout(topo, rendezvous_timeout_s=5) == 20


@pytest.mark.parametrize(("raw", "message"), [
    ("0", f"{COLL}=0 must be at least 1 (seconds)"),
    ("-5", f"{COLL}=-5 must be at least 1 (seconds)"),
    ("10m", f"{COLL}='10m' is not an integer"),
])
def test_invalid_collective_timeouts_are_refused_naming_the_variable(raw: str, message: str):
    with pytest.raises(ValueError) as e:
        contract.Topology.from_env({COLL: raw})
    assert str(e.value) == message


def test_an_invalid_timeout_from_spec_env_is_a_config_error_of_the_pod(tmp_path: Path):
    # Every gang restart would read the same value: exit 78 (not retried) naming spec.env, not exit 1.
    log = tmp_path / "termination-log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERL_")}
    env.update({COLL: "10m", contract.ENV_TERMINATION_LOG: str(log)})
    entry = Path(sys.executable).parent / "kuberl-runtime"
    proc = subprocess.run([str(entry)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == contract.EXIT_CONFIG_ERROR, proc.stderr[-2000:]
    assert f"ConfigError: {COLL}='10m' is not an integer (change spec.env)" in log.read_text()


def test_spec_env_reaches_every_process_of_the_job():
    spec = parsed(env=[{"name": COLL, "value": "2400"}],
                  placement="disaggregated", roles={"trainer": {"replicas": 2}, "rollout": {"replicas": 1}})
    for role in ("trainer", "rollout"):
        pod = build_pod(JobRef(JOB, NS, UID), spec, role, 0, restart=0, spec_hash="h")
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
        assert collective_timeout(contract.Topology.from_env(env)) == 2400, role
