"""W3's harness runs end to end on CPU/gloo with a tiny shape (no speed claims on 2 cores)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import weight_sync  # noqa: E402


def test_w3_tiny_cpu(tmp_path):
    res = weight_sync.main(["--tiny", "--iters", "2", "--warmup", "1", "--json", str(tmp_path / "w3.json")])
    shapes = weight_sync.qwen2_shapes(weight_sync.TINY_SHAPE)
    assert res["tensors"] == len(shapes)
    assert res["bytes"] == 2 * sum(math.prod(s) for _, s in shapes)  # bf16
    assert len(res["raw"]["ours"]) == len(res["raw"]["flat"]) == 2
    assert res["ours_gb_s"] > 0 and res["flat_gb_s"] > 0
    assert (tmp_path / "w3.json").stat().st_size > 0
