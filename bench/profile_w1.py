"""Where W1's time goes: the decode step (one token, all rows) and one train micro-batch, by kernel.

    PYTHONPATH=runtime python bench/profile_w1.py [--compile on] [--bucket-slots 256]

Prints CUDA-graph replay time per decode step for each cache bucket (events), then the torch
profiler's kernel table for one eager decode step and for one fwd+bwd micro-batch.

The first version profiled the eager step inside the process that had just replayed the graphs and
died with a segmentation fault on the H100 (2026-11-25); the graphs are now freed first and the
profiled step runs on a separate engine with no graphs. Not yet re-run on a GPU.
"""

from __future__ import annotations

import argparse

import torch

from kuberl_runtime.engines.base import SamplingParams
from kuberl_runtime.engines.fast_rollout import FastRolloutEngine
from kuberl_runtime.engines.fast_train import FastTrainStep
from w1_grpo import EOS, PAD, W1_SHAPE, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", type=lambda s: s == "on", default=True)
    ap.add_argument("--rows", type=int, default=64, help="sequences in the profiled train micro-batch")
    args = ap.parse_args()
    model = build_model(W1_SHAPE, "cuda", torch.bfloat16)
    engine = FastRolloutEngine(model, pad_token_id=PAD, eos_token_id=EOS, compile_layers=args.compile)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, W1_SHAPE["vocab"], (128,), generator=g) for _ in range(512)]
    params = SamplingParams(temperature=1.0, max_new_tokens=256, ignore_eos=True, seed=0)
    engine.generate(prompts, params)
    st = engine._state
    for lb, graph in sorted(st.graphs.items()):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"decode graph Lb={lb}: {start.elapsed_time(end) / 20:.3f} ms/step")
    from torch.profiler import ProfilerActivity, profile

    engine.sleep()
    del st, graph
    eager = FastRolloutEngine(model, pad_token_id=PAD, eos_token_id=EOS, compile_layers=args.compile, use_cuda_graph=False)
    eager._gen = torch.Generator(device="cuda")
    est = eager._ensure_state(512, 128, 256, params)
    for buf in (*est.k, *est.v):  # never time on zeros
        buf.normal_()
    with torch.no_grad():
        eager._decode_step(est, 256, params)  # compile / warm up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager._decode_step(est, 256, params)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    eager.sleep()
    step = FastTrainStep(model, lr=1e-6, micro_batch_tokens=args.rows * 384, checkpoint=False, compile_layers=args.compile)
    responses = [torch.randint(2, W1_SHAPE["vocab"], (256,), generator=g) for _ in range(args.rows)]
    batch = step.collate(prompts[: args.rows], responses)
    for _ in range(2):
        step.step(batch, lambda lp, idx: -lp.mean())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step.step(batch, lambda lp, idx: -lp.mean())
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
