"""The step-time model of `timers1 plan`: hand-computed FLOPs and bytes, alpha-beta collective
costs, a ranking that only depends on the layouts, and layouts that do not fit never first."""

from __future__ import annotations

import json

import pytest

from timers1.cli import main as cli_main
from timers1.config import load_config
from timers1.parallel import ParallelDims
from timers1.parallel.plan import param_groups
from timers1.parallel.step_time import (ClusterProfile, Collective, Link, all_gather_s, all_reduce_s, all_to_all_s,
                                        cluster_profile, load_clusters, predict_step, rank_layouts, rank_work,
                                        reduce_scatter_s)
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
    dense_params = 4 * (g.block_tp / 2 + g.block_rep) + 2 * g.stp_extra
    fsdp = [c for c in w.collectives if c.what == "fsdp"]
    assert fsdp[0] == Collective("fsdp", "all_gather", 2, 2, dense_params * 4, 2)      # forward + backward
    assert fsdp[2] == Collective("fsdp", "all_gather", 2, 2, 4 * g.block_expert / 2 * 4, 2)  # efsdp = 2*2/2
    assert w.optimizer_bytes == 32 * ((dense_params + g.embed + g.head + g.norm) / 2 + 4 * g.block_expert / 2 / 2)


def test_collectives_follow_alpha_beta():
    p = _profile()
    gb = 1e9
    assert all_gather_s(p.intra, 4, gb) == pytest.approx(3 * 1e-6 + 0.75 * gb / 100e9)
    assert reduce_scatter_s(p.intra, 4, gb) == all_gather_s(p.intra, 4, gb)
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
    from timers1.bench.plan import LAYOUTS

    profile = cluster_profile("cpu_gloo")
    worlds = set()
    for name, (world, overrides) in LAYOUTS.items():
        cfg = load_config(CONFIGS_DIR / "small_cpu.yaml", [f"parallel.{k}={v}" for k, v in overrides.items()])
        dims = ParallelDims.from_config(cfg.parallel, world)
        m = cfg.model
        dims.check_model(cfg.moe.num_experts, m.num_heads, m.hidden_size, m.num_layers + m.num_stp_blocks,
                         cfg.parallel.pp_schedule, cfg.parallel.pp_microbatches)
        step = predict_step(cfg, dims, profile)
        assert step.step_time_s > 0 and (world == 1) == (step.exposed_comm_s == 0)
        worlds.add(world)
    assert worlds == {1, 2, 4}
