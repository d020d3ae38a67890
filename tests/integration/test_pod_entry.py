"""`kuberl-runtime` as a pod runs it: real processes with the environment the operator injects.

- A trainer pod with KUBERL_LOCAL_WORLD_SIZE=2 starts two processes that train together (one
  gloo group) and exits 0; when one fails, the pod exits with that process's classified code and
  message and the other process ends; SIGTERM to the pod's process reaches both.
- Two trainer pods (one process each) both answer /readyz 200 on their own HTTP ports while they
  train, and each leaves its final progress in its termination message.

The reward function (written into tmp_path) records each process's pid, fails on purpose on the
job rank in $FAIL_RANK, and waits for the file `go` before scoring: the tests look at the pods
while training is held there, without timing assumptions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kuberl_runtime.contract import EXIT_CONFIG_ERROR, parse_termination_message
from procs import free_port, stop_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ENTRY = str(Path(sys.executable).parent / "kuberl-runtime")
STEPS = 3
REWARD = '''
import os, time
from pathlib import Path

def reward(prompt, completion, row):
    d = Path(os.environ["POD_TEST_DIR"])
    rank = int(os.environ["KUBERL_RANK"]) + int(os.environ.get("LOCAL_RANK") or 0)
    pid = d / f"pid-{rank}"
    if not pid.exists():
        pid.write_text(str(os.getpid()))
    if os.environ.get("FAIL_RANK") == str(rank):
        raise ValueError("fails on purpose")
    while not (d / "go").exists():
        time.sleep(0.05)
    return float(len(completion) % 2)
'''


def write_config(tmp: Path) -> Path:
    (tmp / "podreward.py").write_text(REWARD)
    cfg = {
        "model": {"init": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "numKvHeads": 1, "intermediateSize": 32},
                  "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 4, "numExamples": 64}},
        "algorithm": {"name": "grpo", "samplesPerPrompt": 4},
        "rollout": {"maxNewTokens": 2},
        "training": {"totalSteps": STEPS, "globalBatchSize": 4, "microBatchSize": 8, "lr": 1e-2},
        "reward": {"function": "podreward:reward", "pythonPath": [str(tmp)]},
        "checkpoint": {"dir": str(tmp / "ckpt"), "interval": 100},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STARTED: list[Pod] = []


@pytest.fixture(autouse=True)
def stop_pods():
    """Whatever a test leaves running (it failed or timed out mid-way) ends with it, children included."""
    yield
    while STARTED:
        stop_tree(STARTED.pop().proc)


class Pod:
    """One `kuberl-runtime` process with a trainer pod's environment (build_env's variables)."""

    def __init__(self, tmp: Path, config: Path, *, index: int, replicas: int, per_pod: int, master_port: int,
                 extra: dict[str, str] | None = None):
        self.http_port = free_port()
        self.termination_log = tmp / f"termination-log-{index}"
        self.termination_log.touch()  # the kubelet creates it; the runtime writes only where it exists
        self.output = tmp / f"pod-{index}.log"
        world = replicas * per_pod
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERL_") and k != "LOCAL_RANK"}
        env.update({
            "KUBERL_CONFIG": str(config), "KUBERL_JOB": "pod-entry", "KUBERL_NAMESPACE": "test",
            "KUBERL_ROLE": "trainer", "KUBERL_ROLE_RANK": str(index), "KUBERL_ROLE_REPLICAS": str(replicas),
            "KUBERL_RANK": str(index * per_pod), "KUBERL_LOCAL_WORLD_SIZE": str(per_pod),
            "KUBERL_WORLD_SIZE": str(world), "KUBERL_TRAINER_WORLD_SIZE": str(world), "KUBERL_ROLLOUT_REPLICAS": "0",
            "KUBERL_MASTER_ADDR": "127.0.0.1", "KUBERL_MASTER_PORT": str(master_port), "KUBERL_PLACEMENT": "colocated",
            "KUBERL_GPUS": str(per_pod), "KUBERL_RESTART": "0", "KUBERL_POD_IP": "127.0.0.1",
            "KUBERL_RENDEZVOUS_TIMEOUT": "60", "KUBERL_HTTP_PORT": str(self.http_port),
            "KUBERL_TERMINATION_LOG": str(self.termination_log), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "POD_TEST_DIR": str(tmp), **(extra or {}),
        })
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen([ENTRY], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
        STARTED.append(self)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                stop_tree(self.proc)

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def termination(self):
        return parse_termination_message(self.termination_log.read_text())


def wait_for(predicate, pods: list[Pod], what: str, limit_s: float = 90) -> None:
    """Poll until predicate() holds; fail (with the pods' output) if a pod exits first or it never does."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        exited = [p for p in pods if p.proc.poll() is not None]
        if exited or time.monotonic() > deadline:
            logs = "\n".join(f"--- pod {i} (exit {p.proc.poll()})\n{p.log()[-3000:]}" for i, p in enumerate(pods))
            pytest.fail(f"never saw {what}\n{logs}")
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def pids(tmp: Path, ranks: range) -> list[int]:
    return [int((tmp / f"pid-{r}").read_text()) for r in ranks]


def test_two_trainer_pods_are_ready_while_training_and_leave_their_final_progress(tmp_path):
    config, port = write_config(tmp_path), free_port()
    pods = [Pod(tmp_path, config, index=i, replicas=2, per_pod=1, master_port=port) for i in range(2)]
    try:
        # Training is held in the first reward call: both pods must be Ready by then.
        wait_for(lambda: all(p.get("/readyz")[0] == 200 for p in pods), pods, "both pods ready")
        status, body = pods[1].get("/progress")
        doc = json.loads(body)
        assert status == 200 and doc["rank"] == 1 and doc["totalSteps"] == STEPS and doc["state"] != "failed"
        assert pods[1].get("/metrics")[0] == 200 and pods[1].get("/healthz")[0] == 200
        assert json.loads(pods[0].get("/progress")[1])["rank"] == 0
        (tmp_path / "go").touch()
        codes = [p.wait() for p in pods]
        assert codes == [0, 0], "\n".join(p.log()[-3000:] for p in pods)
    finally:
        for p in pods:
            p.wait(timeout=1) if p.proc.poll() is None else None
    for rank, pod in enumerate(pods):
        progress, message = pod.termination()
        assert progress is not None, pod.termination_log.read_text()
        assert (progress.state, progress.step, progress.total_steps, progress.rank) == ("succeeded", STEPS, STEPS, rank)
        assert progress.last_checkpoint_step == STEPS and progress.reward_mean is not None
        assert message == f"succeeded at step {STEPS} of {STEPS}"


def test_a_pod_with_two_gpus_starts_two_processes_that_train_together(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "go").touch()
    pod = Pod(tmp_path, config, index=0, replicas=1, per_pod=2, master_port=free_port())
    code = pod.wait()
    assert code == 0, pod.log()[-4000:]
    p0, p1 = pids(tmp_path, range(2))  # ranks 0 and 1 of one gloo group: child processes of the pod
    assert len({p0, p1, pod.proc.pid}) == 3
    assert "[trainer-0]" in pod.log() and "starting 2 trainer processes (ranks 0..1)" in pod.log()
    progress, message = pod.termination()
    assert (progress.state, progress.step, progress.rank) == ("succeeded", STEPS, 0), pod.log()[-4000:]


def test_a_failing_process_fails_the_pod_with_its_code_and_message_and_ends_the_other(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "go").touch()
    pod = Pod(tmp_path, config, index=0, replicas=1, per_pod=2, master_port=free_port(), extra={"FAIL_RANK": "1"})
    code = pod.wait()
    assert code == EXIT_CONFIG_ERROR, pod.log()[-4000:]
    progress, message = pod.termination()
    assert "fails on purpose" in message and "(change runtime.reward)" in message
    assert (progress.state, progress.rank) == ("failed", 1) and progress.message == message
    assert all(gone(pid) for pid in pids(tmp_path, range(2)))


def test_sigterm_to_the_pod_stops_its_processes(tmp_path):
    config = write_config(tmp_path)  # no `go`: both processes wait in their first reward call
    pod = Pod(tmp_path, config, index=0, replicas=1, per_pod=2, master_port=free_port())
    wait_for(lambda: all((tmp_path / f"pid-{r}").exists() for r in range(2)) and pod.get("/readyz")[0] == 200,
             [pod], "both processes training and the pod ready")
    pod.proc.send_signal(signal.SIGTERM)
    assert pod.wait(timeout=60) == 128 + signal.SIGTERM, pod.log()[-4000:]
    assert all(gone(pid) for pid in pids(tmp_path, range(2)))
    assert "terminated (SIGTERM)" in pod.termination()[1]


def test_a_pod_process_killed_outright_takes_its_processes_with_it(tmp_path):
    """SIGKILL (the OOM killer, say) leaves kuberl-runtime no time to stop its processes: they die
    with it instead of waiting on (here: for `go`, forever) with nobody to report to."""
    config = write_config(tmp_path)  # no `go`: both processes wait in their first reward call
    pod = Pod(tmp_path, config, index=0, replicas=1, per_pod=2, master_port=free_port())
    wait_for(lambda: all((tmp_path / f"pid-{r}").exists() for r in range(2)), [pod], "both processes training")
    children = pids(tmp_path, range(2))
    pod.proc.kill()
    pod.proc.wait()
    try:
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if running(pid)], "processes outlived their pod's main process"
    finally:
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps for init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
