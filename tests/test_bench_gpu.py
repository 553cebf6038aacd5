"""The CPU dry run of `timers1 bench gpu`, so the prepared GPU check cannot rot between GPU runs."""

from __future__ import annotations

import contextlib
import json
import time

import torch

from timers1.bench import gpu
from timers1.cli import main


def _records(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def _section_lines(records):
    lines = {}
    for r in records:
        if "status" in r:
            assert r["section"] not in lines, f"two section lines for {r['section']}"
            lines[r["section"]] = r
    return lines


def test_dry_run_emits_one_line_per_section_and_the_metrics(capsys, tmp_path):
    out = tmp_path / "out"
    rc = main(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(out), "--scratch", str(tmp_path)])
    records = _records(capsys)
    sections = _section_lines(records)
    assert list(sections) == list(gpu.SECTIONS)
    for line in sections.values():
        assert {"status", "seconds", "time_limit_s"} <= set(line)
    assert rc == 0, [s for s in sections.values() if s["status"] not in ("ok", "skipped")]

    # megatron-core's MoELayer needs CUDA: the dry run says why instead of crashing.
    assert sections["megatron"]["status"] == "skipped"
    assert "torch.cuda.Stream" in sections["megatron"]["reason"]
    for name in ("kernels", "throughput", "train", "checkpoint"):
        assert sections[name]["status"] == "ok", sections[name]

    metrics = {(r["section"], r["metric"]): r for r in records if "metric" in r}
    kernel_checks = [r for (section, _), r in metrics.items() if section == "kernels" and "ok" in r]
    assert {r["kernel"] for r in kernel_checks} == {"route", "permute", "unpermute", "swiglu_experts"}
    assert {r["case"] for r in kernel_checks} == {"odd_tokens_zero_token_experts", "all_tokens_one_expert"}
    assert all(r["ok"] and r["indices_equal"] and 0 <= r["ratio"] <= 1 for r in kernel_checks)
    expected = {("throughput", "grouped_gemm_fwd"), ("throughput", "route_permute"),
                ("throughput", "moe_layer_fwd_bwd"), ("train", "mfu"), ("train", "peak_memory_vs_plan"),
                ("train", "loss_falling"), ("checkpoint", "dcp_save"), ("checkpoint", "dcp_load")}
    assert expected <= set(metrics)
    for key in expected - {("train", "peak_memory_vs_plan")}:
        assert metrics[key]["ratio"] > 0 and metrics[key]["baseline"], key
    assert metrics[("throughput", "grouped_gemm_fwd")]["target"] == 0.85
    assert metrics[("throughput", "route_permute")]["target"] == 0.6
    assert metrics[("train", "loss_falling")]["loss_last"] < metrics[("train", "loss_falling")]["loss_first"]

    written = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert written == records
    summary = (out / "summary.md").read_text()
    assert "grouped_gemm_fwd" in summary and "**skipped**" in summary
    assert not list(tmp_path.glob("timers1-gpu-check-*"))  # checkpoint files cleaned up


def test_a_failing_or_overrunning_section_does_not_stop_the_others(capsys, monkeypatch):
    def broken(check):
        raise RuntimeError("injected failure")

    def overrunning(check):
        while True:
            time.sleep(0.05)

    monkeypatch.setitem(gpu.SECTION_FUNCS, "throughput", broken)
    monkeypatch.setitem(gpu.SECTION_FUNCS, "train", overrunning)
    rc = main(["bench", "gpu", "--device", "cpu", "--quick", "--sections", "throughput", "train", "checkpoint",
               "--time-scale", "0.1"])
    sections = _section_lines(_records(capsys))
    assert rc == 1
    assert sections["throughput"]["status"] == "failed" and "injected failure" in sections["throughput"]["error"]
    assert sections["train"]["status"] == "timeout"
    # The checkpoint section still ran, on a freshly built model since training left none.
    assert sections["checkpoint"]["status"] == "ok"


def test_relative_error_and_tie_free_logits():
    a = torch.tensor([1.0, 2.0, -4.0])
    assert gpu.rel_err(a, a) == 0.0
    assert abs(gpu.rel_err(a + 0.04, a) - 0.01) < 1e-6
    logits_TE = gpu.distinct_logits(50, 32, (3, 7), None, torch.Generator().manual_seed(0))
    assert torch.equal(logits_TE.bfloat16().float(), logits_TE)  # exact in bf16
    top = logits_TE.topk(3, dim=1).values
    assert bool((top[:, :-1] > top[:, 1:]).all())  # no ties among the chosen
    assert bool((logits_TE[:, [3, 7]] == -8.0).all())


def test_launch_script_runs_the_check_from_the_checkout(tmp_path):
    """launch/gpu_check.sh imports timers1 from this checkout with no install (as on the GPU image)
    and leaves the JSON lines, the summary and the log in one folder."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_DIR

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    proc = subprocess.run(["bash", "launch/gpu_check.sh", str(out), "--device", "cpu", "--quick",
                           "--sections", "throughput", "megatron"], cwd=REPO_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.jsonl", "summary.md"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    environment = records[0]
    assert environment["section"] == "environment" and environment["device"] == "cpu"
    assert {r["section"] for r in records if "status" in r} == {"throughput", "megatron"}


def test_megatron_peer_computes_our_function(monkeypatch):
    """What the megatron section does on a GPU, here with megatron's CUDA stream calls stubbed:
    the layer builds at our shape, takes our weights, matches our output and runs backward."""
    import types

    class NoStream:
        def __eq__(self, other):
            return isinstance(other, NoStream)

        def __hash__(self):
            return 0

        def wait_stream(self, *_):
            pass

        def record_event(self, *_):
            return types.SimpleNamespace(synchronize=lambda: None, wait=lambda *_: None)

    stream = NoStream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda _: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, _: None, raising=False)
    from timers1.bench.moe import _build_moe, fwd_bwd

    T, D, E, K, Fw = 96, 32, 8, 2, 48
    device = torch.device("cpu")
    with gpu.megatron_single_rank(device):
        peer, expert_mlp = gpu.build_megatron_moe(D, E, K, Fw, torch.float32, device)
        ours, _ = _build_moe(D, Fw, E, K, "auto")
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.02)
        gpu.copy_weights_into_megatron(ours, peer)
        assert expert_mlp == "SequentialMLP"
        assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
        x_TD = torch.randn(T, D)
        assert gpu.megatron_parity(ours, peer, x_TD, torch.float32) < 1e-5
        fwd_bwd(peer, x_TD.view(T, 1, D), torch.randn(T, 1, D), True)()
        assert all(p.grad is not None for p in peer.parameters())


def test_gpu_time_limits_fit_the_eight_minute_box():
    """Section limits leave a minute for start-up inside 8 minutes (quick: inside 6), so a rerun
    fits in a 15-minute GPU lease."""
    full = sum(limits[0] for limits in gpu.GPU_TIME_LIMIT_S.values())
    quick = sum(limits[1] for limits in gpu.GPU_TIME_LIMIT_S.values())
    assert set(gpu.GPU_TIME_LIMIT_S) == set(gpu.SECTIONS)
    assert full <= 7 * 60 and quick <= 5.5 * 60
