"""The step-time model of `timers1 plan`: hand-computed FLOPs and bytes, alpha-beta collective
costs, a ranking that only depends on the layouts, and layouts that do not fit never first."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from timers1.cli import main as cli_main
from timers1.config import load_config
from timers1.parallel import ParallelDims
from timers1.parallel.plan import param_groups
from timers1.parallel.step_time import (ClusterProfile, Collective, HostOverhead, Link, OneRankSteps, all_gather_s,
                                        all_reduce_s, all_to_all_s, calibrate_host, cluster_profile, load_clusters,
                                        predict_step, rank_layouts, rank_work, reduce_scatter_s)
from tests.conftest import CONFIGS_DIR


def _profile(**over) -> ClusterProfile:
    base = dict(name="test", description="", gpus_per_node=8, gpu_mem_gib=80, peak_tflops=100.0, memory_gb_s=1000.0,
                precision="fp32", backend="nccl", gemm_efficiency=0.5, grouped_gemm_ratio=0.8, other_fraction=0.25,
                alltoall_efficiency=0.5, comm_overlaps_compute=False, intra=Link(1e-6, 100e9), inter=Link(10e-6, 10e9))
    return ClusterProfile(**{**base, **over})


def test_tiny_flops_and_bytes_by_hand():
    # tiny.yaml: P 16, D 64, L 2, H 2, I 128 (F = 64), E 4, K 2, 9 quantiles, 256 points = 16
    # patches, batch 8. Layout: 4 ranks, dp_shard 2 x tp 2, ep 2 -> 4 windows and 32 tokens per rank.
    cfg = load_config(CONFIGS_DIR / "tiny.yaml")
    dims = ParallelDims(dp_shard=2, tp=2, ep=2, world_size=4)
    w = rank_work(cfg, dims, "fp32")
    attention_proj, scores, router = 2 * 5 * 64 * 64, 2 * 16 * 64, 2 * 64 * 4
    experts, stp_extra = 2 * 3 * 2 * 64 * 64, 2 * 2 * 64 * 64
    head, embed = 2 * (64 * 64 + 2 * 64 * 9 * 16), 2 * (2 * 16 * 128 + 128 * 64 + 2 * 16 * 64)
    dense_fwd_per_token = 4 * (attention_proj + scores + router) + 2 * stp_extra + 3 * head + embed
    assert dense_fwd_per_token == 370688
    assert w.dense_flops == 32 * 3 * 370688 == 35_586_048
    assert w.expert_flops == 32 * 3 * 4 * experts == 18_874_368
    # Summed over the 4 ranks: the model's training FLOPs of the global batch (flops.py).
    from timers1.model.flops import train_flops_per_patch
    assert 4 * (w.dense_flops + w.expert_flops) == train_flops_per_patch(cfg.model, cfg.moe, 16) * 8 * 16

    by = {(c.what, c.op): c for c in w.collectives if c.what in ("tp", "ep")}
    a2a = by["ep", "all_to_all"]
    assert (a2a.group, a2a.nbytes, a2a.count) == (2, 32 * 2 * 64 * 4, 4 * 2 * 2)   # tokens K D fp32; 4 blocks x 2 x fwd+bwd
    assert by["tp", "reduce_scatter"].nbytes == 4 * 16 * 64 * 4 and by["tp", "reduce_scatter"].count == 8
    preds = [c for c in w.collectives if c.what == "tp" and c.nbytes == 4 * 16 * 9 * 16 * 4]
    assert len(preds) == 1 and preds[0].count == 3                                   # last main + 2 STP predict
    g = param_groups(cfg)
    # Gradients of tp-replicated weights, one fp32 all-reduce each: per block 2 norms, 2 QK
    # scales and the router; per STP block 3 norms and the projection; embedding and head 3
    # linears with biases; the final norm.
    assert (g.tensors["block_rep"], g.tensors["stp_extra"], g.tensors["embed"], g.tensors["head"]) == (5, 4, 6, 6)
    rep = by["tp", "all_reduce"]
    assert rep.count == 4 * 5 + 2 * 4 + 6 + 6 + 1 == 41
    assert rep.nbytes * rep.count == pytest.approx((4 * g.block_rep + 2 * g.stp_extra + g.embed + g.head + g.norm) * 4)
    dense_params = 4 * (g.block_tp / 2 + g.block_rep) + 2 * g.stp_extra
    fsdp = [c for c in w.collectives if c.what == "fsdp"]
    # One gather per unit (4 blocks), forward + backward; a unit's average bytes each.
    assert fsdp[0] == Collective("fsdp", "all_gather", 2, 2, dense_params / 4 * 4, 2 * 4)
    assert fsdp[2] == Collective("fsdp", "all_gather", 2, 2, g.block_expert / 2 * 4, 2 * 4)  # efsdp = 2*2/2
    assert w.optimizer_bytes == 32 * ((dense_params + g.embed + g.head + g.norm) / 2 + 4 * g.block_expert / 2 / 2)


def test_collectives_follow_alpha_beta():
    p = _profile()
    gb = 1e9
    assert all_gather_s(p.intra, 4, gb) == pytest.approx(3 * 1e-6 + 0.75 * gb / 100e9)
    assert reduce_scatter_s(p.intra, 4, gb) == all_gather_s(p.intra, 4, gb)
    # gloo runs a reduce-scatter as an all-reduce of the whole input.
    rs = Collective("fsdp", "reduce_scatter", 4, 1, gb, 1)
    assert rs.seconds(p) == pytest.approx(reduce_scatter_s(p.intra, 4, gb))
    assert rs.seconds(replace(p, backend="gloo")) == pytest.approx(all_reduce_s(p.intra, 4, gb))
    assert all_reduce_s(p.inter, 2, gb) == pytest.approx(2 * (10e-6 + 0.5 * gb / 10e9))
    assert all_gather_s(p.intra, 1, gb) == 0.0
    # A group of 4 with stride 4 spans 2 per node: the ring runs at the inter-node bottleneck.
    assert Collective("fsdp", "all_gather", 4, 4, gb, 3).seconds(p) == pytest.approx(3 * (3 * 10e-6 + 0.75 * gb / 10e9))
    assert Collective("tp", "all_gather", 8, 1, gb, 1).seconds(p) == pytest.approx(7e-6 + 7 / 8 * gb / 100e9)
    # All-to-all over 16 ranks, 8 per node: 7/16 of the bytes over NVLink and 8/16 over IB at once.
    expect = 7 * 1e-6 + 8 * 10e-6 + max(7 / 16 * gb / 100e9, 8 / 16 * gb / 10e9) / 0.5
    assert all_to_all_s(p, 16, 1, gb) == pytest.approx(expect)
    assert all_to_all_s(p, 8, 1, gb) == pytest.approx(7e-6 + 7 / 8 * gb / 100e9 / 0.5)


def test_step_time_adds_up_and_pp_bubble():
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", ["parallel.pp_microbatches=2"])
    p = _profile()
    single = predict_step(cfg, ParallelDims(world_size=1), p)
    w = rank_work(cfg, ParallelDims(world_size=1), "fp32")
    matmul = (w.dense_flops + w.expert_flops / 0.8) / (100e12 * 0.5)
    assert single.compute_s == pytest.approx(matmul * 1.25 + w.optimizer_bytes / 1e12)
    assert single.exposed_comm_s == 0 and single.bubble_s == 0 and single.step_time_s == single.compute_s
    pp = predict_step(cfg, ParallelDims(dp_shard=1, pp=2, world_size=2), p)
    # 1F1B with 2 stages and 2 microbatches: the bubble is (pp-1)/m of the critical path.
    assert pp.bubble_s == pytest.approx(0.5 * (pp.compute_s + pp.comm_s["pp"] + pp.comm_s["tp"] + pp.comm_s["ep"]))
    assert pp.step_time_s == pytest.approx(pp.compute_s + pp.exposed_comm_s + pp.bubble_s)


def _order(plans):
    return [(tuple(pl.step.layout.items()), pl.fits) for pl in plans]


def test_ranking_stable_under_permutations_that_change_nothing(monkeypatch):
    import timers1.parallel.plan as plan

    profile = cluster_profile("h100_sxm")
    a = load_config(CONFIGS_DIR / "timer_s1_8b.yaml", ["train.batch_size=256", "data.context_points=1440"])
    b = load_config(CONFIGS_DIR / "timer_s1_8b.yaml", ["data.context_points=1440", "train.batch_size=256",
                                                       "parallel.ep=1", "parallel.dp_shard=4"])  # the layout searched over
    ranked = rank_layouts(a, 64, profile)
    assert len(ranked) > 10
    assert _order(ranked) == _order(rank_layouts(b, 64, profile))
    generate = plan.candidate_layouts
    monkeypatch.setattr(plan, "candidate_layouts", lambda cfg, gpus: reversed(list(generate(cfg, gpus))))
    assert _order(rank_layouts(a, 64, profile)) == _order(ranked)


def test_layouts_that_do_not_fit_are_never_first():
    cfg = load_config(CONFIGS_DIR / "timer_s1_8b.yaml")
    profile = cluster_profile("h100_sxm")
    ranked = rank_layouts(cfg, 64, profile)
    fastest = min(ranked, key=lambda pl: pl.step.step_time_s)
    # Memory just too small for the fastest layout: it must drop below every layout that fits.
    squeezed = rank_layouts(cfg, 64, profile, gpu_mem_gib=fastest.memory.total_gib / 0.9 * 0.99)
    fits = [pl.fits for pl in squeezed]
    assert fits[0] and not all(fits)
    assert fits == sorted(fits, reverse=True)
    assert squeezed[0].step.layout != fastest.step.layout
    times = [pl.step.step_time_s for pl in squeezed if pl.fits]
    assert times == sorted(times)


def test_plan_cli_json_table_and_errors(capsys, tmp_path):
    flagship = str(CONFIGS_DIR / "timer_s1_8b.yaml")
    assert cli_main(["plan", "--config", flagship, "--gpus", "64", "--json", "--top", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all({"step_time_s", "mfu", "memory_gib", "fits", "layout"} <= set(x) for x in lines)
    assert [x["step_time_s"] for x in lines] == sorted(x["step_time_s"] for x in lines)
    assert cli_main(["plan", "--config", flagship, "--gpus", "16", "--cluster", "h200_sxm"]) == 0
    out = capsys.readouterr().out
    assert "answer: fits" in out and "exp.comm" in out and "gemm_efficiency 0.75 (profile h200_sxm)" in out
    assert cli_main(["plan", "--config", flagship, "--gpus", "8", "--cluster", "dgx9"]) == 2
    err = capsys.readouterr().err
    assert "dgx9" in err and "cpu_gloo, h100_sxm, h200_sxm" in err


def test_calibration_from_bench_results(tmp_path):
    cfg = load_config(CONFIGS_DIR / "timer_s1_8b.yaml")
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        {"bench": "gpu", "section": "baseline", "metric": "peak", "dense_gemm_tflops": 692.3, "dtype": "torch.bfloat16"},
        {"bench": "gpu", "section": "throughput", "metric": "grouped_gemm_fwd", "ratio": 0.9, "dtype": "bfloat16"},
        {"bench": "gpu", "section": "train", "metric": "mfu", "ratio": 0.4},
        {"bench": "dispatch", "backend": "gloo", "ep": 2, "tokens_per_rank": 4096, "hidden": 256, "top_k": 2,
         "dispatch_combine_ms": 5.0},  # gloo: not for a GPU profile
    ]) + "\n")
    from timers1.parallel.step_time import calibrate

    p = calibrate(cluster_profile("h100_sxm"), [results], cfg)
    assert p.gemm_efficiency == pytest.approx(692.3 / 989.0)
    assert p.grouped_gemm_ratio == 0.9
    from timers1.model.flops import forward_flops_parts
    f = forward_flops_parts(cfg.model, cfg.moe, 180)
    x = f.experts / f.block
    assert p.other_fraction == pytest.approx(1 / (0.4 * (1 - x + x / 0.9)) - 1)
    assert p.alltoall_efficiency == 0.7 and "measured" in p.figures_used()["gemm_efficiency"]


def test_clusters_yaml_errors_name_the_field(tmp_path):
    assert set(load_clusters()) >= {"h100_sxm", "h200_sxm", "cpu_gloo"}
    bad = tmp_path / "c.yaml"
    body = (CONFIGS_DIR / "clusters.yaml").read_text().replace("gpus_per_node: 8", "gpus_per_node: eight", 1)
    bad.write_text(body)
    from timers1.errors import InputError
    with pytest.raises(InputError, match="h100_sxm: gpus_per_node='eight'"):
        load_clusters(bad)


def test_sync_wait_is_paid_per_collective_call():
    p = _profile(sync_s=2e-3)
    c = Collective("ep", "all_to_all", 8, 1, 1e6, 5)
    assert c.seconds(p) == pytest.approx(5 * (all_to_all_s(p, 8, 1, 1e6) + 2e-3))


def test_bench_plan_layouts_are_valid_for_its_config():
    """Every layout `timers1 bench plan` runs is one the engine accepts, and gets a prediction."""
    from timers1.bench.plan import LAYOUTS, _config

    profile = cluster_profile("cpu_gloo")
    worlds = set()
    for name, (world, overrides) in LAYOUTS.items():
        cfg = _config(argparse.Namespace(config=CONFIGS_DIR / "small_cpu.yaml", set=[]), overrides)
        dims = ParallelDims.from_config(cfg.parallel, world)
        m = cfg.model
        dims.check_model(cfg.moe.num_experts, m.num_heads, m.hidden_size, m.num_layers + m.num_stp_blocks,
                         cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches)
        step = predict_step(cfg, dims, profile)
        assert step.step_time_s > 0 and (world == 1) == (step.exposed_comm_s == 0)
        worlds.add(world)
    assert worlds == {1, 2, 4}


def test_one_rank_steps_fit_gives_the_exact_intercept_and_slope():
    # tiny.yaml, one rank: per window (16 patch tokens) 16 x 3 x 370688 dense FLOPs and 16 x 3 x 4 x 49152
    # expert FLOPs (see test_tiny_flops_and_bytes_by_hand); at 1 GFLOP/s x 0.5, experts at 0.8:
    cfg = load_config(CONFIGS_DIR / "tiny.yaml")
    matmul_per_window = (16 * 3 * 370688 + 16 * 3 * 4 * 49152 / 0.8) / 0.5e9
    assert matmul_per_window == pytest.approx(0.059179008)
    slope = 1.5 * matmul_per_window                         # -> other_fraction 0.5
    steps = OneRankSteps(full_batch=32, half_batch=16, plain_full_s=0.1 + 32 * slope, plain_half_s=0.1 + 16 * slope,
                         fsdp_s=0.3 + 16 * slope, fsdp_ep_s=0.35 + 16 * slope, fsdp_tp_s=0.65 + 16 * slope,
                         plain_update_s=0.04, fsdp_update_s=0.1)
    fixed, per_window = steps.fit()
    assert fixed == pytest.approx(0.1) and per_window == pytest.approx(0.08876851)
    p = calibrate_host(_profile(peak_tflops=1e-3, memory_gb_s=1.0), cfg, steps, "here")
    from timers1.model import build_model
    params = sum(t.numel() for t in build_model(cfg.model, cfg.moe, device="meta").parameters())
    optimizer_s = 32 * params / 1e9                           # AdamW's 32 B per parameter at 1 GB/s
    assert p.host.step_s == pytest.approx(0.06) and p.host.update_s == pytest.approx(0.04 - optimizer_s)
    assert (p.host.sharded_s, p.host.sharded_update_s) == pytest.approx((0.14, 0.06))
    assert (p.host.ep_s, p.host.tp_s) == pytest.approx((0.05, 0.3))
    assert p.other_fraction == pytest.approx(0.5)
    # The single-rank step it predicts at the full batch is the line it was fitted to.
    single = predict_step(load_config(CONFIGS_DIR / "tiny.yaml", ["train.batch_size=32"]), ParallelDims(world_size=1), p)
    assert single.step_time_s == pytest.approx(0.1 + 32 * slope) and single.host_s == pytest.approx(0.1 - optimizer_s)
    # A pipeline rank (4 microbatches, 2 of the 4 units) dispatches its forward + backward ops once
    # per microbatch; FSDP gathers and syncs its units once per step.
    pp = predict_step(cfg, ParallelDims(dp_shard=1, pp=2, world_size=2), p)
    assert pp.host_s == pytest.approx(0.5 * (4 * 0.06 + 0.14 + (0.04 - optimizer_s + 0.06)))
    # Noise that makes a wrapping look cheaper than the plain step counts as no overhead.
    noisy = calibrate_host(_profile(peak_tflops=1e-3), cfg, OneRankSteps(32, 16, 1.0, 0.6, 0.5, 0.7, 0.6), "here")
    assert (noisy.host.sharded_s, noisy.host.ep_s, noisy.host.tp_s) == pytest.approx((0.0, 0.2, 0.0))


def test_host_overhead_per_layout_and_ranks_beyond_cores_share_them():
    cfg = load_config(CONFIGS_DIR / "tiny.yaml")
    host = HostOverhead(step_s=0.1, sharded_s=0.2, ep_s=0.05, tp_s=0.3)  # no update part: every layout is one pass
    cpu = _profile(gpus_per_node=64, compute_slots_per_node=2, host=host)

    def host_part(**dims):
        d = ParallelDims(**dims)
        return predict_step(cfg, d, cpu).compute_s - predict_step(cfg, d, replace(cpu, host=HostOverhead())).compute_s

    assert host_part(world_size=1) == pytest.approx(0.1)
    assert host_part(dp_shard=2, world_size=2) == pytest.approx(0.3)                  # + FSDP hooks, foreach AdamW
    assert host_part(dp_shard=2, ep=2, world_size=2) == pytest.approx(0.35)           # + EP DTensors
    assert host_part(dp_shard=1, tp=2, world_size=2) == pytest.approx(0.65)           # + EP and TP DTensors
    # 2 of the 4 units per stage: the ops once per microbatch (tiny.yaml: 4), FSDP once per step
    assert host_part(dp_shard=1, pp=2, world_size=2) == pytest.approx(0.5 * (4 * 0.1 + 0.2))
    # 4 ranks on 2 cores: each computes at half speed, host overhead, matmuls and optimizer alike.
    dp4 = ParallelDims(dp_shard=4, ep=4, world_size=4)
    assert host_part(dp_shard=4, ep=4, world_size=4) == pytest.approx(2 * 0.35)
    on_4_cores = replace(cpu, compute_slots_per_node=4)
    assert predict_step(cfg, dp4, cpu).compute_s == pytest.approx(2 * predict_step(cfg, dp4, on_4_cores).compute_s)


def test_gpu_profiles_have_no_cpu_host_overhead():
    cfg = load_config(CONFIGS_DIR / "timer_s1_8b.yaml")
    for name in ("h100_sxm", "h200_sxm"):
        gpu = cluster_profile(name)
        assert gpu.host == HostOverhead()
        dims = ParallelDims(dp_shard=16, pp=4, ep=8, world_size=64)
        step = predict_step(cfg, dims, gpu)
        w = max((rank_work(cfg, dims, "bf16", r) for r in range(4)), key=lambda w: w.dense_flops + w.expert_flops)
        matmul = (w.dense_flops + w.expert_flops / gpu.grouped_gemm_ratio) / (989e12 * 0.75)
        assert step.host_s == 0.0
        assert step.compute_s == pytest.approx(matmul * (1 + gpu.other_fraction) + w.optimizer_bytes / (gpu.memory_gb_s * 1e9))


def test_host_overhead_from_the_profile_file(tmp_path):
    body = (CONFIGS_DIR / "clusters.yaml").read_text()
    good = tmp_path / "good.yaml"
    gpu_line = "  host_overhead_ms: {step: 0.0, update: 0.0}\n"
    assert gpu_line in body
    good.write_text(body.replace(gpu_line, "  host_overhead_ms: {step: 2.5}\n", 1))
    h100 = load_clusters(good)["h100_sxm"]
    assert h100.host == HostOverhead(step_s=2.5e-3) and load_clusters(good)["h200_sxm"].host == HostOverhead()
    assert "step_s 2.5 ms" in h100.figures_used()["host_overhead"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(body.replace(gpu_line, "  host_overhead_ms: {launch: 2}\n", 1))
    from timers1.errors import InputError
    with pytest.raises(InputError, match="h100_sxm: host_overhead_ms takes step, sharded, ep, tp, update, sharded_update, got \\['launch'\\]"):
        load_clusters(bad)


def test_calibration_from_a_bench_plan_line_is_for_the_cpu_profile_only(tmp_path):
    cfg = load_config(CONFIGS_DIR / "small_cpu.yaml")
    lines = tmp_path / "plan.jsonl"
    lines.write_text(json.dumps({"bench": "plan", "profile": "cpu_gloo", "calibration": {
        "peak_tflops": 0.07, "memory_gb_s": 20.0, "other_fraction": 0.6,
        "link": {"alpha_s": 2.5e-4, "bandwidth_B_s": 1.5e9},
        "host_overhead_ms": {"step_s": 80.0, "sharded_s": 100.0, "ep_s": 0.0, "tp_s": 175.0, "update_s": 5.0,
                             "sharded_update_s": 30.0}}}) + "\n")
    from timers1.parallel.step_time import calibrate

    cpu = calibrate(cluster_profile("cpu_gloo"), [lines], cfg)
    assert list(cpu.host.__dict__.values()) == pytest.approx([0.08, 0.1, 0.0, 0.175, 0.005, 0.03])
    assert (cpu.peak_tflops, cpu.memory_gb_s, cpu.other_fraction) == (0.07, 20.0, 0.6)
    assert "measured, plan.jsonl:1" in cpu.figures_used()["host_overhead"]
    assert cpu.intra == cpu.inter == Link(2.5e-4, 1.5e9)
    assert cpu.figures_used()["links"] == ("intra alpha 250 us, 1.5 GB/s; inter alpha 250 us, 1.5 GB/s "
                                           "(measured, plan.jsonl:1 (bench plan))")
    gpu = calibrate(cluster_profile("h100_sxm"), [lines], cfg)
    assert gpu == cluster_profile("h100_sxm") and gpu.host == HostOverhead()


def test_bench_plan_names_the_pairs_it_ranks_differently():
    from timers1.bench.plan import discordant_pairs

    def r(name, predicted, measured, lo, hi):
        return dict(layout=name, predicted_s=predicted, measured_s=measured, measured_min_s=lo, measured_max_s=hi)

    results = [r("a", 0.50, 0.60, 0.49, 0.64), r("b", 0.51, 0.56, 0.51, 0.60), r("c", 0.9, 0.8, 0.7, 0.95),
               r("d", 0.8, 1.0, 0.96, 1.1)]
    pairs = discordant_pairs(results)
    assert [p["layouts"] for p in pairs] == [["a", "b"], ["c", "d"]]
    assert pairs[0] == {"layouts": ["a", "b"], "predicted_gap": 0.02, "measured_gap": 0.071, "measured_overlap": True}
    assert pairs[1]["measured_overlap"] is False  # c's slowest step (0.95) beats d's fastest (0.96)
