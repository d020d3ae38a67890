"""Prompts: synthetic verifiable tasks or a JSONL/Parquet file, and the epoch-shuffled order.

    dataset = load_dataset(cfg.data, tokenizer)      # rows + tokenized (left-truncated) prompts
    order = PromptOrder(len(dataset), shuffle=True, seed=0)
    indices = order.take(16)                          # the next 16 prompts, across epoch ends
    state = order.state_dict()                        # {"epoch": e, "index": i}: saved in checkpoints

Every row is a dict with at least `prompt` and `answer` under the configured keys; the whole
row reaches the reward function.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kuberl_runtime.config import DataConfig, SyntheticData
from kuberl_runtime.errors import ConfigError, DataError


def synthetic_rows(cfg: SyntheticData) -> list[dict[str, Any]]:
    """Prompt/answer rows of a synthetic task, the same for the same seed on every machine."""
    rng = random.Random(cfg.seed)
    rows = []
    for _ in range(cfg.num_examples):
        if cfg.task == "arithmetic":
            a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
            rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
        else:
            digits = "".join(rng.choice("0123456789") for _ in range(cfg.max_operand))
            target = digits[::-1] if cfg.task == "reverse" else digits
            rows.append({"prompt": f"{cfg.task} {digits}:", "answer": target})
    return rows


def read_rows(path: str, fmt: str) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .parquet file; ConfigError naming runtime.data.path when unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file {path!r} does not exist", field="runtime.data.path")
    if fmt == "auto":
        fmt = "parquet" if p.suffix == ".parquet" else "jsonl"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    rows = []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON: {e.msg}", field="runtime.data.path") from None
    return rows


@dataclass
class PromptDataset:
    rows: list[dict[str, Any]]
    prompt_ids: list[torch.Tensor]  # (P_i,) int64, at most maxPromptLength tokens
    prompt_key: str
    answer_key: str

    def __len__(self) -> int:
        return len(self.rows)


def load_dataset(cfg: DataConfig, tokenizer) -> PromptDataset:
    """Rows from `synthetic` or `path`, prompts tokenized and left-truncated to maxPromptLength."""
    if cfg.synthetic is not None:
        rows, pkey, akey = synthetic_rows(cfg.synthetic), "prompt", "answer"
    else:
        rows, pkey, akey = read_rows(cfg.path, cfg.format), cfg.prompt_key, cfg.answer_key
    if not rows:
        raise ConfigError(f"prompt file {cfg.path!r} has no rows", field="runtime.data.path")
    for key, field in ((pkey, "promptKey"), (akey, "answerKey")):
        if key not in rows[0]:
            # The first row decides: a key missing there is a wrong key in the config ...
            raise ConfigError(
                f"{cfg.path}: no column {key!r}; the file has: {', '.join(map(str, rows[0]))}",
                field=f"runtime.data.{field}",
            )
        for n, row in enumerate(rows, 1):
            if key not in row:
                # ... and one missing further down is a broken file.
                raise DataError(f"{cfg.path}: row {n} has no {key!r}", field="runtime.data.path")
    # Left-truncation keeps the end of the prompt: the question and the generation cue live there.
    prompt_ids = [torch.tensor(tokenizer.encode(str(r[pkey]))[-cfg.max_prompt_length:]) for r in rows]
    return PromptDataset(rows, prompt_ids, pkey, akey)


class PromptOrder:
    """Which prompt comes next: a fresh permutation every epoch; (epoch, index) is the position."""

    def __init__(self, size: int, *, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        # Derived from (seed, epoch) alone, so a resumed run rebuilds the same order.
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation()
            k = min(n - len(out), self.size - self.index)
            out += self._perm[self.index : self.index + k]
            self.index += k
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation()
