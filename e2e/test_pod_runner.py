"""The pod runner on its own (no operator, no runtime): plain pods running `python -c ...`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kubernetes import client

from e2e.conftest import RUNNER_SELECTOR, RUNNER_TOLERATION
from e2e.pod_runner import RUNNER_KEY
from kuberl_operator.devcluster.pytest_plugin import wait_for
from kuberl_runtime.contract import parse_termination_message

pytestmark = pytest.mark.e2e


def make_pod(name: str, script: str, *, env: list[dict] | None = None, volumes: list[dict] | None = None,
             mounts: list[dict] | None = None, grace: int = 30, working_dir: str | None = None,
             readiness_path: str | None = None) -> dict:
    probe = {"readinessProbe": {"httpGet": {"path": readiness_path, "port": "http"}}} if readiness_path else {}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "nodeSelector": RUNNER_SELECTOR, "tolerations": [RUNNER_TOLERATION],
                     "terminationGracePeriodSeconds": grace,
                     "containers": [{"name": "main", "image": "python", "command": [sys.executable, "-c"],
                                     "args": [textwrap.dedent(script)], "env": env or [],
                                     "terminationMessagePolicy": "FallbackToLogsOnError",
                                     "volumeMounts": mounts or [],
                                     "ports": [{"name": "http", "containerPort": 8470}], **probe,
                                     **({"workingDir": working_dir} if working_dir else {})}],
                     "volumes": volumes or []}}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def phase(core: client.CoreV1Api, ns: str, name: str, want: str):
    pod = core.read_namespaced_pod(name, ns)
    if pod.status.phase != want:  # wait_for shows the last exception on timeout
        raise AssertionError(f"pod {name}: phase {pod.status.phase} ({pod.status.reason}: {pod.status.message}), "
                             f"node {pod.spec.node_name}, "
                             f"conditions {pod.status.conditions}, containers {pod.status.container_statuses}")
    return pod


def test_pod_runs_with_env_and_config_then_succeeds(pod_runner, e2e_api, e2e_namespace, tmp_path):
    core = client.CoreV1Api(e2e_api)
    core.create_namespaced_config_map(e2e_namespace, {"metadata": {"name": "cfg"},
                                                      "data": {"config.yaml": "dir: /data/out\n"}})
    gate = tmp_path / "go"
    script = f"""
        import os, pathlib, time
        print("name", os.environ["POD_NAME"], "ns", os.environ["POD_NS"], "ip", os.environ["POD_IP"])
        print("master", os.environ["MASTER"], "greeting", os.environ["GREETING"])
        print("config", pathlib.Path(os.environ["CONFIG"]).read_text().strip())
        pathlib.Path("inner/hello.txt").write_text("hi")  # relative to workingDir /work
        while not pathlib.Path({str(gate)!r}).exists():
            time.sleep(0.05)
    """
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "MASTER", "value": f"job-trainer-0.job.{e2e_namespace}.svc"},
           {"name": "GREETING", "value": "hello $(POD_NAME)"},
           {"name": "CONFIG", "value": "/etc/app/config.yaml"}]
    core.create_namespaced_pod(e2e_namespace, make_pod(
        "ok", script, env=env, volumes=[{"name": "cfg", "configMap": {"name": "cfg"}},
                                        {"name": "data", "emptyDir": {}}, {"name": "work", "emptyDir": {}},
                                        {"name": "inner", "emptyDir": {}}],
        mounts=[{"name": "cfg", "mountPath": "/etc/app"}, {"name": "data", "mountPath": "/data"},
                {"name": "work", "mountPath": "/work"}, {"name": "inner", "mountPath": "/work/inner"}],
        working_dir="/work"))

    running = wait_for(lambda: phase(core, e2e_namespace, "ok", "Running"), timeout=30, what="pod ok Running")
    assert running.status.pod_ip == "127.0.0.1"
    assert running.spec.node_name == "e2e-runner"
    assert running.status.container_statuses[0].state.running is not None
    assert f"{e2e_namespace}/ok" in pod_runner.processes()
    gate.touch()

    done = wait_for(lambda: phase(core, e2e_namespace, "ok", "Succeeded"), timeout=30, what="pod ok Succeeded")
    terminated = done.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    log = next((pod_runner.work / "logs").glob(f"{e2e_namespace}_ok_*.log")).read_text()
    assert f"name ok ns {e2e_namespace} ip 127.0.0.1" in log
    assert "master 127.0.0.1 greeting hello ok" in log
    # The ConfigMap's YAML names a path under the emptyDir's mountPath: rewritten to the local dir.
    config_line = next(line for line in log.splitlines() if line.startswith("config "))
    assert config_line.startswith("config dir: ") and config_line.endswith("/volumes/data/out")
    # workingDir /work is the "work" volume; /work/inner, mounted inside it, got the relative write.
    sandbox = next((pod_runner.work / "pods").glob(f"{e2e_namespace}_ok_*"))
    assert (sandbox / "volumes" / "inner" / "hello.txt").read_text() == "hi"


def test_exit_code_is_reported_as_failed(pod_runner, e2e_api, e2e_namespace):
    core = client.CoreV1Api(e2e_api)
    core.create_namespaced_pod(e2e_namespace, make_pod(
        "bad", "import sys; print('giving up: no data', file=sys.stderr); sys.exit(3)"))
    failed = wait_for(lambda: phase(core, e2e_namespace, "bad", "Failed"), timeout=30, what="pod bad Failed")
    terminated = failed.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert "giving up: no data" in terminated.message  # FallbackToLogsOnError
    assert f"{e2e_namespace}/bad" not in pod_runner.processes()


# (pod, script, exit code, the termination message the pod should report). Kubernetes' rules: the
# file's last 4096 bytes; the log's tail only when the file is empty AND the container failed.
PROGRESS_LINE = 'kuberl-progress: {"state":"succeeded","step":3,"totalSteps":3}'
TERMINATION_CASES = [
    ("wrote-ok", f"write({PROGRESS_LINE + chr(10) + 'succeeded at step 3 of 3'!r}); print('log line')", 0,
     PROGRESS_LINE + "\nsucceeded at step 3 of 3"),
    ("wrote-failed", "write('bad prompt key (change runtime.data.promptKey)'); print('log line')", 78,
     "bad prompt key (change runtime.data.promptKey)"),
    ("silent-ok", "print('log line')", 0, None),
    ("silent-failed", "print('log line')", 1, "log line\n"),
    ("too-long", "write('a' * 1000 + 'b' * 4096)", 0, "b" * 4096),
]


def test_termination_message_from_the_file_else_the_log_tail_on_failure(pod_runner, e2e_api, e2e_namespace):
    core = client.CoreV1Api(e2e_api)
    for name, body, code, _ in TERMINATION_CASES:
        script = ("import os, sys\n"
                  "def write(text):\n"
                  "    with open(os.environ['KUBERL_TERMINATION_LOG'], 'a') as f:\n"
                  "        f.write(text)\n"
                  f"{body}\n"
                  f"sys.exit({code})\n")
        core.create_namespaced_pod(e2e_namespace, make_pod(name, script))
    for name, _, code, message in TERMINATION_CASES:
        want = "Succeeded" if code == 0 else "Failed"
        pod = wait_for(lambda: phase(core, e2e_namespace, name, want), timeout=30, what=f"pod {name} {want}")
        terminated = pod.status.container_statuses[0].state.terminated
        assert (name, terminated.exit_code, terminated.message) == (name, code, message)
    ok = core.read_namespaced_pod("wrote-ok", e2e_namespace).status.container_statuses[0].state.terminated
    progress, human = parse_termination_message(ok.message)
    assert (progress.state, progress.step, human) == ("succeeded", 3, "succeeded at step 3 of 3")


def test_deleted_pod_kills_its_process_group(pod_runner, e2e_api, e2e_namespace, tmp_path):
    core = client.CoreV1Api(e2e_api)
    pids = tmp_path / "pids"
    # Ignores SIGTERM (so the runner must escalate) and leaves a grandchild in its process group.
    script = f"""
        import os, signal, subprocess, time, pathlib
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "600"])
        pathlib.Path({str(pids)!r}).write_text(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(600)
    """
    core.create_namespaced_pod(e2e_namespace, make_pod("stubborn", script, grace=1))
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=30, what="the pod's pids")
    parent, child = map(int, pids.read_text().split())
    assert alive(parent) and alive(child)

    core.delete_namespaced_pod("stubborn", e2e_namespace)

    def pod_gone():
        try:
            core.read_namespaced_pod("stubborn", e2e_namespace)
            return False
        except client.exceptions.ApiException as e:
            return e.status == 404

    wait_for(pod_gone, timeout=30, what="pod stubborn removed after its process ended")
    wait_for(lambda: not alive(parent) and not alive(child), timeout=10, what="the process and its child to end")
    assert f"{e2e_namespace}/stubborn" not in pod_runner.processes()


def test_readiness_follows_the_http_probe(pod_runner, e2e_api, e2e_namespace, tmp_path):
    core = client.CoreV1Api(e2e_api)
    gate = tmp_path / "ready"
    # Serves the probe on the pod's own local HTTP port: 503 until the gate file exists.
    script = f"""
        import http.server, os, pathlib

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if pathlib.Path({str(gate)!r}).exists() else 503)
                self.end_headers()

        http.server.HTTPServer(("127.0.0.1", int(os.environ["KUBERL_HTTP_PORT"])), H).serve_forever()
    """
    core.create_namespaced_pod(e2e_namespace, make_pod("probed", script, readiness_path="/readyz", grace=1))

    def ready_condition():
        pod = phase(core, e2e_namespace, "probed", "Running")
        return next(c.status for c in pod.status.conditions if c.type == "Ready")

    assert wait_for(ready_condition, timeout=30, what="pod probed Running") == "False"
    running = core.read_namespaced_pod("probed", e2e_namespace).status.container_statuses[0]
    assert running.state.running is not None and running.ready is False
    gate.touch()
    wait_for(lambda: ready_condition() == "True", timeout=30, what="pod probed Ready once its probe answers 200")
    assert core.read_namespaced_pod("probed", e2e_namespace).status.container_statuses[0].ready is True


def test_cli_runner_leaves_signals_to_its_pods_and_stops_on_sigterm(k8s_cluster, e2e_api, e2e_namespace, tmp_path):
    """`python -m e2e.pod_runner` as the walkthrough starts it: its pods' processes must receive the
    SIGTERM of a deletion (nothing blocked or ignored that a kubelet's container would get), and
    SIGTERM stops the runner, which deletes its node."""
    core = client.CoreV1Api(e2e_api)
    node = "e2e-cli-runner"
    log_path = tmp_path / "runner.log"
    with open(log_path, "wb") as log:
        runner = subprocess.Popen([sys.executable, "-m", "e2e.pod_runner", "--node", node,
                                   "--work-dir", str(tmp_path / "work")],
                                  cwd=Path(__file__).resolve().parents[1], env=k8s_cluster.env(),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: f"node {node} Ready" in log_path.read_text(), timeout=60, what=f"runner {node} started")
        script = """
            import signal, sys
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            ignored = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) == signal.SIG_IGN]
            print("blocked", sorted(blocked), "ignored", ignored)
            sys.exit(1 if signal.SIGTERM in blocked or signal.SIGTERM in ignored else 0)
        """
        pod = make_pod("signals", script)
        pod["spec"]["nodeSelector"] = {RUNNER_KEY: node}
        core.create_namespaced_pod(e2e_namespace, pod)

        def finished():
            got = core.read_namespaced_pod("signals", e2e_namespace)
            return got if got.status.phase in ("Succeeded", "Failed") else None

        terminated = wait_for(finished, timeout=60, what="pod signals finished").status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.message) == (0, None), terminated.message
    finally:
        runner.terminate()
        code = runner.wait(timeout=60)
    assert code == 0, log_path.read_text()[-2000:]

    def node_gone():
        try:
            core.read_node(node)
            return False
        except client.exceptions.ApiException as e:
            return e.status == 404

    wait_for(node_gone, timeout=30, what=f"node {node} deleted by the stopped runner")


def test_pods_die_with_a_runner_killed_outright(k8s_cluster, e2e_api, e2e_namespace, tmp_path):
    """A runner killed with SIGKILL (the test session that ran it died) cannot stop its pods: their
    processes die with it instead of running on with nobody to stop them."""
    core = client.CoreV1Api(e2e_api)
    node = "e2e-killed-runner"
    log_path, pid_path = tmp_path / "runner.log", tmp_path / "pid"
    with open(log_path, "wb") as log:
        runner = subprocess.Popen([sys.executable, "-m", "e2e.pod_runner", "--node", node,
                                   "--work-dir", str(tmp_path / "work")],
                                  cwd=Path(__file__).resolve().parents[1], env=k8s_cluster.env(),
                                  stdout=log, stderr=subprocess.STDOUT)
    pid = None
    try:
        wait_for(lambda: f"node {node} Ready" in log_path.read_text(), timeout=60, what=f"runner {node} started")
        pod = make_pod("orphan", f"""
            import os, pathlib, time
            pathlib.Path({str(pid_path)!r}).write_text(str(os.getpid()))
            time.sleep(600)
        """)
        pod["spec"]["nodeSelector"] = {RUNNER_KEY: node}
        core.create_namespaced_pod(e2e_namespace, pod)
        pid = int(wait_for(lambda: pid_path.exists() and pid_path.read_text(), timeout=60, what="the pod's pid"))
        runner.kill()
        runner.wait()
        wait_for(lambda: not alive(pid), timeout=30, what="the pod's process to die with its runner")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if pid is not None and alive(pid):
            os.kill(pid, 9)
        for delete in (lambda: core.delete_namespaced_pod("orphan", e2e_namespace, grace_period_seconds=0),
                       lambda: core.delete_node(node)):
            try:
                delete()
            except client.exceptions.ApiException as e:
                if e.status != 404:
                    raise
