"""`timers1 bench train`: steps/s, tokens/s and MFU of a training step on this machine.

MFU's denominator is the dense matmul peak measured in the same run (best of several) on the same
device and dtype (fp32 on CPU), so the ratio says how much of what this machine can do the whole step
(attention, routing, permutation, norms, optimizer) turns into model FLOPs. Steps and peak
measurements alternate in rounds (see ``run``), so the ratio holds on a machine whose speed drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/small_cpu.yaml", help="run config (model, moe, context, batch)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override, repeatable")
    p.add_argument("--steps", type=int, default=20, help="measured steps (after 2 warm-up steps), split over the rounds")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of steps, each followed by a peak measurement; MFU is the median of the rounds' ratios")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of the first round's steps")


class TrainingRig:
    """One process's training step driven through the engine, on synthetic random-walk windows.

    The same step the trainer runs (engine forward + backward, gradient clipping, the part
    optimizers and their LR schedule) without the trainer's data loader, checkpoints or logs,
    so benchmarks measure the step alone. With ``world_size`` > 1 (an initialised process group)
    this rank steps on its data shard (``batch_size / dp`` windows; the tp and pp ranks of a dp
    group draw the same ones). ``model``: one the caller built (and possibly wrapped, as
    ``bench plan``'s one-rank stand-ins of FSDP/TP/EP are) instead of a fresh one.
    """

    def __init__(self, cfg, device, seed: int = 0, world_size: int = 1, model=None):
        import torch

        from timers1.host_memory import keep_freed_host_memory
        from timers1.model import build_model
        from timers1.parallel.engine import build_engine
        from timers1.train.optim import PartOptimizers

        keep_freed_host_memory()  # the trainer's allocator behaviour, so the step measured is its step
        self.cfg, self.device = cfg, device
        self.model = model if model is not None else build_model(cfg.model, cfg.moe, device=device)
        self.engine = build_engine(self.model, cfg, world_size=world_size, device=device)
        self.optimizers = PartOptimizers(self.engine.model_parts, cfg.train)
        self.window_points = cfg.window_points
        self.rank_windows = cfg.train.batch_size // self.engine.dp_size
        self.generator = torch.Generator(device=device).manual_seed(seed + self.engine.dp_rank)
        self.patches_per_step = cfg.train.batch_size * cfg.data.context_points // cfg.model.patch_points

    def windows(self):
        """(values_BW, mask_BW): a fresh batch of this rank's random walks, generated on the device."""
        import torch

        values_BW = torch.randn(self.rank_windows, self.window_points, device=self.device,
                                generator=self.generator).cumsum(-1)
        return values_BW, torch.ones_like(values_BW)

    def step(self, values_BW, mask_BW) -> dict[str, float]:
        """One optimizer step; returns the loss parts (a host sync, as the trainer's logging is)."""
        self.optimizers.zero_grad()
        result = self.engine.forward_backward(values_BW, mask_BW)
        update_start = time.perf_counter()
        self.engine.clip_grad_norm(self.cfg.train.grad_clip_norm or float("inf"))
        self.optimizers.step()
        self.optimizers.schedule_step()
        # Host seconds of clip + optimizer (the device's, on CPU): bench plan's per-step share.
        self.update_s = time.perf_counter() - update_start
        return result.loss_floats

    def train_flops_per_step(self) -> float:
        from timers1.model.flops import train_flops_per_patch

        cfg = self.cfg
        context_patches = cfg.data.context_points // cfg.model.patch_points
        return train_flops_per_patch(cfg.model, cfg.moe, context_patches) * self.patches_per_step


def run(args) -> int:
    import contextlib
    import statistics

    import torch

    from timers1.config import load_config
    from timers1.train.metrics import measure_peak_tflops

    cfg = load_config(args.config, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rig = TrainingRig(cfg, device)
    values, mask = rig.windows()

    def step():
        rig.step(values, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    # Steps and peak alternate: a shared machine's speed drifts by tens of percent over a minute
    # (other tenants, clocks), and a step timed at one moment against a peak measured at another
    # would carry that drift into MFU. Each round's MFU divides by the peak measured right after
    # it; the medians over rounds are reported.
    rounds = max(1, min(args.rounds, args.steps))
    step_s, peaks = [], []
    for r in range(rounds):
        profiler = contextlib.nullcontext()
        if args.profile and r == 0:
            from torch.profiler import profile, tensorboard_trace_handler

            profiler = profile(on_trace_ready=tensorboard_trace_handler(args.profile), record_shapes=True)
        steps = args.steps // rounds + (r < args.steps % rounds)
        with profiler:
            started = time.perf_counter()
            for _ in range(steps):
                step()
            step_s.append((time.perf_counter() - started) / steps)
        peaks.append(measure_peak_tflops(device, dtype))
    flops = rig.train_flops_per_step()
    mfu_rounds = [flops / s / 1e12 / peak for s, peak in zip(step_s, peaks)]
    elapsed, peak = statistics.median(step_s), statistics.median(peaks)
    patches = rig.patches_per_step
    print(json.dumps({
        "bench": "train", "config": str(args.config), "device": str(device),
        "params": sum(p.numel() for p in rig.model.parameters()), "batch_windows": cfg.train.batch_size,
        "context_points": cfg.data.context_points, "compile": rig.engine.loss_cfg.compile,
        "step_s": round(elapsed, 4), "steps_per_s": round(1 / elapsed, 3),
        "tokens_per_s": round(patches / elapsed), "points_per_s": round(patches * cfg.model.patch_points / elapsed),
        "model_tflops_per_s": round(flops / elapsed / 1e12, 5), "peak_tflops_measured": round(peak, 4),
        "mfu": round(statistics.median(mfu_rounds), 4), "mfu_rounds": [round(m, 4) for m in mfu_rounds],
    }))
    return 0


NAME = "train"
HELP = "training step throughput and MFU vs the measured matmul peak"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
