"""Tokenizers: the built-in character tokenizer round-trips; unknown names fail naming the field."""

from __future__ import annotations

import pytest

from kuberl_runtime.config import ModelConfig
from kuberl_runtime.errors import ConfigError
from kuberl_runtime.tokenizer import ArithmeticTokenizer, load_tokenizer

INIT = {"hiddenSize": 16, "numLayers": 1, "numHeads": 2, "numKvHeads": 1, "intermediateSize": 16}


def test_builtin_arithmetic_round_trips_and_marks_bos():
    tok = load_tokenizer(ModelConfig(init=INIT, tokenizer="builtin:arithmetic"))
    assert isinstance(tok, ArithmeticTokenizer)
    ids = tok.encode("12+34=46")
    assert ids[0] == tok.bos_token_id and len(ids) == 9
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == "12+34=46"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert max(tok.encode("zyx 0:")) < tok.vocab_size


def test_unknown_characters_raise():
    with pytest.raises(ValueError, match="cannot encode '%'"):
        ArithmeticTokenizer().encode("5%")


def test_unknown_builtin_and_missing_directory_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_tokenizer(ModelConfig(init=INIT, tokenizer="builtin:nope"))
    assert e.value.field == "runtime.model.tokenizer"
    with pytest.raises(ConfigError) as e:
        load_tokenizer(ModelConfig(init=INIT, tokenizer=str(tmp_path / "missing")))
    assert e.value.field == "runtime.model.tokenizer"
