"""The operator's start-up: namespaces that appear while it starts are watched like any other.

kopf (1.45.2) lists the namespaces matching `--namespace` patterns, then lists them again to start
its watch and ignored that second listing: a namespace created between the two was never watched,
and its RLJobs never reconciled until a restart (kopf_patches). The window is a few tens of
milliseconds once per start, so the test creates namespaces back to back from the operator's
launch until well after it is up, then an RLJob in each: every one must be reconciled.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_support import die_with_parent, free_port, install_crd, rljob, wait_for

from kuberl_operator.api import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration
PREFIX = "kuberl-start-"
PACE_S = 0.02


def test_namespaces_created_while_the_operator_starts_are_watched(k8s_cluster, kube_api, tmp_path):
    install_crd(kube_api)
    core, custom = client.CoreV1Api(kube_api), client.CustomObjectsApi(kube_api)
    liveness = free_port()
    log_path = tmp_path / "operator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kuberl_operator.cli", "operator", "--standalone", "--namespace", f"{PREFIX}*",
             "--metrics-port", "0", "--liveness", f"http://127.0.0.1:{liveness}/healthz"],
            env=k8s_cluster.env(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    created: list[str] = []
    try:
        # One every PACE_S from the launch until 2 s after the operator answers its liveness probe
        # (its namespace watch has started by then): a few land in the window, whenever it opens.
        up_at, deadline = None, time.monotonic() + 120
        while up_at is None or time.monotonic() < up_at + 2:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            created.append(core.create_namespace({"metadata": {"generateName": PREFIX}}).metadata.name)
            if up_at is None and _healthy(liveness):
                up_at = time.monotonic()
            time.sleep(PACE_S)
        for ns in created:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, rljob("j", suspend=True))

        def unreconciled():
            left = [ns for ns in created
                    if not custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "j").get("status")]
            if left:
                raise AssertionError(f"{len(left)} of {len(created)} jobs without a status: {left[:5]}")
            return True

        # Suspended jobs, one status write each: about 10 a second on a busy machine.
        wait_for(unreconciled, timeout=60 + len(created) / 2, what="every RLJob reconciled")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for ns in created:
            try:
                core.delete_namespace(ns)
            except ApiException as e:
                if e.status != 404:
                    raise


def _healthy(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False
