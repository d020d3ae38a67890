"""W3: weight sync (resharding) bandwidth, trainer rank 0 -> rollout ranks, against one flat broadcast.

    PYTHONPATH=runtime python bench/weight_sync.py --tiny                 # CPU/gloo, a few MB (CI smoke)
    PYTHONPATH=runtime python bench/weight_sync.py --device cpu           # CPU/gloo, the W1 model's bytes
    PYTHONPATH=runtime python bench/weight_sync.py --device cuda          # 2 GPUs, NCCL (one process per GPU)

Both sides run in the same processes over the same process group: ours is `sync.WeightSender` ->
`WeightReceiver` (bucketed, double-buffered, a table of contents per bucket, the version
acknowledgement) moving the W1 model's tensors (Qwen2.5-0.5B shapes, ~0.99 GB in bf16); the peer
is one `dist.broadcast` of a single flat buffer of the same byte count followed by the same small
acknowledgement (what a link can do with no bucketing, no per-tensor work). Printed: median
seconds, GB/s of each, and ours / peer bandwidth (BENCHMARKS.md W3 asks for >= 0.8 on GPUs).
Workload: ../shared/BENCHMARKS.md. Numbers: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

W1_SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)


def qwen2_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter names and shapes of a Qwen2 causal LM with tied embeddings."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (s["intermediate"], h)), (p + "mlp.up_proj.weight", (s["intermediate"], h)),
            (p + "mlp.down_proj.weight", (h, s["intermediate"])),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]  # fmt: skip
    return out + [("model.norm.weight", (h,))]


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.sync import WeightReceiver, WeightSender

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    topo = Topology(role="trainer" if rank == 0 else "rollout", role_rank=max(rank - 1, 0), rank=rank,
                    world_size=world, trainer_world_size=1, rollout_replicas=world - 1, master_port=port,
                    rendezvous_timeout_s=300)
    groups = rendezvous(topo, backend="nccl" if device.type == "cuda" else "gloo")
    shapes = qwen2_shapes(TINY_SHAPE if args.tiny else W1_SHAPE)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    weights = [(n, torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype)) for n, s in shapes]
    total = sum(t.numel() * t.element_size() for _, t in weights)
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    ack = torch.zeros(world, dtype=torch.int64, device=device)

    def sync() -> None:
        def sink(header):
            for _ in receiver.tensors(header):
                pass

        if rank == 0:
            sender.send(weights, version)
        else:
            header = receiver.wait()
            sink(header)
            receiver.finish(header, header.version)

    def flat_broadcast() -> None:
        dist.broadcast(flat, src=0, group=groups.sync)
        dist.all_reduce(ack, group=groups.sync)  # the same "everyone has it" round trip as ours

    sender = WeightSender(groups, bucket_bytes=args.bucket_mb << 20, device=device) if rank == 0 else None
    receiver = WeightReceiver(groups, device=device) if rank else None
    times: dict[str, list[float]] = {"ours": [], "flat": []}
    version = 0
    for it in range(args.warmup + args.iters):
        for name, fn in (("ours", sync), ("flat", flat_broadcast)):
            version += name == "ours"
            dist.barrier(group=groups.sync)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if it >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        sender.stop()
    else:
        assert receiver.wait() is None
    groups.close()
    if rank == 0:
        queue.put({"bytes": total, "tensors": len(weights), **times})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(queue, procs, timeout_s: float) -> dict:
    """Rank 0's result; a worker that died first (or the deadline) stops the others and fails the run
    at once, instead of leaving the rest waiting for it in a collective."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                    p.join()
                raise RuntimeError(f"W3 workers failed (rank, exit code): {failed}" if failed
                                   else f"W3 gave no result within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape (CI smoke)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--bucket-mb", type=int, default=None, help="bucket size in MiB (default: 256 GPU, 32 CPU)")
    ap.add_argument("--rollouts", type=int, default=1, help="receiving ranks (GPUs 1..N with --device cuda)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.bucket_mb is None:
        args.bucket_mb = 1 if args.tiny else (256 if args.device == "cuda" else 32)
    world = 1 + args.rollouts
    if args.device == "cuda" and torch.cuda.device_count() < world:
        sys.exit(f"--device cuda needs {world} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    res = _result(queue, procs, timeout_s=900)
    for p in procs:
        p.join(timeout=60)
    ours, flat = statistics.median(res["ours"]), statistics.median(res["flat"])
    gb = res["bytes"] / 1e9
    out = {
        "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo", "rollouts": args.rollouts,
        "bytes": res["bytes"], "tensors": res["tensors"], "bucket_mb": args.bucket_mb, "dtype": args.dtype,
        "ours_s": ours, "flat_s": flat, "ours_gb_s": gb / ours, "flat_gb_s": gb / flat, "ratio": flat / ours,
        "raw": {"ours": res["ours"], "flat": res["flat"]},
    }  # fmt: skip
    print(f"W3 weight sync, {args.device}/{out['backend']}, 1 -> {args.rollouts} rollout ranks, "
          f"{res['tensors']} tensors, {gb:.3f} GB {args.dtype}, buckets of {args.bucket_mb} MiB")
    print(f"  ours (bucketed)   {ours * 1e3:9.1f} ms  {gb / ours:7.2f} GB/s")
    print(f"  flat broadcast    {flat * 1e3:9.1f} ms  {gb / flat:7.2f} GB/s")
    print(f"  ours / flat bandwidth: {flat / ours:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
