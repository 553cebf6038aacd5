"""Smoke tests of the training benchmarks: they run on tiny shapes and print their ratios."""

from __future__ import annotations

import json

import pytest

from timers1.cli import main
from tests.conftest import CONFIGS_DIR


def _records(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_train_reports_mfu_against_measured_peak(capsys, tmp_path):
    assert main(["bench", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--steps", "2",
                 "--set", "data.context_points=64", "--profile", str(tmp_path)]) == 0
    (record,) = _records(capsys)
    assert record["peak_tflops_measured"] > 0 and 0 < record["mfu"] < 1
    assert record["tokens_per_s"] > 0 and record["points_per_s"] > record["tokens_per_s"]
    assert list(tmp_path.glob("*.json"))


def test_bench_checkpoint_reports_ratios(capsys, tmp_path):
    assert main(["bench", "checkpoint", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--state-mib", "8",
                 "--steps", "4", "--save-every", "2", "--dir", str(tmp_path)]) == 0
    bandwidth, overhead = _records(capsys)
    assert bandwidth["save_ratio"] > 0 and bandwidth["load_ratio"] > 0
    assert overhead["step_s_no_save"] > 0 and "overhead" in overhead
    assert not any(tmp_path.iterdir())  # it cleans up after itself


def test_bench_dispatch_times_the_training_dispatcher_on_spawned_gloo_ranks(capsys):
    assert main(["bench", "dispatch", "--ep", "2", "--tokens", "256", "--hidden", "64", "--expert-hidden", "64",
                 "--iters", "2", "--warmup", "1"]) == 0
    (record,) = _records(capsys)
    assert record["backend"] == "gloo" and record["ep"] == 2
    assert record["dispatch_combine_ms"] > 0 and record["experts_ms"] > 0
    assert record["ratio"] == pytest.approx(record["dispatch_combine_ms"] / record["experts_ms"], rel=0.02)
