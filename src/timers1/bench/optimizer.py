"""`timers1 bench optimizer`: DeepSpeed's CPU Adam against torch AdamW on the same parameters.

Both update the same fp32 parameters with the same gradients (host memory: the offload and CPU
training path). Prints ms per step for each and the speedup, measured in the same run. Needs
the optional extra (`pip install --no-build-isolation -e '.[offload]'`: deepspeed's build
must see the installed CPU torch, or it pulls a CUDA one; g++ and ninja JIT-build the op on
first use, about 45 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

NAME = "optimizer"
HELP = "DeepSpeed CPU Adam vs torch AdamW step time on the same parameters"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params-millions", type=float, default=20.0, help="fp32 parameters to update")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps of each")


def _time_steps(optimizer, params, steps: int) -> float:
    optimizer.step()  # warm-up: allocate states
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps


def run(args) -> int:
    import torch

    numel = int(args.params_millions * 1e6)
    chunks = 16  # many tensors, as a model has
    def make():
        params = [torch.nn.Parameter(torch.randn(numel // chunks)) for _ in range(chunks)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return params

    torch_params = make()
    torch_ms = _time_steps(torch.optim.AdamW(torch_params, lr=1e-3, foreach=True), torch_params, args.steps) * 1e3
    record = {"bench": "optimizer", "params": numel, "torch_adamw_ms": round(torch_ms, 2)}
    # The trainer's choice for plain CPU tensors (train/optim.py adamw_implementation).
    fused_params = make()
    fused_ms = _time_steps(torch.optim.AdamW(fused_params, lr=1e-3, fused=True), fused_params, args.steps) * 1e3
    record.update({"torch_adamw_fused_ms": round(fused_ms, 2), "fused_speedup_vs_foreach": round(torch_ms / fused_ms, 2)})
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError as exc:
        record["deepspeed_cpu_adam"] = f"unavailable: {exc}; pip install --no-build-isolation -e '.[offload]'"
        print(json.dumps(record))
        return 0
    ds_params = make()
    ds_ms = _time_steps(DeepSpeedCPUAdam(ds_params, lr=1e-3, adamw_mode=True), ds_params, args.steps) * 1e3
    record.update({"deepspeed_cpu_adam_ms": round(ds_ms, 2), "speedup_vs_torch": round(torch_ms / ds_ms, 2),
                   "speedup_vs_torch_fused": round(fused_ms / ds_ms, 2)})
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
