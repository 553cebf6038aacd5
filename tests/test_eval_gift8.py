"""Seasonal naive through our harness reproduces the GIFT-Eval leaderboard's own numbers.

Needs ../shared/data (beside the repository); skipped where it is absent.
"""

from pathlib import Path

import pandas as pd
import pytest

from timers1.eval.baselines import ForecastCache, baseline_factory
from timers1.eval.datasets import build_task, gift8_specs, load_specs_yaml
from timers1.eval.runner import compare_with_leaderboard, evaluate

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GIFT8 = SHARED_DATA / "gift8"
EXTRA = SHARED_DATA / "extra"
LEADERBOARD = GIFT8 / "leaderboard_per_config.csv"

pytestmark = pytest.mark.skipif(not LEADERBOARD.is_file(), reason=f"{GIFT8} not present")

# gift_eval.md: configuration -> (H, windows, m)
PROTOCOL = {
    "m4_hourly/H/short": (48, 1, 24), "m4_weekly/W/short": (13, 1, 1),
    "hospital/M/short": (12, 1, 12), "car_parts/M/short": (12, 1, 12),
    "us_births/D/short": (30, 20, 1), "us_births/M/short": (12, 2, 12),
    "saugeen/D/short": (30, 20, 1), "saugeen/M/short": (12, 7, 12),
}


@pytest.fixture(scope="module")
def seasonal_naive_report(tmp_path_factory):
    cache = ForecastCache(tmp_path_factory.mktemp("cache"))
    return evaluate(baseline_factory("seasonal_naive"), gift8_specs(GIFT8), model_name="seasonal_naive",
                    batch_size=512, cache=cache)


def test_windows_horizons_seasonality_follow_the_protocol():
    for spec in gift8_specs(GIFT8):
        task = build_task(spec)
        assert (task.horizon, task.windows, task.seasonality) == PROTOCOL[spec.name], spec.name
        assert task.labels.shape == (len(task.contexts), task.horizon)
        # the windows tile the end of each series without overlap, each context all history before
        if task.windows > 1:
            lengths = [len(c) for c in task.contexts[:task.windows]]
            assert [b - a for a, b in zip(lengths, lengths[1:])] == [task.horizon] * (task.windows - 1)


def test_seasonal_naive_reproduces_leaderboard_to_1e6(seasonal_naive_report):
    board = pd.read_csv(LEADERBOARD)
    reference = board[board["model"] == "seasonal_naive"].set_index("config")
    results = {r.config: r for r in seasonal_naive_report.results}
    assert set(results) == set(PROTOCOL)
    for config, r in results.items():
        assert abs(r.MASE - reference.at[config, "MASE"]) < 1e-6, (config, r.MASE)
        assert abs(r.CRPS - reference.at[config, "CRPS"]) < 1e-6, (config, r.CRPS)
        assert r.relative_MASE == pytest.approx(1.0) and r.relative_CRPS == pytest.approx(1.0)
    gm = seasonal_naive_report.geometric_mean
    assert gm["relative_MASE"] == pytest.approx(1.0) and gm["relative_CRPS"] == pytest.approx(1.0)


def test_leaderboard_comparison_places_the_run(seasonal_naive_report):
    table = compare_with_leaderboard(seasonal_naive_report, LEADERBOARD)
    ours = table[table["ours"]].iloc[0]
    published = table[table["model"] == "seasonal_naive"].iloc[0]
    assert ours["relative_CRPS"] == pytest.approx(1.0, abs=1e-6)
    # equal up to float noise, so the two sit side by side
    assert abs(int(ours["rank_CRPS"]) - int(published["rank_CRPS"])) <= 1
    # gift_eval.md: on GIFT-8, Timer-S1 0.673 / 0.559 and TimesFM-2.5 0.620 / 0.541 (MASE / CRPS).
    for model, expected in (("Timer-s1", (0.673, 0.559)), ("TimesFM-2.5", (0.620, 0.541))):
        row = table[table["model"] == model].iloc[0]
        assert (round(row["relative_MASE"], 3), round(row["relative_CRPS"], 3)) == expected, model


@pytest.mark.skipif(not (EXTRA / "seasonal_naive_local.csv").is_file(), reason="extra data absent")
def test_extra_sets_from_yaml_match_local_seasonal_naive(tmp_path):
    specs = load_specs_yaml(REPO / "configs" / "eval_extra.yaml")
    reference = pd.read_csv(EXTRA / "seasonal_naive_local.csv").set_index("config")
    # the short ETT and exchange-rate sets cover multi-window and tabulated-horizon rules
    chosen = [s for s in specs if s.name in ("ett1/H/long*", "exchange_rate/D/short", "m3_yearly/A/6")]
    report = evaluate(baseline_factory("seasonal_naive"), chosen, relative=False, batch_size=512)
    for r in report.results:
        assert (r.horizon, r.windows, r.seasonality) == tuple(reference.loc[r.config, ["H", "W", "m"]])
        assert abs(r.MASE - reference.at[r.config, "MASE"]) < 1e-6
        assert abs(r.CRPS - reference.at[r.config, "CRPS"]) < 1e-6
