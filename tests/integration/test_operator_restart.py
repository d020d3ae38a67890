"""An operator killed in the middle of creating a gang, and restarted, converges without duplicates:
pods that exist keep their uids, the missing ones are created once, nothing counts as a failure.
A second operator over a settled job changes nothing (same pods, same job resourceVersion) and
posts no Event it already posted.

The operators poll progress at http://127.0.0.1:<runtime.logging.port>/progress: the job's port is
one this test holds bound and never listens on, so nothing else on the machine (a runtime serving
the default 8470) can feed it a progress document that changes the settled status."""

from __future__ import annotations

import signal
import socket

import pytest
from kubernetes import watch
from operator_support import Cluster, install_crd, rljob, start_operator

from kuberl_operator import labels
from kuberl_operator.devcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.integration
T = 60
PODS = 16


@pytest.fixture
def no_progress_port():
    """A port bound but not listening: connections are refused, and no other process can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_operator_killed_mid_reconcile_creates_no_duplicates(k8s_cluster, kube_api, namespace, tmp_path,
                                                             no_progress_port):
    install_crd(kube_api)
    kube = Cluster(kube_api, namespace)
    first = start_operator(k8s_cluster, tmp_path / "operator-1.log")
    try:
        kube.create(rljob("big", trainer={"replicas": PODS, "gpus": 1},
                          runtime={"logging": {"port": no_progress_port}}))
        # Kill -9 as soon as the first pod of the gang appears: the pass is half-way through.
        w = watch.Watch()
        for _ in w.stream(kube.core.list_namespaced_pod, namespace, label_selector=labels.job_selector("big"),
                          timeout_seconds=T):
            first.kill(signal.SIGKILL)
            w.stop()
    finally:
        first.kill(signal.SIGKILL)
    before = {p.metadata.name: p.metadata.uid for p in kube.pods("big")}
    print(f"pods when the operator died: {len(before)} of {PODS}")
    assert before, "the first operator created no pod before it was killed"

    second = start_operator(k8s_cluster, tmp_path / "operator-2.log")
    try:
        pods = wait_for(kube.all_running("big", PODS), timeout=T, what=f"{PODS} running pods")
        status = wait_for(kube.phase_is("big", "Running"), timeout=T, what="Running")
        after = {p.metadata.name: p.metadata.uid for p in pods}
        assert sorted(after) == sorted(f"big-trainer-{i}" for i in range(PODS))
        assert {name: after[name] for name in before} == before, "a pod that existed was replaced"
        all_pods = kube.pods("big")  # terminating ones included: nothing was created twice
        assert len(all_pods) == PODS and len({p.metadata.uid for p in all_pods}) == PODS
        assert status["restarts"] == 0 and "failure" not in status
        assert "GangRestarting" not in kube.event_reasons("big")
        wait_for(lambda: (s := kube.status("big"))["roles"]["trainer"]["ready"] == PODS and s,
                 timeout=T, what="all pods ready in status")
        settled_rv = kube.job("big")["metadata"]["resourceVersion"]
    finally:
        second.kill()
    assert "Traceback" not in second.log(), second.log()[-6000:]

    # A fresh operator over a settled job: passes happen (the progress timer), nothing changes.
    third = start_operator(k8s_cluster, tmp_path / "operator-3.log")
    try:
        wait_for(lambda: third.reconciles() >= 3, timeout=T, what="three passes of the third operator")
        assert {p.metadata.name: p.metadata.uid for p in kube.pods("big")} == after
        assert kube.job("big")["metadata"]["resourceVersion"] == settled_rv
        # Posted by the first operator before its first pod (the job has no checkpoint volume);
        # the status that remembers it made the two restarted operators post it no more.
        assert kube.event_reasons("big").count("CheckpointsNotPersistent") == 1
    finally:
        third.kill()
    assert "Traceback" not in third.log(), third.log()[-6000:]
