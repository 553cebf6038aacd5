"""`timers1 bench train`: steps/s, tokens/s and MFU of a training step on this machine.

MFU's denominator is the dense matmul peak measured in the same run on the same device and
dtype (fp32 on CPU), so the ratio says how much of what this machine can do the whole step
(attention, routing, permutation, norms, optimizer) turns into model FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/small_cpu.yaml", help="run config (model, moe, context, batch)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=10, help="measured steps (after 2 warm-up steps)")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of the measured steps")


def run(args) -> int:
    import contextlib

    import torch

    from timers1.config import load_config
    from timers1.model import build_model
    from timers1.model.flops import train_flops_per_patch
    from timers1.parallel.engine import build_engine
    from timers1.train.metrics import measure_peak_tflops
    from timers1.train.optim import build_optimizer

    cfg = load_config(args.config, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, cfg.moe, device=device)
    engine = build_engine(model, cfg, world_size=1, device=device)
    optimizer = build_optimizer([model], cfg.train)
    width = cfg.data.context_points + (cfg.model.num_stp_blocks + 1) * cfg.model.patch_points
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(cfg.train.batch_size, width, generator=gen).cumsum(-1).to(device)
    mask = torch.ones_like(values)
    def step():
        optimizer.zero_grad(set_to_none=True)
        engine.forward_backward(values, mask)
        engine.clip_grad_norm(cfg.train.grad_clip_norm or float("inf"))
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    profiler = contextlib.nullcontext()
    if args.profile:
        from torch.profiler import profile, tensorboard_trace_handler

        profiler = profile(on_trace_ready=tensorboard_trace_handler(args.profile), record_shapes=True)
    with profiler:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        elapsed = (time.perf_counter() - started) / args.steps
    peak = measure_peak_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32, seconds=1.0)
    patches = cfg.train.batch_size * cfg.data.context_points // cfg.model.patch_points
    flops = train_flops_per_patch(cfg.model, cfg.moe, cfg.data.context_points // cfg.model.patch_points) * patches
    print(json.dumps({
        "bench": "train", "config": str(args.config), "device": str(device),
        "params": sum(p.numel() for p in model.parameters()), "batch_windows": cfg.train.batch_size,
        "context_points": cfg.data.context_points, "step_s": round(elapsed, 4), "steps_per_s": round(1 / elapsed, 3),
        "tokens_per_s": round(patches / elapsed), "points_per_s": round(patches * cfg.model.patch_points / elapsed),
        "model_tflops_per_s": round(flops / elapsed / 1e12, 5), "peak_tflops_measured": round(peak, 4),
        "mfu": round(flops / elapsed / 1e12 / peak, 4),
    }))
    return 0


NAME = "train"
HELP = "training step throughput and MFU vs the measured matmul peak"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
