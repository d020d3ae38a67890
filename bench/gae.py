"""GAE: the former per-token loop vs the scan in kuberl_runtime.algorithms (issue 8, W2).

    PYTHONPATH=runtime python bench/gae.py [--device cuda] [--shapes 512x256,64x256] [--whiten off]

Times both on the same random float32 batch (right-padded rows, gamma 1.0, lambda 0.95: the W2
settings), alternating old and new each repeat; prints the median ms per call and the largest
difference between the two. 512x256 is the W2 batch (whitened: the policy's advantages), 64x256
one critic micro-batch (`--whiten off`: the critic's returns in recipes.ppo.critic_step_with_gae).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from kuberl_runtime.algorithms import get_advantage, masked_whiten


def loop_gae(*, token_rewards, mask, values, gamma, lam, normalize_std, eps=1e-6, **_):
    """The implementation before the scan (commit aba7808), kept here as the 'before'."""
    m = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(token_rewards.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        valid = m[:, t]
        running = torch.where(valid, delta + gamma * lam * running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        reversed_adv.append(running)
    adv = torch.where(m, torch.stack(reversed_adv[::-1], dim=1), 0)
    returns = torch.where(m, adv + values, 0)
    if normalize_std:
        adv = masked_whiten(adv, m, eps)
    return adv, returns


def timed_ms(fn, kwargs, device) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(**kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start), out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="512x256,64x256", help="BxT, comma-separated")
    ap.add_argument("--whiten", choices=["on", "off"], default="on")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    results = {}
    for shape in args.shapes.split(","):
        batch, length = map(int, shape.split("x"))
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        kwargs = {
            "token_rewards": torch.randn(batch, length, generator=g).to(device),
            "mask": (torch.arange(length) < lengths[:, None]).to(device),
            "values": torch.randn(batch, length, generator=g).to(device),
            "group_size": 1, "gamma": 1.0, "lam": 0.95, "normalize_std": args.whiten == "on",
        }  # fmt: skip
        times = {"loop": [], "scan": []}
        for fn in (loop_gae, get_advantage("gae")):  # warm-up
            fn(**kwargs)
        for _ in range(args.repeats):
            t_old, old = timed_ms(loop_gae, kwargs, device)
            t_new, new = timed_ms(get_advantage("gae"), kwargs, device)
            times["loop"].append(t_old)
            times["scan"].append(t_new)
        diff = max((a - b).abs().max().item() for a, b in zip(old, new))
        loop_ms, scan_ms = statistics.median(times["loop"]), statistics.median(times["scan"])
        print(
            f"B={batch} T={length} {device.type}: loop {loop_ms:.2f} ms, scan {scan_ms:.2f} ms "
            f"({loop_ms / scan_ms:.1f}x), max |loop - scan| {diff:.1e} (advantages, returns)"
        )
        results[shape] = {"loop_ms": loop_ms, "scan_ms": scan_ms, "max_diff": diff}
    return results


if __name__ == "__main__":
    main()
