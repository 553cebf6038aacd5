"""`timers1 bench plan`: predicted vs measured step time of gloo layouts (1, 2 and 4 ranks) on this machine.

For each layout the training step of a small config (``TrainingRig``: engine forward +
backward, clipping, AdamW) runs on spawned gloo ranks, one torch thread each, and the step time
is the median of the slowest rank over ``--steps`` steps (after ``--warmup``) in each of
``--rounds`` rounds; a round runs every layout once, so the machine's drift is shared. The prediction
is ``timers1.parallel.step_time`` with the ``cpu_gloo`` profile, whose machine figures are
measured in the same run before any layout: the fp32 matmul peak and memcpy bandwidth of one
thread and the loopback link's alpha and beta (a 2-rank all-gather at two sizes), and, since
this machine's 2 cores are shared with other work whose load changes by the minute, the matmul
peak again inside each layout's ranks, all computing at once, after each of its measured steps
(``measure_peak_tflops``, as ``timers1 bench train`` measures it; the slowest rank's): the
prediction for that layout runs at the median of these (ranks sharing cores see it already
divided), and the memcpy bandwidth scaled by the same factor; likewise the profile's
``sync_s``, the mean wait a barrier after a short equal computation adds on these ranks (a loaded
shared machine deschedules ranks at random, and every collective waits for the slowest). Before
any layout, one-rank steps (``_one_rank_steps``) calibrate the batch-independent host overhead and
the per-window slope (``step_time.calibrate_host``); the first line prints them under
``calibration``, which ``timers1 plan --calibration`` reads. The multi-rank steps are only
compared against, never fitted. One JSON line per layout (``layout``, ``predicted_s``, ``measured_s``, ``ratio`` = measured / predicted),
then a summary line: every ratio within 1.5x either way, and the measured ranking against the
predicted one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from timers1.bench.gloo_ranks import init_rank, spawn
from timers1.errors import InputError

# name: (world size, parallel overrides)
LAYOUTS = {
    "single": (1, {}),
    "dp2": (2, dict(dp_shard=2)),
    "dp2_ep2": (2, dict(dp_shard=2, ep=2)),
    "tp2": (2, dict(dp_shard=1, tp=2)),
    "pp2": (2, dict(dp_shard=1, pp=2)),
    "dp4": (4, dict(dp_shard=4)),
    "dp4_ep4": (4, dict(dp_shard=4, ep=4)),
    "dp2_pp2": (4, dict(dp_shard=2, pp=2)),
}
TARGET = 1.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/small_cpu.yaml", help="the small config to run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable")
    p.add_argument("--layouts", nargs="+", default=["single", "dp2", "dp2_ep2", "tp2", "pp2", "dp4_ep4"],
                   choices=list(LAYOUTS), help="gloo layouts to predict and measure")
    p.add_argument("--steps", type=int, default=3, help="measured steps per layout and round (median over all rounds)")
    p.add_argument("--rounds", type=int, default=3,
                   help="the layouts run round robin this many times (each a fresh set of ranks), so that a "
                        "drift of the machine's speed falls on every layout alike")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring, in every round")
    p.add_argument("--peak-seconds", type=float, default=0.3, help="matmul peak sample after each measured step")
    p.add_argument("--cluster", default="cpu_gloo", help="profile whose link/peak figures are replaced by measured ones")


def _config(args, overrides: dict, sets: tuple = ()):
    from timers1.config import load_config

    # Eager everywhere: compile is refused with tp > 1, and the comparison is between layouts.
    return load_config(args.config, [*args.set, "model.dropout=0.0", "moe.kernel_backend=torch", "train.compile=false",
                                     *sets, *(f"parallel.{k}={v}" for k, v in overrides.items())])


def _timed_steps(rank: int, world: int, port: int, args, overrides: dict, queue) -> None:
    """One rank: build the rig, run warm-up + measured steps; rank 0 reports the median of the slowest rank."""
    import torch
    import torch.distributed as dist

    from timers1.bench.train import TrainingRig
    from timers1.train.metrics import measure_peak_tflops

    def peak_now() -> float:
        """Matmul TFLOP/s of the slowest rank while every rank of the layout runs one."""
        dist.barrier()
        rate = torch.tensor([measure_peak_tflops(torch.device("cpu"), torch.float32, seconds=args.peak_seconds)],
                            dtype=torch.float64)
        dist.all_reduce(rate, op=dist.ReduceOp.MIN)
        return float(rate)

    chunk = torch.randn(128, 128)

    def sync_now(iterations: int = 10) -> float:
        """Mean extra seconds a barrier after a short equal computation costs over the computation alone."""
        if world == 1:
            return 0.0
        alone, synced = [], []
        for _ in range(iterations):
            for times, barrier in ((alone, False), (synced, True)):
                t0 = time.perf_counter()
                for _ in range(16):
                    chunk @ chunk
                if barrier:
                    dist.barrier()
                times.append(time.perf_counter() - t0)
            dist.barrier()
        wait = torch.tensor([statistics.mean(synced) - statistics.mean(alone)], dtype=torch.float64)
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        return max(0.0, float(wait))

    init_rank(rank, world, port)
    try:
        rig = TrainingRig(_config(args, overrides), torch.device("cpu"), world_size=world)
        values, mask = rig.windows()
        samples, peaks, syncs = [], [], []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            rig.step(values, mask)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                samples.append(float(elapsed))
                peaks.append(peak_now())  # after every measured step: the machine's speed drifts with its load
                syncs.append(sync_now())
        if rank == 0:
            queue.put((samples, peaks, syncs))
    finally:
        dist.destroy_process_group()


def _one_rank_steps(rank: int, world: int, port: int, args, _overrides, queue) -> None:
    """The calibration of ``step_time.calibrate_host``: one-rank steps, plain and wrapped.

    The plain model at the full and half batch, then at the half batch the model wrapped as
    ``parallelize`` wraps it for FSDP, EP and TP layouts, on one-rank meshes: the same hooks,
    DTensor dispatch and optimizer implementation, without a peer to wait for: medians of
    ``2 * --steps`` steps each. Also the matmul peak after each round (the machine's speed when
    these figures were taken).
    """
    import torch
    import torch.distributed as dist

    from timers1.bench.train import TrainingRig
    from timers1.model import build_model
    from timers1.parallel import ParallelDims
    from timers1.parallel.expert_parallel import apply_expert_parallel
    from timers1.parallel.parallelize import apply_fsdp
    from timers1.parallel.tensor_parallel import apply_tensor_parallel
    from timers1.train.metrics import measure_peak_tflops

    init_rank(rank, world, port)
    try:
        one_rank = ParallelDims(1, 1, 1, 1, 1, 1)
        one_rank.build_meshes("cpu")  # every mesh of size 1, named as parallelize expects

        full = _config(args, {}).train.batch_size
        half = full // 2
        rigs = {}
        for name, batch, wrappings in (("plain_full_s", full, ()), ("plain_half_s", half, ()),
                                       ("fsdp_s", half, ("fsdp",)), ("fsdp_ep_s", half, ("ep", "fsdp")),
                                       ("fsdp_tp_s", half, ("tp", "ep", "fsdp"))):
            cfg = _config(args, {}, [f"train.batch_size={batch}"])
            torch.manual_seed(0)
            model = build_model(cfg.model, cfg.moe, device=torch.device("cpu"))
            if "tp" in wrappings:
                apply_tensor_parallel(model, one_rank.mesh("tp"))
            if "ep" in wrappings:
                apply_expert_parallel(model, one_rank.mesh("ep"))
            if "fsdp" in wrappings:
                apply_fsdp(model, one_rank, None, reshard_after_forward=True)
            rig = TrainingRig(cfg, torch.device("cpu"), model=model)
            rigs[name] = (rig, *rig.windows())
        # Round robin, one step of each per round: the load of this shared machine drifts by
        # the minute, and the fit and the differences need the steps taken under the same load.
        samples, updates, peaks = {name: [] for name in rigs}, {name: [] for name in rigs}, []
        for i in range(args.warmup + 2 * args.steps):
            for name, (rig, values, mask) in rigs.items():
                t0 = time.perf_counter()
                rig.step(values, mask)
                if i >= args.warmup:
                    samples[name].append(time.perf_counter() - t0)
                    updates[name].append(rig.update_s)
            if i >= args.warmup:
                peaks.append(measure_peak_tflops(torch.device("cpu"), torch.float32, seconds=args.peak_seconds))
        times = {name: statistics.median(s) for name, s in samples.items()}
        times["plain_update_s"] = statistics.median(updates["plain_full_s"] + updates["plain_half_s"])
        times["fsdp_update_s"] = statistics.median(updates["fsdp_s"])
        queue.put((full, half, times, statistics.median(peaks)))
    finally:
        dist.destroy_process_group()


def _link(rank: int, world: int, port: int, args, _overrides, queue) -> None:
    """alpha, bandwidth of the loopback link: 2-rank all-gathers of a small and a large message."""
    import torch
    import torch.distributed as dist

    init_rank(rank, world, port)
    try:
        times = {}
        for nbytes in (1024, 8 * 2**20):
            x = torch.zeros(nbytes // 8)
            out = [torch.empty_like(x) for _ in range(world)]
            samples = []
            for i in range(12):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_gather(out, x)
                samples.append(time.perf_counter() - t0)
            t = torch.tensor([statistics.median(samples[2:])], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[nbytes * world] = float(t)
        if rank == 0:
            queue.put(times)
    finally:
        dist.destroy_process_group()


def measured_profile(args):
    """The cluster profile with this machine's peak, memcpy and loopback link measured now."""
    from dataclasses import replace

    import torch

    from timers1.bench.kernels import measure_peaks
    from timers1.parallel.step_time import Link, OneRankSteps, all_gather_s, calibrate_host, cluster_profile

    torch.set_num_threads(1)
    profile = cluster_profile(args.cluster)
    tflops, gbs = measure_peaks(torch.device("cpu"), torch.float32, repeats=5, size=1024)
    (small_b, small_t), (large_b, large_t) = sorted(spawn(_link, 2, args, {}).items())
    # 2-rank ring all-gather: t = alpha + bytes / (2 bandwidth); two sizes give both.
    slope = (large_t - small_t) / (large_b - small_b)
    bandwidth = 1 / (2 * slope)
    alpha = max(1e-6, small_t - small_b / (2 * bandwidth))
    link = Link(alpha, bandwidth)
    assert abs(all_gather_s(link, 2, large_b) - large_t) < 1e-9 + 1e-6 * large_t
    here = "measured in this run"
    profile = replace(profile, peak_tflops=tflops, memory_gb_s=gbs, intra=link, inter=link,
                      sources={"peak_tflops": f"{here} (fp32, 1 thread)", "memory_gb_s": f"{here} (memcpy)",
                               "link": f"{here} (2-rank all-gathers, two sizes)"})
    # The one-rank steps ran at their own peak: the host figures and the slope hold at that speed.
    full, half, times, peak = spawn(_one_rank_steps, 1, args, {})
    steps = OneRankSteps(full, half, **times)
    at_peak = replace(profile, peak_tflops=peak, memory_gb_s=gbs * peak / tflops)
    return calibrate_host(at_peak, _config(args, {}), steps, here), steps


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from timers1.parallel import ParallelDims
    from timers1.parallel.step_time import predict_step

    if args.rounds < 1 or args.steps < 1:
        raise InputError(f"--rounds {args.rounds}, --steps {args.steps}: both must be >= 1")
    profile, one_rank = measured_profile(args)
    print(json.dumps({"bench": "plan", "profile": profile.name, "figures": profile.figures_used(),
                      "one_rank_steps": {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(one_rank).items()},
                      "calibration": {"peak_tflops": profile.peak_tflops, "memory_gb_s": profile.memory_gb_s,
                                      "other_fraction": profile.other_fraction, "link": asdict(profile.intra),
                                      "host_overhead_ms": {k: v * 1e3 for k, v in asdict(profile.host).items()}}}),
          flush=True)
    # Round robin over the layouts: this shared machine's speed drifts by 10-30% within minutes,
    # and layouts measured minutes apart would be ranked by the drift, not by their cost.
    taken = {name: ([], [], []) for name in args.layouts}  # samples, peaks, syncs
    for _ in range(args.rounds):
        for name in args.layouts:
            world, overrides = LAYOUTS[name]
            for kept, new in zip(taken[name], spawn(_timed_steps, world, args, overrides)):
                kept.extend(new)
    results = []
    for name in args.layouts:
        world, overrides = LAYOUTS[name]
        cfg = _config(args, overrides)
        dims = ParallelDims.from_config(cfg.parallel, world)
        samples, peaks, syncs = taken[name]
        peak = statistics.median(peaks)
        # Everything on the cores slows with the load: the host overhead measured at the
        # calibration's peak scales like the matmuls (ranks sharing cores see ``peak`` divided).
        slower = profile.peak_tflops / peak
        now = replace(profile, peak_tflops=peak, memory_gb_s=profile.memory_gb_s / slower,
                      host=profile.host.scaled(slower), compute_slots_per_node=0, sync_s=statistics.median(syncs))
        predicted = predict_step(cfg, dims, now)
        measured = statistics.median(samples)
        record = {"bench": "plan", "layout": name, "ranks": world, "dims": dims.layout,
                  "predicted_s": round(predicted.step_time_s, 4), "measured_s": round(measured, 4),
                  "ratio": round(measured / predicted.step_time_s, 3),
                  "predicted_compute_s": round(predicted.compute_s, 4),
                  "predicted_exposed_comm_s": round(predicted.exposed_comm_s, 4),
                  "predicted_bubble_s": round(predicted.bubble_s, 4),
                  "predicted_host_s": round(predicted.host_s, 4),
                  "measured_min_s": round(min(samples), 4), "measured_max_s": round(max(samples), 4),
                  "peak_tflops_per_rank": [round(x, 4) for x in peaks], "sync_ms": round(now.sync_s * 1e3, 2)}
        results.append(record)
        print(json.dumps(record), flush=True)
    by_pred = [r["layout"] for r in sorted(results, key=lambda r: r["predicted_s"])]
    by_meas = [r["layout"] for r in sorted(results, key=lambda r: r["measured_s"])]
    worst = max(max(r["ratio"], 1 / r["ratio"]) for r in results)
    discordant = discordant_pairs(results)
    print(json.dumps({"bench": "plan", "summary": True, "worst_factor": round(worst, 3),
                      "within_target": worst <= TARGET, "target": TARGET, "predicted_ranking": by_pred,
                      "measured_ranking": by_meas, "ranking_equal": by_pred == by_meas,
                      "discordant_pairs": discordant,
                      "ranking_equal_where_measured_apart": not any(not d["measured_overlap"] for d in discordant)}),
          flush=True)
    return 0


def discordant_pairs(results: list[dict]) -> list[dict]:
    """Pairs of layouts the prediction orders one way and the measurement the other, with both
    gaps and whether the two layouts' measured step ranges (min-max) overlap: where they do, the
    measurement itself cannot tell which is faster."""
    out = []
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            if (a["predicted_s"] - b["predicted_s"]) * (a["measured_s"] - b["measured_s"]) < 0:
                out.append({"layouts": [a["layout"], b["layout"]],
                            "predicted_gap": round(abs(a["predicted_s"] / b["predicted_s"] - 1), 3),
                            "measured_gap": round(abs(a["measured_s"] / b["measured_s"] - 1), 3),
                            "measured_overlap": a["measured_min_s"] <= b["measured_max_s"]
                            and b["measured_min_s"] <= a["measured_max_s"]})
    return out


NAME = "plan"
HELP = "predicted vs measured step time of gloo layouts on this machine (JSON lines)"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
