"""Rewards: built-in rules, a user module:function, errors that name the field."""

from __future__ import annotations

import pytest

from kuberl_runtime.config import RewardConfig
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.rewards import build_reward


@pytest.mark.parametrize(
    "cfg, completion, answer, expected",
    [
        ({"rule": "numeric"}, "7", "7", 1.0),
        ({"rule": "numeric"}, "the sum is 12", "12", 1.0),
        ({"rule": "numeric"}, "3 then 12", "3", 0.0),  # the last number counts
        ({"rule": "numeric"}, "1.50", "1.5", 1.0),
        ({"rule": "numeric"}, "no digits", "1", 0.0),
        ({"rule": "numeric"}, "4", "not a number", 0.0),
        ({"rule": "exact_match"}, " abc ", "abc", 1.0),
        ({"rule": "exact_match"}, "abcd", "abc", 0.0),
        ({"rule": "regex", "pattern": r"^\d+$"}, "42", "", 1.0),
        ({"rule": "regex", "pattern": r"^\d+$"}, "42x", "", 0.0),
        ({}, "5", "5", 1.0),  # default: numeric
    ],
)
def test_rules(cfg, completion, answer, expected):
    assert build_reward(RewardConfig(**cfg))("p", completion, {"answer": answer}) == expected


def test_user_function_gets_prompt_completion_and_row(tmp_path):
    (tmp_path / "myreward.py").write_text(
        "def score(prompt, completion, row):\n    return len(completion) + row['bonus'] + len(prompt)\n"
    )
    fn = build_reward(RewardConfig(function="myreward:score", pythonPath=[str(tmp_path)]))
    assert fn("ab", "xyz", {"bonus": 10}) == 15.0


def test_user_function_errors_name_the_field(tmp_path):
    (tmp_path / "broken.py").write_text("def score(p, c, row):\n    return row['missing']\n")
    with pytest.raises(ConfigError) as e:
        build_reward(RewardConfig(function="nosuchmodule:score"))
    assert e.value.field == "runtime.reward.function"
    fn = build_reward(RewardConfig(function="broken:score", pythonPath=[str(tmp_path)]))
    with pytest.raises(ConfigError, match=r"KeyError.*completion='c'") as e:
        fn("p", "c", {})
    assert e.value.field == "runtime.reward"


def test_answer_key_is_configurable():
    fn = build_reward(RewardConfig(rule="numeric"), answer_key="solution")
    assert fn("p", "9", {"solution": "9"}) == 1.0
