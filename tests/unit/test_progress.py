"""The progress endpoint, served for real on 127.0.0.1 and read with urllib."""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kuberl_runtime.contract import Progress
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.progress import ProgressReporter, prometheus_name

STEP_METRICS = {
    "reward/mean": 0.41,
    "reward/std": 0.2,
    "train/kl": 0.002,
    "train/entropy": 1.5,
    "train/policy_loss": -0.03,
    "rollout/response_length": 12.5,
    "rollout/tokens_per_s": 1234.0,
    "time/generate_s": 1.0,
    "time/score_s": 0.25,
    "time/train_s": 2.0,
    "time/sync_s": 0.125,
}


def get(reporter: ProgressReporter, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{reporter.port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def scrape(reporter: ProgressReporter) -> dict[str, float]:
    status, content_type, body = get(reporter, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {s.name: s.value for family in text_string_to_metric_families(body.decode()) for s in family.samples}


@pytest.fixture
def reporter():
    with ProgressReporter(total_steps=60, port=0, host="127.0.0.1") as r:
        yield r


def test_progress_starts_empty_then_follows_the_steps(reporter: ProgressReporter):
    status, content_type, body = get(reporter, "/progress")
    assert status == 200 and content_type == "application/json"
    assert json.loads(body)["state"] == "starting" and json.loads(body)["totalSteps"] == 60

    reporter.update(12, STEP_METRICS, weights_version=12)
    doc = json.loads(get(reporter, "/progress")[2])
    assert doc["state"] == "running"
    assert doc["step"] == 12 and doc["totalSteps"] == 60 and doc["weightsVersion"] == 12
    assert doc["rewardMean"] == 0.41 and doc["rewardStd"] == 0.2
    assert doc["kl"] == 0.002 and doc["entropy"] == 1.5
    assert doc["responseLength"] == 12.5 and doc["tokensPerSecond"] == 1234.0
    assert doc["time"] == {"generate": 1.0, "score": 0.25, "train": 2.0, "sync": 0.125}
    assert Progress.model_validate(doc) == reporter.document()  # the operator's parser reads it


def test_checkpoint_resume_and_final_state_reach_the_document(reporter: ProgressReporter):
    reporter.resumed(40)
    doc = json.loads(get(reporter, "/progress")[2])
    assert (doc["step"], doc["resumedFromStep"], doc["lastCheckpointStep"]) == (40, 40, 40)

    reporter.update(50, {"reward/mean": 0.5})
    reporter.checkpointed(50)
    reporter.finish("failed", "DataError: train/policy_loss is nan (not finite) (change runtime.training.lr)")
    doc = json.loads(get(reporter, "/progress")[2])
    assert doc["state"] == "failed" and doc["lastCheckpointStep"] == 50 and doc["resumedFromStep"] == 40
    assert "runtime.training.lr" in doc["message"]


def test_non_finite_values_are_served_as_valid_json(reporter: ProgressReporter):
    reporter.update(1, {"reward/mean": math.nan, "train/kl": math.inf})
    body = get(reporter, "/progress")[2]
    assert b"NaN" not in body and b"Infinity" not in body  # Go's JSON decoder and others reject them
    doc = json.loads(body)
    assert doc["rewardMean"] is None and doc["kl"] is None


def test_metrics_are_namespaced_gauges(reporter: ProgressReporter):
    assert scrape(reporter) == {"kuberl_step": 0.0, "kuberl_total_steps": 60.0}
    reporter.update(12, STEP_METRICS, weights_version=3)
    reporter.checkpointed(10)
    samples = scrape(reporter)
    assert samples["kuberl_rollout_tokens_per_s"] == 1234.0
    assert samples["kuberl_reward_mean"] == 0.41
    assert samples["kuberl_train_policy_loss"] == -0.03
    assert samples["kuberl_time_generate_s"] == 1.0
    assert samples["kuberl_step"] == 12.0 and samples["kuberl_total_steps"] == 60.0
    assert samples["kuberl_weights_version"] == 3.0 and samples["kuberl_last_checkpoint_step"] == 10.0
    reporter.update(13, {"reward/mean": 0.5})
    assert scrape(reporter)["kuberl_reward_mean"] == 0.5


def test_two_reporters_in_one_process_keep_their_own_metrics():
    with ProgressReporter(10, port=0, host="127.0.0.1") as a, ProgressReporter(20, port=0, host="127.0.0.1") as b:
        a.update(1, {"reward/mean": 0.1})
        b.update(2, {"reward/mean": 0.9})
        assert a.port != b.port
        assert scrape(a)["kuberl_reward_mean"] == 0.1 and scrape(a)["kuberl_total_steps"] == 10
        assert scrape(b)["kuberl_reward_mean"] == 0.9 and scrape(b)["kuberl_total_steps"] == 20


def test_health_and_readiness(reporter: ProgressReporter):
    assert get(reporter, "/healthz")[0] == 200
    assert get(reporter, "/readyz")[0] == 503
    reporter.set_ready()
    assert get(reporter, "/readyz")[0] == 200
    reporter.set_ready(False)
    assert get(reporter, "/readyz")[0] == 503
    assert get(reporter, "/nothing")[0] == 404
    assert get(reporter, "/progress?pretty=1")[0] == 200


def test_close_stops_serving():
    reporter = ProgressReporter(5, port=0, host="127.0.0.1").start()
    port = reporter.port
    assert get(reporter, "/healthz")[0] == 200
    reporter.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_without_a_port_nothing_is_served_but_the_document_is_kept():
    reporter = ProgressReporter(5).start()
    reporter.update(1, {"reward/mean": 1.0})
    assert reporter.port is None
    assert reporter.document().reward_mean == 1.0
    reporter.close()


def test_a_taken_port_is_a_config_error_naming_the_field():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="runtime.logging.port"):
            ProgressReporter(5, port=taken.getsockname()[1], host="127.0.0.1").start()


@pytest.mark.parametrize(
    ("metric", "name"),
    [("rollout/tokens_per_s", "kuberl_rollout_tokens_per_s"), ("reward/mean", "kuberl_reward_mean"),
     ("time/generate_s", "kuberl_time_generate_s"), ("train/kl-k3", "kuberl_train_kl_k3"), ("step", "kuberl_step")],
)
def test_prometheus_names(metric: str, name: str):
    assert prometheus_name(metric) == name
