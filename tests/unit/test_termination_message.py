"""The termination message contract: the final Progress document first, then the human message."""

from __future__ import annotations

from pathlib import Path

from kuberl_runtime.contract import (
    TERMINATION_MESSAGE_BYTES,
    TERMINATION_PROGRESS_PREFIX,
    Progress,
    TimeSplit,
    format_termination_message,
    parse_termination_message,
)
from kuberl_runtime.errors import write_termination_message


def final(**kw) -> Progress:
    base = dict(state="succeeded", step=150, total_steps=150, reward_mean=0.51, kl=0.02, weights_version=150,
                last_checkpoint_step=150, rank=0, time=TimeSplit(generate=0.1, train=0.2))
    return Progress(**{**base, **kw})


def test_success_round_trips_the_final_document():
    doc = final()
    text = format_termination_message("succeeded at step 150 of 150", doc)
    first, second = text.split("\n")
    assert first.startswith(TERMINATION_PROGRESS_PREFIX) and " " not in first[len(TERMINATION_PROGRESS_PREFIX):]
    assert '"totalSteps":150' in first and "null" not in first  # camelCase, no None fields
    progress, message = parse_termination_message(text)
    assert progress == doc
    assert message == second == "succeeded at step 150 of 150"


def test_a_failure_puts_the_reason_last_and_into_the_document():
    reason = "ConfigError: reward my:fn raised ValueError: x (change runtime.reward.function)"
    doc = final(state="failed", step=42, message=reason)
    text = format_termination_message(reason, doc)
    assert text.endswith(reason) and text.count(reason) == 1  # the operator keeps a message's tail
    progress, message = parse_termination_message(text)
    assert (progress.state, progress.step, progress.message, message) == ("failed", 42, reason, reason)


def test_without_a_document_or_from_a_log_tail_it_is_only_a_message():
    assert parse_termination_message(format_termination_message("out of memory")) == (None, "out of memory")
    tail = "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"
    assert parse_termination_message(tail) == (None, tail.strip())
    assert parse_termination_message(None) == (None, "")
    broken = TERMINATION_PROGRESS_PREFIX + '{"step": "many"}\nbad'
    assert parse_termination_message(broken) == (None, broken)  # invalid document: left as text


def test_it_fits_kubernetes_limit_whatever_the_message():
    long = "é" * 5000  # 10,000 bytes
    text = format_termination_message(long, final(state="failed"))
    assert len(text.encode()) <= TERMINATION_MESSAGE_BYTES
    progress, message = parse_termination_message(text)
    assert progress.step == 150 and message.endswith("...") and message.startswith("éé")


def test_the_runtime_writes_where_kuberl_termination_log_points(tmp_path: Path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBERL_TERMINATION_LOG", str(log))
    assert write_termination_message("x") is False  # only where the file exists, as in a container
    log.touch()
    assert write_termination_message(format_termination_message("done", final())) is True
    assert parse_termination_message(log.read_text())[0].step == 150
