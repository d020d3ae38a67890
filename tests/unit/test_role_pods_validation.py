"""Critic, reference and reward pods: what validates runs (role_servers), what cannot run is rejected
by pydantic (`kuberl validate`, the operator's planner) and by the CRD's CEL rule, naming the field."""

import pytest

from kuberl_operator.api import SpecError, parse_spec
from kuberl_operator.crd import build_crd

from factories import make_spec

PPO = {"algorithm": {"name": "ppo", "klCoef": 0.1}}


@pytest.mark.parametrize(
    "roles",
    [
        {"critic": {"replicas": 1}, "reference": {"replicas": 2}, "reward": {"replicas": 3}},
        {"critic": {"replicas": 0}},
        {"reference": {"replicas": 1, "gpus": 1}},
    ],
)
def test_role_pods_that_can_run_validate(roles):
    spec = parse_spec(make_spec(roles=roles, runtime=PPO))
    assert {r for r, _ in spec.roles.active()} == {"trainer"} | {r for r, rs in roles.items() if rs["replicas"]}


def test_a_critic_over_several_pods_is_rejected_naming_the_field():
    with pytest.raises(SpecError) as e:
        parse_spec(make_spec(roles={"critic": {"replicas": 2}}, runtime=PPO))
    assert ("spec.roles.critic.replicas: must be at most 1: the critic's optimizer state lives in one pod "
            "(a critic over several pods is not supported yet), got 2") in str(e.value)


def test_the_crd_rejects_it_too():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["fieldPath"]: r for r in schema["x-kubernetes-validations"] if "fieldPath" in r}
    rule = rules[".roles.critic.replicas"]
    assert rule["rule"] == "!has(self.roles) || !has(self.roles.critic) || self.roles.critic.replicas <= 1"
    assert rule["message"].startswith("must be at most 1")
