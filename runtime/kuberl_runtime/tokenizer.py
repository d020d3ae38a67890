"""Tokenizers: a built-in character-level one for demos and tests, or a transformers tokenizer.

    tok = load_tokenizer(cfg.model)
    ids = tok.encode("3+5=")          # list[int], BOS first
    text = tok.decode(ids)            # special tokens dropped

Both kinds expose the same small surface the runtime uses: encode, decode, pad_token_id,
eos_token_id, bos_token_id, vocab_size. No hub access happens unless `model.hubId` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kuberl_runtime.config import ModelConfig
from kuberl_runtime.errors import ConfigError


class Tokenizer(Protocol):
    pad_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ArithmeticTokenizer:
    """One token per character of a fixed alphabet (digits, operators, space, lowercase letters).

    Ids 0-2 are pad, bos, eos; unknown characters raise, since a silent <unk> would make a
    synthetic task unlearnable without anyone noticing.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    ALPHABET = "0123456789+-*=: abcdefghijklmnopqrstuvwxyz"

    def __init__(self) -> None:
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._ids = {c: i + len(self.SPECIALS) for i, c in enumerate(self.ALPHABET)}
        self._chars = {i: c for c, i in self._ids.items()}
        self.vocab_size = len(self.SPECIALS) + len(self.ALPHABET)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.bos_token_id] + [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"builtin:arithmetic cannot encode {e.args[0]!r} (alphabet: {self.ALPHABET!r})") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self._chars.get(int(i), "") for i in ids)


class HFTokenizer:
    """A transformers tokenizer behind the same surface; pad falls back to EOS (decoder-only LMs)."""

    def __init__(self, tok) -> None:
        self._tok = tok
        if tok.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token", field="runtime.model.tokenizer")
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


BUILTIN = {"arithmetic": ArithmeticTokenizer}


def load_tokenizer(model_cfg: ModelConfig) -> Tokenizer:
    """The tokenizer `model.tokenizer` names (default: the model's own directory or hub id)."""
    name = model_cfg.tokenizer
    if name and name.startswith("builtin:"):
        kind = name.removeprefix("builtin:")
        if kind not in BUILTIN:
            raise ConfigError(
                f"unknown built-in tokenizer {name!r}; known: {', '.join('builtin:' + k for k in BUILTIN)}",
                field="runtime.model.tokenizer",
            )
        return BUILTIN[kind]()

    from transformers import AutoTokenizer

    source = name or model_cfg.path or model_cfg.hub_id
    remote = model_cfg.hub_id is not None and source == model_cfg.hub_id
    field = "runtime.model.tokenizer" if name else "runtime.model.path"
    if not remote and not Path(source).is_dir():
        raise ConfigError(f"tokenizer directory {source!r} does not exist", field=field)
    try:
        tok = AutoTokenizer.from_pretrained(
            source,
            local_files_only=not remote,
            revision=model_cfg.revision if remote else None,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {source!r}: {e}", field=field) from e
    return HFTokenizer(tok)
