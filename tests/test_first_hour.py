"""Issue 16, the first hour of a new user: help texts, an MFU that cannot exceed 1, a run dir
left alone by bad input, sane forecast output, corpus inspection without arguments."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest
import torch

from timers1.cli import build_parser, main
from timers1.train import Trainer
from timers1.train import metrics
from tests.test_train import _train_cmd, corpus_dir, make_cfg  # noqa: F401 (fixture)


# ----------------------------------------------------------------------------- MFU

def test_mfu_never_exceeds_one_with_a_too_low_measured_peak(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TIMERS1_CACHE", str(tmp_path / "cache"))  # no cached peak: measured at start
    monkeypatch.setattr(metrics, "measure_peak_tflops", lambda device, dtype: 1e-9)
    run_dir = tmp_path / "run"
    cfg = make_cfg(corpus_dir, run_dir, ["train.peak_tflops=0", "train.steps=3", "train.log_interval_steps=1"])
    trainer = Trainer(cfg, progress=False)
    assert (trainer.peak.tflops, trainer.peak.source) == (1e-9, "measured")
    trainer.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 < r["mfu"] <= 1 for r in records), [r["mfu"] for r in records]
    assert records[0]["peak_source"] == "observed" and records[0]["mfu"] == 1.0
    assert all(r["peak_tflops"] > 1e-9 for r in records)


def test_peak_comes_from_config_then_cache_then_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMERS1_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "measure_peak_tflops", lambda device, dtype: 0.5)
    cpu = torch.device("cpu")
    assert (metrics.PeakFlops(cpu, torch.float32).tflops, metrics.PeakFlops(cpu, torch.float32).source) \
        == (0.5, "measured")
    metrics.store_peak_tflops(cpu, torch.float32, 2.0)
    cached = metrics.PeakFlops(cpu, torch.float32)
    assert (cached.tflops, cached.source) == (2.0, "cached")
    assert metrics.PeakFlops(cpu, torch.bfloat16).source == "measured"  # cached per dtype
    configured = metrics.PeakFlops(cpu, torch.float32, configured_tflops=3.0)
    assert (configured.tflops, configured.source) == (3.0, "configured")
    assert configured.mfu(1.5e12) == 0.5 and configured.source == "configured"


def test_bench_peak_caches_the_best_of_its_trials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIMERS1_CACHE", str(tmp_path))
    assert main(["bench", "peak", "--trials", "2", "--seconds", "0.01", "--size", "64"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tflops"] > 0 and record["cached_in"] == str(tmp_path / "peak_tflops.json")
    peak = metrics.PeakFlops(torch.device("cpu"), torch.float32)
    assert peak.source == "cached" and peak.tflops == pytest.approx(record["tflops"], rel=1e-3)


# ----------------------------------------------------------------------------- the run dir

def _snapshot(directory):
    return {p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_bad_init_from_writes_nothing(corpus_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    fresh = tmp_path / "fresh"
    assert main(_train_cmd(corpus_dir, fresh)[3:] + ["--init-from", str(missing)]) == 2
    assert not fresh.exists()
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"timers1 train: error: --init-from {missing}: does not exist"

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("# the run's own config\n")
    (existing / "STOP").write_text("")
    old = time.time() - 60
    os.utime(existing / "STOP", (old, old))
    before = _snapshot(existing)
    assert main(_train_cmd(corpus_dir, existing)[3:] + ["--init-from", str(missing)]) == 2
    assert _snapshot(existing) == before


def test_failed_resume_leaves_the_config_alone(corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_train_cmd(corpus_dir, run_dir, ["train.steps=2"])[3:]) == 0
    for shard in (run_dir / "checkpoints").rglob("*.distcp"):
        shard.write_bytes(b"")
    config = (run_dir / "config.yaml").read_bytes()
    assert main(_train_cmd(corpus_dir, run_dir, ["train.steps=4", "train.lr=0.5"])[3:]) == 1
    assert "no checkpoint under" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == config


# ----------------------------------------------------------------------------- help

def _all_parsers():
    from timers1.cli import subparsers_of

    parser = build_parser()
    return [("timers1", parser)] + [(f"timers1 {path}", sub) for path, sub, _ in subparsers_of(parser)]


def test_every_command_has_a_description_an_example_and_help_on_every_option():
    parsers = _all_parsers()
    assert {"timers1 train", "timers1 data inspect", "timers1 bench peak", "timers1 plan"} <= {n for n, _ in parsers}
    problems = []
    for name, parser in parsers:
        if not (parser.description or "").strip():
            problems.append(f"{name}: no description")
        if "timers1 " not in (parser.epilog or "") and "-m timers1" not in (parser.epilog or ""):
            problems.append(f"{name}: no example")
        for action in parser._actions:
            if not (action.help or "").strip():
                problems.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not problems, "\n".join(problems)
    assert "`" not in parsers[0][1].description


def test_help_shows_defaults_once_and_version_prints(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "series per predict call (default: 64)" in text
    assert text.count("(default:") == text.count("default:")  # none named twice
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    import timers1

    assert capsys.readouterr().out.strip() == f"timers1 {timers1.__version__}"
