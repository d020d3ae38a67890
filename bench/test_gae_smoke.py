"""bench/gae.py runs on CPU at a small shape and its 'before' loop agrees with the scan."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gae


@pytest.mark.parametrize("whiten", ["on", "off"])
def test_gae_bench_small_cpu(whiten):
    res = gae.main(["--shapes", "8x32,3x5", "--repeats", "2", "--whiten", whiten])
    assert set(res) == {"8x32", "3x5"}
    for r in res.values():
        assert r["loop_ms"] > 0 and r["scan_ms"] > 0
        assert r["max_diff"] < 1e-4  # float32; a wrong mask or discount is off by O(1)
