"""`timers1 plan`: which layout to run a config on N GPUs of a cluster, by predicted step time and memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PLOT_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def _profile(args, cfg):
    from dataclasses import replace

    from timers1.errors import InputError
    from timers1.parallel.step_time import CLUSTERS_YAML, DEFAULT_CLUSTER, calibrate, cluster_profile

    profile = cluster_profile(args.cluster or DEFAULT_CLUSTER, args.clusters_file or CLUSTERS_YAML)
    if args.calibration:
        profile = calibrate(profile, args.calibration, cfg)
    if args.gemm_efficiency is not None:
        if not 0 < args.gemm_efficiency <= 1:
            raise InputError(f"--gemm-efficiency={args.gemm_efficiency}: must be in (0, 1]")
        profile = replace(profile, gemm_efficiency=args.gemm_efficiency,
                          sources={**profile.sources, "gemm_efficiency": "--gemm-efficiency"})
    return profile


def _dims_text(layout: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items() if k != "dp_replicate")


def _row(rank: int, pl) -> str:
    s = pl.step
    return (f"{rank:>3}  {_dims_text(s.layout):<62} {pl.memory.total_gib:7.1f} {'yes' if pl.fits else 'NO ':>4} "
            f"{s.step_time_s:8.3f} {s.compute_s:8.3f} {s.exposed_comm_s:8.3f} {s.bubble_s:7.3f} "
            f"{s.tokens_per_s / 1e3:9.1f}k {100 * s.mfu:6.1f}%")


HEADER = (f"{'#':>3}  {'layout':<62} {'mem GiB':>7} {'fits':>4} {'step s':>8} {'compute':>8} {'exp.comm':>8} "
          f"{'bubble':>7} {'tokens/s':>10} {'MFU':>7}")


def scaling_plot(cfg, profile, gpu_mem_gib, path: Path, title: str) -> list[dict]:
    """PNG of the best fitting layout's predicted MFU and step time against GPU count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timers1.parallel.step_time import rank_layouts

    points = []
    for gpus in PLOT_GPUS:
        ranked = rank_layouts(cfg, gpus, profile, gpu_mem_gib)
        if ranked and ranked[0].fits:
            s = ranked[0].step
            points.append(dict(gpus=gpus, step_time_s=s.step_time_s, mfu=s.mfu, layout=_dims_text(s.layout)))
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p["gpus"] for p in points]
    ax.plot(xs, [100 * p["mfu"] for p in points], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(f"GPUs ({profile.name})")
    ax.set_ylabel("predicted MFU (%)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["step_time_s"] for p in points], "s--", color="tab:red")
    ax2.set_yscale("log")
    ax2.set_ylabel("predicted step time (s)", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return points


def _plan(args: argparse.Namespace) -> int:
    from timers1.config import load_config
    from timers1.errors import InputError
    from timers1.parallel.plan import param_groups, parse_layout, plan_memory
    from timers1.parallel.step_time import LayoutPlan, predict_step, rank_layouts

    cfg = load_config(args.config, args.set)
    if args.gpus < 1 or (args.gpu_mem_gib is not None and args.gpu_mem_gib <= 0) or args.top < 1:
        raise InputError(f"--gpus={args.gpus}, --gpu-mem-gib={args.gpu_mem_gib} and --top={args.top} must be positive")
    if args.expert_load_factor < 1:
        raise InputError(f"--expert-load-factor={args.expert_load_factor}: must be >= 1 (max over mean routed load)")
    profile = _profile(args, cfg)
    if args.precision:
        from dataclasses import replace

        profile = replace(profile, precision=args.precision)
    mem = args.gpu_mem_gib or profile.gpu_mem_gib
    if args.layout:
        dims = parse_layout(args.layout, args.gpus)
        m = cfg.model
        dims.check_model(cfg.moe.num_experts, m.num_heads, m.hidden_size, m.num_layers + m.num_stp_blocks,
                         cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches)
        groups = param_groups(cfg)
        plans = [LayoutPlan(predict_step(cfg, dims, profile, groups, args.expert_load_factor),
                            plan_memory(cfg, dims, mem, profile.precision, groups))]
        header = "layout given"
    else:
        plans = rank_layouts(cfg, args.gpus, profile, mem, args.expert_load_factor)
        if not plans:
            raise InputError(f"no valid layout for {args.gpus} GPUs with this config")
        header = "ranked by predicted step time, layouts that fit first"
    if args.plot:
        title = f"{args.config}: best layout per GPU count on {profile.name}"
        points = scaling_plot(cfg, profile, mem, Path(args.plot), title)
    if args.json:
        for pl in plans[: args.top]:
            print(json.dumps({"gpus": args.gpus, "cluster": profile.name, **pl.as_dict()}))
        return 0
    nodes = -(-args.gpus // profile.gpus_per_node)
    print(f"config {args.config}  gpus {args.gpus} ({nodes} node(s) of {profile.gpus_per_node}) x {mem:g} GiB on "
          f"{profile.name}: {profile.description}")
    print(f"batch {cfg.train.batch_size} windows of {cfg.data.context_points} points, precision {profile.precision}, "
          f"activation_checkpointing={cfg.parallel.activation_checkpointing}, "
          f"expert load factor {args.expert_load_factor:g}")
    print("figures used: " + "; ".join(f"{k} {v}" for k, v in profile.figures_used().items()))
    print(f"{header} (times per optimizer step; MFU against {profile.peak_tflops:g} TFLOP/s per GPU):")
    print(HEADER)
    for i, pl in enumerate(plans[: args.top], 1):
        print(_row(i, pl))
    best = plans[0]
    print("memory of the first, worst rank: " + best.memory.line())
    print(f"answer: {'fits' if best.fits else 'does NOT fit'}; put in the config: "
          f"parallel: {{{', '.join(f'{k}: {v}' for k, v in best.step.layout.items())}}} "
          f"({best.memory.total_gib:.1f} of {mem:g} GiB, 90% usable; {best.step.step_time_s:.3f} s/step, "
          f"MFU {100 * best.step.mfu:.1f}%)")
    if args.plot:
        print(f"plot: {args.plot} (" + ", ".join(f"{p['gpus']}: {100 * p['mfu']:.1f}%" for p in points) + ")")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="rank layouts for N GPUs by predicted step time (compute, communication, "
                                    "bubble) and per-GPU memory")
    p.add_argument("--config", type=Path, required=True, help="YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--cluster", default=None, help="cluster profile in --clusters-file (default h100_sxm)")
    p.add_argument("--clusters-file", type=Path, default=None, help="YAML of cluster profiles (default configs/clusters.yaml)")
    p.add_argument("--calibration", action="append", default=[], metavar="JSONL",
                   help="timers1 bench output (gpu results.jsonl, train, dispatch) whose measured figures replace "
                        "the profile's; repeatable")
    p.add_argument("--gemm-efficiency", type=float, default=None, help="fraction of peak the matmuls reach")
    p.add_argument("--expert-load-factor", type=float, default=1.0,
                   help="max over mean routed load per expert rank (the busiest rank sets the pace)")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="memory per GPU in GiB (default: the profile's)")
    p.add_argument("--layout", default="", help="e.g. dp_shard=8,tp=1,pp=1,ep=8 (default: search)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: the profile's")
    p.add_argument("--top", type=int, default=5, help="layouts to print when searching")
    p.add_argument("--plot", metavar="PNG", help="also plot predicted MFU and step time against 8..1,024 GPUs")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=_plan)
