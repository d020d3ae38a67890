"""`kuberl local` runs critic, reference and reward pods as local processes (gloo/CPU), and a job
with them learns what the colocated job learns: every logged metric equal, step after step.

Also: the processes get the env the operator injects (and every rank's role is named in rendezvous
errors), and a critic pod resumes with its trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from local_jobs import Captured, operator_env, read_metrics, tiny_runtime

pytestmark = pytest.mark.integration


def job(tmp_path: Path, *, algorithm: dict, roles: dict, steps: int, resume: bool = False, trainers: int = 1) -> dict:
    return {
        "apiVersion": "kuberl.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "tiny-roles"},
        "spec": {
            "roles": {"trainer": {"replicas": trainers, "gpus": 0}, **roles},
            "runtime": tiny_runtime(
                algorithm=algorithm,
                # Equal response lengths: each trainer rank's token count is the same, so the
                # critic pod's whole-mini-batch stats equal the colocated per-rank average exactly.
                rollout={"maxNewTokens": 4, "ignoreEos": True},
                training={"totalSteps": steps, "globalBatchSize": 4, "microBatchSize": 2, "lr": 1.0e-2,
                          "criticLr": 1.0e-2},
                checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 1, "resume": resume},
            ),
        },
    }


def run(doc: dict, metrics: Path) -> tuple[list[dict], str]:
    from kuberl_runtime.launch import run_local_processes

    out = Captured()
    code = run_local_processes(doc, metrics_file=str(metrics), out=out)
    assert code == 0, out.text
    return read_metrics(metrics), out.text


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (w["step"], k)


def test_grpo_with_reference_pods_equals_colocated(tmp_path):
    """GRPO with a KL penalty: 2 reference pods (each trainer batch split over them) == colocated."""
    algo = {"name": "grpo", "samplesPerPrompt": 4, "klCoef": 0.5}
    remote, text = run(job(tmp_path / "r", algorithm=algo, roles={"reference": {"replicas": 2, "gpus": 0}}, steps=2),
                       tmp_path / "r.jsonl")
    assert "3 processes (1 trainer, 2 reference)" in text
    assert "kuberl reference 1: the trainer is done after 2 requests" in text  # both replicas served
    local, _ = run(job(tmp_path / "c", algorithm=algo, roles={}, steps=2), tmp_path / "c.jsonl")
    assert local[-1]["train/kl"] > 0  # the KL term is live, so the reference's log-probs matter
    assert_same_metrics(remote, local)


PPO = {"name": "ppo", "samplesPerPrompt": 1, "klCoef": 0.5}
PODS = {"critic": {"replicas": 1, "gpus": 0}, "reference": {"replicas": 1, "gpus": 0}, "reward": {"replicas": 1, "gpus": 0}}


def test_ppo_with_critic_reference_and_reward_pods_equals_colocated_and_resumes(tmp_path):
    """2 trainer ranks + critic, reference and reward pods == 2 colocated trainer ranks (the critic
    pod steps once over both ranks' mini-batch); stopped after step 2 (a finished 2-step run), the
    job resumes trainer and critic together and ends where the straight run does."""
    remote, text = run(job(tmp_path / "r", algorithm=PPO, roles=PODS, steps=3, trainers=2), tmp_path / "r.jsonl")
    assert "5 processes (2 trainer, 1 critic, 1 reference, 1 reward)" in text
    local, _ = run(job(tmp_path / "c", algorithm=PPO, roles={}, steps=3, trainers=2), tmp_path / "c.jsonl")
    assert local[-1]["critic/value_loss"] != local[0]["critic/value_loss"]
    assert_same_metrics(remote, local)

    part = tmp_path / "p"
    first, _ = run(job(part, algorithm=PPO, roles=PODS, steps=2, trainers=2), tmp_path / "p1.jsonl")
    assert sorted(p.name for p in (part / "ckpt" / "critic").iterdir()) == [
        "optimizer-step-00000001.pt", "optimizer-step-00000002.pt"]  # keep (1) + 1 for a save that fails
    rest, text = run(job(part, algorithm=PPO, roles=PODS, steps=3, resume=True, trainers=2), tmp_path / "p2.jsonl")
    assert "kuberl critic: restored its state after 2 optimizer steps" in text
    assert [m["step"] for m in rest] == [3]
    assert_same_metrics(first + rest, remote)


CONTRACT_KEYS = ("KUBERL_ROLE", "KUBERL_ROLE_RANK", "KUBERL_ROLE_REPLICAS", "KUBERL_RANK", "KUBERL_LOCAL_WORLD_SIZE",
                 "KUBERL_WORLD_SIZE", "KUBERL_TRAINER_WORLD_SIZE", "KUBERL_ROLLOUT_REPLICAS", "KUBERL_CRITIC_REPLICAS",
                 "KUBERL_REFERENCE_REPLICAS", "KUBERL_REWARD_REPLICAS", "KUBERL_PLACEMENT", "KUBERL_GPUS")


@pytest.mark.parametrize(
    ("placement", "roles"),
    [
        ("colocated", {"trainer": {"replicas": 2, "gpus": 0}, **PODS}),
        ("disaggregated", {"trainer": {"replicas": 1, "gpus": 2}, "rollout": {"replicas": 2, "gpus": 1},
                           "reference": {"replicas": 2, "gpus": 1}, "reward": {"replicas": 1, "gpus": 1}}),
    ],
)
def test_local_processes_get_the_env_the_operator_injects(tmp_path, placement, roles):
    """kuberl local's process env == the operator's build_env, and every rank names its role."""
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import describe_rank
    from kuberl_runtime.launch import plan_processes

    doc = job(tmp_path, algorithm=PPO, roles={}, steps=1)
    doc["spec"].update(placement=placement, roles=roles)
    procs = plan_processes(doc, "config.yaml", master_port=29500, gpu_count=0)
    assert [{k: p.env[k] for k in CONTRACT_KEYS} for p in procs] == operator_env(doc, CONTRACT_KEYS)
    for p in procs:
        topo = Topology.from_env(p.env)
        rank = topo.rank + int(p.env["LOCAL_RANK"])
        assert describe_rank(rank, topo)[0] == p.role



def test_a_reward_pod_that_cannot_start_fails_the_job_at_once_with_its_cause(tmp_path):
    """The reward pod's function does not import: it leaves the error in the store and the trainer
    fails with the same ConfigError (exit 78, field named) instead of waiting for the pod's address."""
    from kuberl_runtime.launch import run_local_processes

    doc = job(tmp_path, algorithm={"name": "grpo", "samplesPerPrompt": 4}, roles={"reward": {"replicas": 1, "gpus": 0}},
              steps=2)
    doc["spec"]["runtime"]["reward"] = {"function": "no_such_module:score"}
    out = Captured()
    assert run_local_processes(doc, out=out) == 78, out.text
    assert ("[trainer-0] kuberl-runtime: ConfigError: reward rank 0 could not start: cannot import reward function "
            "'no_such_module:score'") in out.text
    assert "(change runtime.reward.function)" in out.text
