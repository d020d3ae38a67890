"""The collective timeout of the job's process groups: read from the env contract, never below the
rendezvous timeout, and settable by users through the RLJob's `spec.env`.

The groups themselves (their timeout applied, a real gloo collective timing out) are tested in
tests/integration/test_rendezvous.py.
"""

from __future__ import annotations

import pytest

from kuberl_operator.builders import JobRef, build_pod
from kuberl_runtime import contract
from kuberl_runtime.distributed import collective_timeout

from factories import JOB, NS, UID, parsed

RDV, COLL = contract.ENV_RENDEZVOUS_TIMEOUT, contract.ENV_COLLECTIVE_TIMEOUT


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, 600),  # both defaults: 10 min, torch's NCCL default (gloo's would be 30 min)
        ({COLL: "1800"}, 1800),  # long generations: wait longer
        ({COLL: "60"}, 600),  # never below the rendezvous timeout (600 by default)
        ({COLL: "60", RDV: "30"}, 60),
        ({RDV: "900"}, 900),  # a longer rendezvous timeout lengthens the collectives' too
        ({COLL: "", RDV: "120"}, 600),  # empty: the default
    ],
)
def test_collective_timeout_from_the_env(env: dict[str, str], seconds: int):
    assert collective_timeout(contract.Topology.from_env(env)) == seconds


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


def test_spec_env_reaches_every_process_of_the_job():
    spec = parsed(env=[{"name": COLL, "value": "2400"}],
                  placement="disaggregated", roles={"trainer": {"replicas": 2}, "rollout": {"replicas": 1}})
    for role in ("trainer", "rollout"):
        pod = build_pod(JobRef(JOB, NS, UID), spec, role, 0, restart=0, spec_hash="h")
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
        assert collective_timeout(contract.Topology.from_env(env)) == 2400, role
