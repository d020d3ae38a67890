"""Whole scenarios: an RLJob created through the API really trains (operator -> pods -> pod runner ->
kuberl-runtime processes), with the tiny CPU model of e2e/jobs/. Everything is driven and observed
through the API (and, where only the machine can tell, through the processes and the checkpoint
directory the job's PersistentVolume maps to)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.devcluster.pytest_plugin import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
JOBS = Path(__file__).parent / "jobs"
Obj = dict[str, Any]


def load_job(file: str, **training: Any) -> Obj:
    """The file's RLJob (the tests create its checkpoint volume themselves: Scenario.apply)."""
    doc = next(d for d in yaml.safe_load_all((JOBS / file).read_text()) if d["kind"] == "RLJob")
    doc["spec"]["runtime"]["training"].update(training)
    return doc


class Scenario:
    """One RLJob in one namespace, seen through the API, plus its processes and checkpoint dir."""

    def __init__(self, api_client: client.ApiClient, ns: str, runner, operator, tmp: Path):
        self.core, self.custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        self.ns, self.runner, self.operator, self.tmp = ns, runner, operator, tmp
        self.name = ""
        self.checkpoints = tmp / "checkpoints"
        self.pv_name = ""

    # ------------------------------------------------------------------ setup
    def apply(self, job: Obj) -> Obj:
        """The job's checkpoint claim bound to a hostPath volume at self.checkpoints, then the job."""
        self.name = job["metadata"]["name"]
        claim = job["spec"]["runtime"]["checkpoint"]["volume"]["persistentVolumeClaim"]["claimName"]
        self.pv_name = f"{self.ns}-{claim}"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.core.create_persistent_volume({
            "metadata": {"name": self.pv_name},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(self.checkpoints)},
                     "claimRef": {"namespace": self.ns, "name": claim}}})
        self.core.create_namespaced_persistent_volume_claim(self.ns, {
            "metadata": {"name": claim},
            "spec": {"storageClassName": "", "accessModes": ["ReadWriteMany"], "volumeName": self.pv_name,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, job)

    def cleanup(self) -> None:
        if self.pv_name:
            try:
                self.core.delete_persistent_volume(self.pv_name)
            except ApiException as e:
                if e.status != 404:
                    raise

    # ------------------------------------------------------------------ what a user sees
    def job(self) -> Obj:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name)

    def status(self) -> Obj:
        return self.job().get("status") or {}

    def progress(self) -> Obj:
        return self.status().get("progress") or {}

    def pods(self) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"kuberl.io/job={self.name}").items

    def patch_spec(self, **spec: Any) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name, {"spec": spec})

    def wait(self, predicate, what: str, timeout: float = 120):
        """wait_for(predicate), failing at once (with diagnostics) if the job Failed meanwhile."""
        failed: list[Obj] = []

        def check():
            try:
                status = self.status()
            except ApiException as e:  # the job may be deleted on purpose
                if e.status != 404:
                    raise
                status = {}
            if status.get("phase") == "Failed":
                failed.append(status)
            return failed or predicate()

        try:
            result = wait_for(check, timeout=timeout, what=what, interval=0.25)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.diagnostics()}") from None
        if failed:
            raise AssertionError(f"the job Failed while waiting for {what}\n{self.diagnostics()}")
        return result

    def wait_phase(self, phase: str, timeout: float = 120) -> Obj:
        return self.wait(lambda: (s := self.status()).get("phase") == phase and s, f"phase {phase}", timeout)

    def diagnostics(self) -> str:
        logs = sorted((self.runner.work / "logs").glob(f"{self.ns}_*.log"))
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
        return (f"status: {self.status()}\npods: {[(p.metadata.name, p.status.phase) for p in self.pods()]}\n"
                f"{tails}\n--- operator log\n{self.operator.log()[-3000:]}")

    # ------------------------------------------------------------------ the machine
    def processes(self) -> dict[str, int]:
        return {k.split("/", 1)[1]: pid for k, pid in self.runner.processes().items() if k.startswith(f"{self.ns}/")}

    def pod_logs(self, pod: str) -> list[str]:
        """The output of every pod of that name, in start order (a gang restart reuses names)."""
        logs = sorted((self.runner.work / "logs").glob(f"{self.ns}_{pod}_*.log"))
        return [p.read_text(errors="replace") for p in logs]

    def log(self, pod: str) -> str:
        return self.pod_logs(pod)[-1]

    def latest_checkpoint(self) -> int | None:
        steps = [int(p.parent.name.removeprefix("step-")) for p in self.checkpoints.glob("step-*/COMPLETE")]
        return max(steps, default=None)

    def freeze_after_checkpoint(self, pod: str, step: int) -> int:
        """SIGSTOP the pod's processes once a complete checkpoint at `step` or later is on disk.

        Each check runs while the processes are stopped, so the run cannot finish between seeing the
        checkpoint and acting on it: status.progress.lastCheckpointStep lags the run by an operator
        poll and a status patch, and a fast run went through its last steps in that time. Returns the
        process group (SIGCONT resumes it, SIGKILL ends it).
        """
        pid = self.wait(lambda: self.processes().get(pod), f"pod {pod}'s process to start")

        def frozen():
            os.killpg(pid, signal.SIGSTOP)
            if (self.latest_checkpoint() or 0) >= step:
                return True
            os.killpg(pid, signal.SIGCONT)
            return False

        self.wait(frozen, f"a checkpoint at step {step} or later on disk")
        return pid


def session_members(leaders: list[int]) -> list[int]:
    """Every live process in the sessions (process groups) that the pod runner started."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            state, sid = fields[0], int(fields[3])
            if sid in leaders and state != "Z":
                out.append(int(entry.name))
    return out


# A reward function that holds the trainer: step s waits in its first reward call until the file
# `budget` in $GATE_DIR holds s or more. The trainer's HTTP thread keeps serving progress meanwhile.
GATE_REWARD = """
import os, time
from pathlib import Path

calls = 0

def reward(prompt, completion, row):
    global calls
    step = calls // int(os.environ["GATE_CALLS_PER_STEP"]) + 1
    while step > int((Path(os.environ["GATE_DIR"]) / "budget").read_text()):
        time.sleep(0.05)
    calls += 1
    return float(completion.strip().isdigit())
"""


class Gate:
    """Lets a job run up to a step and holds it there: `open_until(s)`."""

    def __init__(self, directory: Path, job: Obj):
        self.dir = directory
        self.dir.mkdir()
        (self.dir / "gatereward.py").write_text(GATE_REWARD)
        self.open_until(0)
        runtime = job["spec"]["runtime"]
        runtime["reward"] = {"function": "gatereward:reward"}
        trainers = job["spec"]["roles"]["trainer"].get("replicas", 1)  # CPU pods: one process each
        per_step = runtime["training"]["globalBatchSize"] * runtime["algorithm"]["samplesPerPrompt"] // trainers
        job["spec"].setdefault("env", []).extend([
            {"name": "PYTHONPATH", "value": str(self.dir)},
            {"name": "GATE_DIR", "value": str(self.dir)},
            {"name": "GATE_CALLS_PER_STEP", "value": str(per_step)},
        ])

    def open_until(self, step: int) -> None:
        tmp = self.dir / "budget.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, self.dir / "budget")  # the reward never reads a half-written number


def steps_logged(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/\d+", log, flags=re.M)]


@pytest.fixture
def scenario(e2e_api, e2e_namespace, pod_runner, e2e_operator, tmp_path):
    s = Scenario(e2e_api, e2e_namespace, pod_runner, e2e_operator, tmp_path)
    yield s
    s.cleanup()


def test_colocated_grpo_trains_to_success(scenario):
    total = 40
    job = load_job("grpo-colocated.yaml", totalSteps=total)
    # The run is held after step 2 and after step 4, so status.progress is seen advancing while
    # Running however fast the steps are (40 of them take ~2 s, about two of the operator's reads).
    gate = Gate(scenario.tmp / "gate", job)
    scenario.apply(job)

    def running_at(step: int):
        status = scenario.status()
        return status.get("phase") == "Running" and (status.get("progress") or {}).get("step") == step and status

    seen: list[int] = []  # steps read from status.progress while the job ran
    for held_after in (2, 4):
        gate.open_until(held_after)
        status = scenario.wait(partial(running_at, held_after), f"status.progress.step {held_after} while Running")
        seen.append(status["progress"]["step"])
        assert status["progress"]["rewardMean"] is not None and status["progress"]["totalSteps"] == total
    gate.open_until(total)
    status = scenario.wait_phase("Succeeded")

    assert seen == sorted(seen) and seen[0] < seen[-1] <= total
    assert status.get("restarts", 0) == 0
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Succeeded"] == ["TrainerSucceeded"]
    assert scenario.latest_checkpoint() == total
    assert steps_logged(scenario.log("grpo-colocated-trainer-0")) == list(range(1, total + 1))
    scenario.wait(lambda: not scenario.processes(), "every process of the job to end", timeout=30)


def test_disaggregated_two_trainers_one_rollout_succeeds(scenario):
    total = 8
    job = load_job("grpo-disaggregated.yaml", totalSteps=total)
    # Held in the first step's reward (both trainers), so the pods are seen Ready (readiness
    # probes) while the job runs, however short the run: waiting for phase Running and reading the
    # roles then raced a run that was over between two reads.
    gate = Gate(scenario.tmp / "gate", job)
    scenario.apply(job)

    def all_ready():
        status = scenario.status()
        roles = {role: (c.get("ready"), c.get("total")) for role, c in (status.get("roles") or {}).items()}
        return status.get("phase") == "Running" and roles == {"trainer": (2, 2), "rollout": (1, 1)} and status

    scenario.wait(all_ready, "phase Running with 2 of 2 trainer and 1 of 1 rollout pods Ready", timeout=90)
    gate.open_until(total)
    scenario.wait_phase("Succeeded", timeout=180)

    assert scenario.latest_checkpoint() == total
    assert steps_logged(scenario.log("grpo-disaggregated-trainer-0")) == list(range(1, total + 1))
    # The rollout pod really served generation and loaded every step's weights from the trainers.
    assert f"weights version {total} loaded" in scenario.log("grpo-disaggregated-rollout-0")
    scenario.wait(lambda: not scenario.processes(), "every process of the job to end", timeout=30)


def test_killed_trainer_restarts_gang_and_resumes_from_checkpoint(scenario):
    total = 40
    scenario.apply(load_job("grpo-colocated.yaml", totalSteps=total))
    pid = scenario.freeze_after_checkpoint("grpo-colocated-trainer-0", 5)
    os.killpg(pid, signal.SIGKILL)

    status = scenario.wait_phase("Succeeded", timeout=180)
    assert status["restarts"] == 1
    assert status["failure"]["exitCode"] == 137 and status["failure"]["pod"] == "grpo-colocated-trainer-0"
    first, second = scenario.pod_logs("grpo-colocated-trainer-0")
    killed_at = steps_logged(first)[-1]
    resumed = int(re.search(r"resumed from checkpoint step (\d+)", second).group(1))
    assert resumed % 5 == 0 and 5 <= resumed <= killed_at
    # Exactly the remaining steps, once each, and the final checkpoint at the last step.
    assert steps_logged(second) == list(range(resumed + 1, total + 1))
    assert scenario.latest_checkpoint() == total
    assert status["progress"]["resumedFromStep"] == resumed
    scenario.wait(lambda: not scenario.processes(), "every process of the job to end", timeout=30)


def test_suspend_mid_run_then_resume_and_finish(scenario):
    total = 40
    scenario.apply(load_job("grpo-colocated.yaml", totalSteps=total))
    # Frozen until the operator has asked for the pod's deletion, so the run cannot end first; the
    # runner's SIGTERM waits for SIGCONT and is the first thing the trainer sees.
    pid = scenario.freeze_after_checkpoint("grpo-colocated-trainer-0", 5)

    scenario.patch_spec(suspend=True)
    scenario.wait(lambda: all(p.metadata.deletion_timestamp for p in scenario.pods()),
                  "the operator to delete the pods")
    with contextlib.suppress(ProcessLookupError):  # the runner may have SIGKILLed it after the grace period
        os.killpg(pid, signal.SIGCONT)
    scenario.wait_phase("Suspended", timeout=60)
    scenario.wait(lambda: not scenario.pods() and not scenario.processes(), "no pods and no processes", timeout=60)
    suspended_at = scenario.latest_checkpoint()
    assert suspended_at is not None and suspended_at < total

    scenario.patch_spec(suspend=False)
    status = scenario.wait_phase("Succeeded", timeout=180)
    assert status.get("restarts", 0) == 0  # a suspension is not a failure
    resumed = int(re.search(r"resumed from checkpoint step (\d+)", scenario.log("grpo-colocated-trainer-0")).group(1))
    assert resumed >= suspended_at
    assert scenario.latest_checkpoint() == total


def test_delete_mid_run_leaves_nothing_behind(scenario):
    scenario.apply(load_job("grpo-disaggregated.yaml", totalSteps=200))
    scenario.wait(lambda: (scenario.progress().get("step") or 0) >= 1, "training to start")
    leaders = list(scenario.processes().values())
    assert len(leaders) == 3

    scenario.custom.delete_namespaced_custom_object(GROUP, VERSION, scenario.ns, PLURAL, scenario.name)

    scenario.wait(lambda: not scenario.pods(), "the job's pods to be deleted", timeout=90)
    scenario.wait(lambda: not session_members(leaders), "every process (and child) of the job to end", timeout=30)
    assert not scenario.processes()

    def no_children():
        left = {
            "rljobs": scenario.custom.list_namespaced_custom_object(GROUP, VERSION, scenario.ns, PLURAL)["items"],
            "configmaps": [c.metadata.name for c in scenario.core.list_namespaced_config_map(
                scenario.ns, label_selector=f"kuberl.io/job={scenario.name}").items],
            "services": [s.metadata.name for s in scenario.core.list_namespaced_service(scenario.ns).items],
        }
        if any(left.values()):
            raise AssertionError(f"left behind: {left}")
        return True

    scenario.wait(no_children, "the job and its children to be gone", timeout=60)
