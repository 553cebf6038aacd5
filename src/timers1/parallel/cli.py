"""`timers1 plan`: per-GPU memory of a config on a cluster, for a given or a searched layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _plan(args: argparse.Namespace) -> int:
    from timers1.config import load_config
    from timers1.errors import InputError
    from timers1.parallel.plan import param_groups, parse_layout, plan_dict, plan_memory, suggest

    cfg = load_config(args.config, args.set)
    if args.gpus < 1 or args.gpu_mem_gib <= 0:
        raise InputError(f"--gpus={args.gpus} and --gpu-mem-gib={args.gpu_mem_gib} must be positive")
    if args.layout:
        dims = parse_layout(args.layout, args.gpus)
        m = cfg.model
        dims.check_model(cfg.moe.num_experts, m.num_heads, m.hidden_size, m.num_layers + m.num_stp_blocks,
                         cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches)
        plans = [plan_memory(cfg, dims, args.gpu_mem_gib, args.precision, param_groups(cfg))]
        header = "layout given"
    else:
        plans = suggest(cfg, args.gpus, args.gpu_mem_gib, args.precision)[: args.top]
        if not plans:
            raise InputError(f"no valid layout for {args.gpus} GPUs with this config")
        header = "suggested layout first, then the next candidates"
    if args.json:
        for pl in plans:
            print(json.dumps(plan_dict(pl)))
        return 0
    total, _ = None, None
    print(f"config {args.config}  gpus {args.gpus} x {args.gpu_mem_gib:g} GiB  precision {args.precision} "
          f"(fp32 master + grads + AdamW states, bf16 compute)  batch {cfg.train.batch_size} windows of "
          f"{cfg.data.context_points} points  activation_checkpointing={cfg.parallel.activation_checkpointing}")
    print(f"per-GPU memory, worst rank ({header}):")
    for pl in plans:
        print("  " + pl.line())
    best = plans[0]
    print(f"answer: {'fits' if best.fits else 'does NOT fit'} with "
          + ",".join(f"{k}={v}" for k, v in best.layout.items())
          + f" ({best.total_gib:.1f} of {args.gpu_mem_gib:g} GiB; 90% usable)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory (params, grads, optimizer, activations) of a layout")
    p.add_argument("--config", type=Path, required=True, help="YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--layout", default="", help="e.g. dp_shard=8,tp=1,pp=1,ep=8 (default: search)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="training precision the memory is planned for")
    p.add_argument("--top", type=int, default=5, help="candidates to print when searching")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=_plan)
