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


# ----------------------------------------------------------------------------- forecast output

class CrossingForecaster:
    """Quantiles that cross (q0.6 above q0.7) in every other step, like an unconstrained head."""

    def predict(self, context, horizon):
        out = np.tile(np.arange(9, dtype=np.float64)[None, :, None], (len(context), 1, horizon))
        out[:, 5, ::2] = 6.5
        return out


def _hourly_series(item, length, nan_at=()):
    import pandas as pd

    from timers1.eval.datasets import Series

    values = np.sin(np.arange(length) / 3.0)
    values[list(nan_at)] = np.nan
    return Series(item, pd.date_range("2024-01-01", periods=length, freq="h"), values)


def test_forecast_quantiles_are_sorted_in_every_row():
    from timers1.eval.forecasting import QUANTILE_COLUMNS, forecast_series

    frame = forecast_series(CrossingForecaster(), [_hourly_series("a", 50), _hourly_series("b", 60)], 6)
    values = frame[QUANTILE_COLUMNS].to_numpy()
    assert len(values) == 12 and (np.diff(values, axis=1) >= 0).all()
    assert values[0, 5] == 6.0 and values[0, 6] == 6.5  # the crossing pair, swapped
    raw = CrossingForecaster().predict([None], 6)[0].T
    assert (np.diff(raw, axis=1) < 0).any()  # the model's own output still crosses


def test_inner_nans_are_filled_with_a_one_line_warning(tmp_path, monkeypatch, capsys):
    from timers1.eval import cli as eval_cli

    series = [_hourly_series("a", 50, nan_at=(10, 11, 30)), _hourly_series("b", 50), _hourly_series("c", 50, (0,))]
    rows = [{"item_id": s.item_id, "timestamp": t, "target": v} for s in series for t, v in zip(s.timestamps, s.values)]
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "in.csv", index=False)
    monkeypatch.setattr(eval_cli, "_load_checkpoint_forecaster",
                        lambda path, context_points=0: CrossingForecaster())
    assert main(["forecast", "--checkpoint", str(tmp_path), "--input", str(tmp_path / "in.csv"), "--horizon", "4",
                 "--output", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "plot.png")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'in.csv'}: 4 missing target value(s) in 2 series, filled with the "
                        "last observed value before each (leading ones with the first observed value)"]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_run_dir_with_a_corrupt_newest_checkpoint_falls_back_to_its_exported_model(corpus_dir, tmp_path, capsys):
    from timers1.forecast import load_model

    run_dir = tmp_path / "run"
    assert main(_train_cmd(corpus_dir, run_dir, ["train.steps=2"])[3:]) == 0
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    for shard in newest.glob("*.distcp"):  # same size: complete.json still checks out
        shard.write_bytes(b"\0" * shard.stat().st_size)
    capsys.readouterr()
    _, model = load_model(run_dir)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {newest}: checkpoint cannot be read") and \
        f"loading the exported model {run_dir / 'model'} instead" in err
    _, exported = load_model(run_dir / "model")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------- corpus inspection

def _corpus_with_zero_series(out):
    from timers1.data.corpus import CorpusWriter, SeriesRecord

    with CorpusWriter(out, 2**20) as writer:
        for i in range(12):
            values = np.zeros(3000 if i == 0 else 100, np.float32) if i % 2 else np.arange(3000 if i == 2 else 100,
                                                                                            dtype=np.float32) + 1
            writer.add(SeriesRecord(f"s{i}", values, domain="test", source="test", freq="H"))
    return out


def test_inspect_without_arguments_uses_the_builtin_corpus_and_writes_beside_it(tmp_path, monkeypatch, capsys):
    from timers1.data import builder, inspect as corpus_inspect

    corpus = _corpus_with_zero_series(tmp_path / "builtin")
    monkeypatch.setattr(builder, "ensure_default_corpus", lambda: corpus)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "inspect", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["corpus"] == str(corpus) and stats["series"] == 12
    assert stats["png"] == str(corpus / "samples.png") and (corpus / "samples.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin"]  # nothing in the working directory

    from timers1.data.corpus import read_corpus

    picks = corpus_inspect.sample_indices(read_corpus(corpus), num_series=12)
    assert picks == [0, 2, 4, 6, 8, 10]  # every series with a non-zero value, none of the all-zero ones


def test_panel_titles_say_how_many_points_they_show():
    from timers1.data.inspect import panel_title

    assert panel_title("a", "H", 3277, 2048) == "a (H, last 2,048 of 3,277 pts)"
    assert panel_title("a", "", 100, 100) == "a (?, 100 pts)"


def test_forecast_plot_labels_its_axes_and_says_how_much_history_it_shows(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from timers1.eval.forecasting import forecast_series, plot_forecasts

    series = [_hourly_series("long", 400), _hourly_series("short", 30)]
    frame = forecast_series(CrossingForecaster(), series, 12)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_forecasts(series, frame, tmp_path / "p.png")
    (figure,) = figures
    first, second = figure.axes
    assert first.get_title(loc="left") == "long: last 96 of 400 history points, 12 forecast"
    assert second.get_title(loc="left") == "short: all 30 history points, 12 forecast"
    assert first.get_ylabel() == "target" and second.get_xlabel() == "timestamp"
