"""Prompt loading: synthetic tasks, JSONL and Parquet files, errors naming the field, the epoch order."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kuberl_runtime.config import DataConfig
from kuberl_runtime.data import PromptOrder, load_dataset, synthetic_rows
from kuberl_runtime.errors import ConfigError, DataError
from kuberl_runtime.tokenizer import ArithmeticTokenizer

TOK = ArithmeticTokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "task, check",
    [
        ("arithmetic", lambda r: eval(r["prompt"].rstrip("=")) == int(r["answer"])),
        ("reverse", lambda r: r["prompt"].split()[1].rstrip(":")[::-1] == r["answer"]),
        ("copy", lambda r: r["prompt"].split()[1].rstrip(":") == r["answer"]),
    ],
)
def test_synthetic_rows_are_verifiable_and_seeded(task, check):
    cfg = DataConfig(synthetic={"task": task, "numExamples": 50, "maxOperand": 5, "seed": 3})
    rows = synthetic_rows(cfg.synthetic)
    assert len(rows) == 50 and all(check(r) for r in rows)
    assert rows == synthetic_rows(cfg.synthetic)
    assert rows != synthetic_rows(cfg.synthetic.model_copy(update={"seed": 4}))


def test_jsonl_and_parquet_load_the_same_rows(tmp_path):
    rows = [{"question": "1+2=", "solution": "3", "extra": i} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for path in (write_jsonl(tmp_path / "p.jsonl", rows), str(tmp_path / "p.parquet")):
        ds = load_dataset(DataConfig(path=path, promptKey="question", answerKey="solution"), TOK)
        assert ds.rows == rows
        assert [p.tolist() for p in ds.prompt_ids] == [TOK.encode("1+2=")] * 5


def test_prompts_are_left_truncated(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "12345+6=", "answer": "12351"}])
    ds = load_dataset(DataConfig(path=path, maxPromptLength=3), TOK)
    assert TOK.decode(ds.prompt_ids[0].tolist()) == "+6=" and ds.prompt_ids[0].numel() == 3


@pytest.mark.parametrize(
    "rows, kwargs, error, field",
    [
        ([{"text": "1+1=", "answer": "2"}], {}, ConfigError, "runtime.data.promptKey"),
        ([{"prompt": "1+1=", "label": "2"}], {}, ConfigError, "runtime.data.answerKey"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}], {}, DataError, "runtime.data.path"),
        ([], {}, ConfigError, "runtime.data.path"),
    ],
)
def test_bad_files_name_the_field(tmp_path, rows, kwargs, error, field):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(error) as e:
        load_dataset(DataConfig(path=path, **kwargs), TOK)
    assert e.value.field == field


def test_missing_file_and_broken_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(DataConfig(path=str(tmp_path / "nope.jsonl")), TOK)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_dataset(DataConfig(path=str(tmp_path / "bad.jsonl")), TOK)


def test_prompt_order_covers_each_epoch_and_resumes_exactly():
    order = PromptOrder(10, shuffle=True, seed=1)
    first = order.take(10)
    assert sorted(first) == list(range(10))
    order.take(3)
    state = order.state_dict()
    rest = order.take(12)  # crosses into epoch 2
    resumed = PromptOrder(10, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    assert resumed.take(12) == rest
    assert state == {"epoch": 1, "index": 3}
    assert PromptOrder(4, shuffle=False, seed=0).take(6) == [0, 1, 2, 3, 0, 1]
