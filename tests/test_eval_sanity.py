"""The sanity suite: deterministic obvious patterns; an oracle passes, wrong forecasts fail; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from timers1 import cli
from timers1.errors import InputError
from timers1.eval import cli as eval_cli
from timers1.eval.sanity import (INTERMITTENT_MEAN_SIZE, INTERMITTENT_OCCURRENCE, LEVEL_SHIFT_AT, PATTERNS, SEEDS,
                                 evaluate_sanity, pattern_series)

BY_NAME = {p.name: p for p in PATTERNS}


class TruthLookup:
    """Forecasts built from each series' noise-free future, found by the end of its context."""

    def __init__(self, make_quantiles):
        self.make_quantiles = make_quantiles
        self.by_context_end = {}
        for pattern in PATTERNS:
            for s in pattern_series(pattern):
                self.by_context_end[s.history[-32:].tobytes()] = s

    def predict(self, context, horizon):
        out = []
        for values in context:
            series = self.by_context_end[np.asarray(values, dtype=np.float64)[-32:].tobytes()]
            out.append(self.make_quantiles(series))
        return np.stack(out)


def oracle():
    return TruthLookup(lambda s: np.repeat(s.truth_future[None, :], 9, axis=0))


class FlatAtLastValue:
    def predict(self, context, horizon):
        return np.stack([np.full((9, horizon), c[-1]) for c in context])


class TurnsDown:
    """The story's forecast: from the last value down by a quarter over the horizon, a narrow band."""

    def predict(self, context, horizon):
        out = []
        for c in context:
            median = c[-1] * np.linspace(1.0, 0.75, horizon)
            out.append(median[None, :] + np.linspace(-0.5, 0.5, 9)[:, None])
        return np.stack(out)


def test_patterns_are_deterministic_and_have_their_shapes():
    for pattern in PATTERNS:
        first, again = pattern_series(pattern), pattern_series(pattern)
        assert len(first) == len(SEEDS)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a.observed, b.observed)
            np.testing.assert_array_equal(a.truth, b.truth)
            assert len(a.history) == pattern.history_points and len(a.truth_future) == pattern.horizon
        assert not np.array_equal(first[0].observed, first[1].observed)  # seeds differ

    story = pattern_series(BY_NAME["trend_weekly"])[0]
    assert len(story.history) == 400 and story.truth[0] == pytest.approx(10.0)
    assert story.truth[407] - story.truth[400] == pytest.approx(0.05 * 7)  # one week on: the trend alone

    for s in pattern_series(BY_NAME["level_shift"]):
        assert np.all(s.truth[LEVEL_SHIFT_AT:] == s.truth[-1]) and s.truth[-1] > s.truth[0]
        assert np.all(s.truth[:LEVEL_SHIFT_AT] == s.truth[0])

    growth = pattern_series(BY_NAME["exponential_growth"])[0].truth
    np.testing.assert_allclose(growth[1:] / growth[:-1], 1.02)

    for s in pattern_series(BY_NAME["intermittent"]):
        assert np.mean(s.observed == 0) > 0.7 and np.all(s.observed >= 0)
        assert np.all(s.truth == INTERMITTENT_OCCURRENCE * INTERMITTENT_MEAN_SIZE)
        assert abs(s.observed.mean() - s.truth[0]) < 0.25  # the truth is the demand rate

    sine = pattern_series(BY_NAME["long_sine"])[0].truth
    np.testing.assert_allclose(sine[50:], sine[:-50], atol=1e-9)


def test_oracle_passes_everything_with_full_coverage():
    report = evaluate_sanity(oracle(), model_name="oracle")
    assert report.passed and [r.pattern for r in report.results] == [p.name for p in PATTERNS]
    for r in report.results:
        assert r.rel_mase == 0.0 and r.coverage_10_90 == 1.0 and r.num_series == len(SEEDS)
        assert r.seasonal_naive_MASE > 0


def test_flat_line_and_the_downward_turn_fail_the_trend():
    flat = {r.pattern: r for r in evaluate_sanity(FlatAtLastValue()).results}
    assert not flat["trend_weekly"].passed and not flat["linear_trend"].passed
    assert flat["linear_trend"].rel_mase == pytest.approx(1.0)  # naive is the reference there
    down = evaluate_sanity(TurnsDown())
    trend = {r.pattern: r for r in down.results}["trend_weekly"]
    assert not trend.passed and trend.rel_mase > 1 and trend.coverage_10_90 < 0.5
    assert not down.passed and "FAIL" in down.format_table()


def test_a_wide_band_around_a_wrong_median_fails_and_a_narrow_miss_fails():
    # Coverage alone is not enough: an honest band cannot save a median worse than the reference.
    def wide_band_off_centre(s):
        shift = 2 * np.abs(s.truth_future).mean() + 5
        return s.truth_future[None, :] + shift * (1 + np.linspace(-1.5, 1.5, 9)[:, None])

    wide = TruthLookup(wide_band_off_centre)
    assert all(r.coverage_10_90 == 1.0 for r in evaluate_sanity(wide).results)
    assert not any(r.passed for r in evaluate_sanity(wide).results)
    # ... and a median close to the truth with a band that misses it fails on coverage.
    offset = TruthLookup(lambda s: s.truth_future[None, :] + 1e-3 * (1 + np.abs(s.truth_future))
                         + np.zeros((9, 1)))
    results = evaluate_sanity(offset).results
    assert all(r.rel_mase < 1 and r.coverage_10_90 == 0 and not r.passed for r in results)


def test_a_median_of_zero_passes_intermittent_demand():
    """The calibrated forecast of mostly-zero counts: median 0, band 0 .. a few units."""
    zero_median = TruthLookup(lambda s: np.outer([0, 0, 0, 0, 0, 0, 1, 2, 3], np.ones(len(s.truth_future))))
    result = {r.pattern: r for r in evaluate_sanity(zero_median).results}["intermittent"]
    assert result.passed and result.coverage_10_90 == 1.0


@pytest.fixture
def tiny_model_dir(tiny_config, tmp_path):
    from timers1.hf import write_model_dir
    from timers1.model import build_model

    model = build_model(tiny_config.model, tiny_config.moe, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "model"
    write_model_dir(path, tiny_config, model.state_dict())
    return path


def test_eval_cli_sanity_writes_json_and_png(tiny_model_dir, tmp_path, capsys):
    out, png = tmp_path / "sanity.json", tmp_path / "sanity.png"
    assert cli.main(["eval", "--checkpoint", str(tiny_model_dir), "--sanity", "--output", str(out),
                     "--plot", str(png), "--context-points", "64"]) == 0
    result = json.loads(out.read_text())
    assert [r["pattern"] for r in result["patterns"]] == [p.name for p in PATTERNS]
    assert result["settings"]["max_context_points"] == 64 and result["settings"]["checkpoint"] == str(tiny_model_dir)
    for r in result["patterns"]:
        assert set(r) >= {"rel_mase", "coverage_10_90", "passed"} and 0 <= r["coverage_10_90"] <= 1
        assert r["passed"] == (r["rel_mase"] is not None and r["rel_mase"] < 1 and r["coverage_10_90"] >= 0.5)
    assert result["passed"] == all(r["passed"] for r in result["patterns"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    printed = capsys.readouterr().out
    assert "trend_weekly" in printed and "patterns" in printed and str(out) in printed


def test_eval_cli_sanity_baseline_and_option_errors(tmp_path, capsys):
    assert cli.main(["eval", "--baseline", "seasonal_naive", "--sanity"]) == 0
    printed = capsys.readouterr().out
    assert "passed 0 of" in printed  # the reference scores rel MASE 1: no pattern passes
    for args, message in ((["--sanity", "--data", "x.yaml"], "exactly one of --data"),
                          ([], "exactly one of --data"),
                          (["--sanity", "--compare", "board.csv"], "--compare: only with --data"),
                          (["--sanity", "--output", "s.csv"], "s.csv: the sanity suite writes .json"),
                          (["--data", "x.yaml"], "--output FILE"),
                          (["--data", "x.yaml", "--output", "r.json", "--plot", "p.png"],
                           "--plot p.png: only with --sanity")):
        with pytest.raises(InputError, match=message):
            eval_cli.run_eval(cli.build_parser().parse_args(["eval", "--baseline", "naive", *args]))


def test_closing_evaluation_of_a_run_writes_the_sanity_files(tiny_config, tiny_model_dir, tmp_path):
    from timers1.train.final_eval import evaluate_run

    tiny_config.train.run_dir = str(tmp_path / "run")
    tiny_config.eval.context_points = 64
    logged = []
    evaluate_run(tiny_config, tiny_model_dir, log=logged.append)
    run_dir = tmp_path / "run"
    assert (run_dir / "eval.json").is_file()
    sanity = json.loads((run_dir / "sanity.json").read_text())
    assert [r["pattern"] for r in sanity["patterns"]] == [p.name for p in PATTERNS]
    assert sanity["settings"]["max_context_points"] == 64
    assert (run_dir / "sanity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("sanity suite" in line and "trend_weekly" in line for line in logged)


def test_context_points_lifts_the_model_cap_for_a_context_sweep(tiny_model_dir, tiny_config):
    from timers1.eval.cli import _load_checkpoint_forecaster

    own = tiny_config.model.max_context_points
    assert _load_checkpoint_forecaster(str(tiny_model_dir)).max_context_points == own
    assert _load_checkpoint_forecaster(str(tiny_model_dir), 4 * own).max_context_points == 4 * own
    # A longer context reaches the model: the forecast of a long series changes with it.
    series = [np.sin(np.arange(8 * own) / 7.0) + np.arange(8 * own) / own]
    short = _load_checkpoint_forecaster(str(tiny_model_dir)).predict(series, 2 * tiny_config.model.patch_points)
    long = _load_checkpoint_forecaster(str(tiny_model_dir), 4 * own).predict(series, 2 * tiny_config.model.patch_points)
    assert not np.allclose(np.asarray(short), np.asarray(long))
