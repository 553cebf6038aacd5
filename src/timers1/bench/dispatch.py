"""`timers1 bench dispatch`: EP all-to-all dispatch + combine time per MoE layer vs the expert compute it feeds.

For each EP size, ep ranks each route ``--tokens`` tokens (random router, top-k of E) and
time, per MoE layer forward: (a) the dispatcher alone, i.e. the count exchange, the
all-to-all of the rows, the expert-major regroup, the inverse regroup and the reverse
all-to-all (``timers1.parallel.expert_parallel``, with the expert compute left out), and (b)
the grouped SwiGLU expert compute on the rows this rank received. It prints one JSON line
per EP size with both medians (max over ranks) and ``ratio = dispatch / experts``.

On CPU the ranks are spawned here and talk over gloo (loopback TCP; with 2 cores, ep=4
oversubscribes, which the ratio includes). Under torchrun on GPUs (``torchrun --nproc_per_node
N -m timers1.cli bench dispatch``) the same code measures NCCL on the existing group at ep =
world size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from timers1.bench.gloo_ranks import init_rank, spawn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="EP sizes to measure (CPU: spawned ranks)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per MoE layer")
    p.add_argument("--hidden", type=int, default=256, help="model width D")
    p.add_argument("--expert-hidden", type=int, default=512, help="expert width F")
    p.add_argument("--experts", type=int, default=8, help="experts E")
    p.add_argument("--top-k", type=int, default=2, help="experts per token K")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(args, device) -> dict:
    import torch
    import torch.distributed as dist

    from timers1.kernels import permute, route, swiglu_experts
    from timers1.parallel.expert_parallel import combine, dispatch, plan_dispatch

    ep = dist.get_world_size()
    group = dist.group.WORLD
    torch.manual_seed(dist.get_rank())
    d, f, e, k, t = args.hidden, args.expert_hidden, args.experts, args.top_k, args.tokens
    x_TD = torch.randn(t, d, device=device)
    routing = route(torch.randn(t, e, device=device), k)
    x_SD = permute(x_TD, routing.sorted_slots_S, k)
    local = e // ep
    w_g = torch.randn(local, f, d, device=device) * 0.02
    w_u = torch.randn(local, f, d, device=device) * 0.02
    w_d = torch.randn(local, d, f, device=device) * 0.02

    def dispatch_combine():
        # The training path's own three phases (ExpertParallel), the expert compute left out.
        plan = plan_dispatch(routing.tokens_per_expert_E, group)
        grouped = dispatch(x_SD, plan, group)
        return combine(grouped, plan, group), plan, grouped

    _, plan, grouped = dispatch_combine()

    def experts():
        return swiglu_experts(grouped, plan.tokens_per_expert_G, w_g, w_u, w_d)

    times = {}
    with torch.no_grad():
        for name, fn in (("dispatch_combine", dispatch_combine), ("experts", experts)):
            samples = []
            for i in range(args.warmup + args.iters):
                dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if i >= args.warmup:
                    samples.append(time.perf_counter() - t0)
            med = torch.tensor([statistics.median(samples)], dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            times[name] = float(med)
    backend = dist.get_backend()
    return {"bench": "dispatch", "backend": backend, "device": device.type, "ep": ep, "tokens_per_rank": t,
            "hidden": d, "expert_hidden": f, "experts": e, "top_k": k,
            "dispatch_combine_ms": round(times["dispatch_combine"] * 1e3, 3),
            "experts_ms": round(times["experts"] * 1e3, 3),
            "ratio": round(times["dispatch_combine"] / times["experts"], 3)}


def _spawned(rank: int, world: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist

    init_rank(rank, world, port)
    try:
        result = _measure(args, torch.device("cpu"))
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from timers1.parallel import init_distributed
        import torch.distributed as dist

        device = init_distributed()
        result = _measure(args, device)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
        return 0
    for ep in args.ep:
        if args.experts % ep:
            print(f"timers1 bench dispatch: --experts={args.experts} not divisible by ep={ep}; skipped", file=sys.stderr)
            continue
        print(json.dumps(spawn(_spawned, ep, args)), flush=True)
    return 0


NAME = "dispatch"
HELP = "EP all-to-all dispatch+combine time vs expert compute (JSON lines)"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
