"""`timers1 forecast` and `timers1 eval` end to end on small files, and their bad-input errors."""

import json

import numpy as np
import pandas as pd
import pytest

from timers1 import cli
from timers1.errors import InputError
from timers1.eval import cli as eval_cli
from timers1.eval.baselines import StatsForecastBaseline
from timers1.eval.datasets import DatasetError, load_specs_yaml
from timers1.eval.forecasting import QUANTILE_COLUMNS, forecast_file
from timers1.eval.frequency import FrequencyError


def hourly_frame(items=("a", "b", "c"), length=24 * 5, start="2024-01-01"):
    rows = []
    for k, item in enumerate(items):
        t = np.arange(length)
        values = 10 * (k + 1) + np.sin(2 * np.pi * t / 24) + 0.01 * t
        rows.append(pd.DataFrame({"item_id": item, "timestamp": pd.date_range(start, periods=length, freq="h"),
                                  "target": values}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture
def hourly_csv(tmp_path):
    path = tmp_path / "series.csv"
    hourly_frame().to_csv(path, index=False)
    return path


def test_forecast_file_end_to_end_with_plot(tmp_path, hourly_csv):
    forecaster = StatsForecastBaseline("seasonal_naive", season_length=24)
    out, png = tmp_path / "fc.csv", tmp_path / "fc.png"
    frame = forecast_file(forecaster, hourly_csv, 30, out, plot_path=png, max_series_plotted=2, batch_size=2)
    written = pd.read_csv(out, parse_dates=["timestamp"])
    assert list(written.columns) == ["item_id", "timestamp", *QUANTILE_COLUMNS]
    assert QUANTILE_COLUMNS == ["q0.1", "q0.2", "q0.3", "q0.4", "q0.5", "q0.6", "q0.7", "q0.8", "q0.9"]
    assert len(written) == 3 * 30 and list(written["item_id"].unique()) == ["a", "b", "c"]
    a = written[written["item_id"] == "a"]
    # timestamps continue hourly right after the last observation
    assert a["timestamp"].iloc[0] == pd.Timestamp("2024-01-06 00:00")
    assert (a["timestamp"].diff().dropna() == pd.Timedelta("1h")).all()
    # seasonal naive: the median repeats the last day; the band widens after one season
    history = hourly_frame()
    last_day = history[history["item_id"] == "a"]["target"].to_numpy()[-24:]
    np.testing.assert_allclose(a["q0.5"].to_numpy()[:24], last_day)
    width = (a["q0.9"] - a["q0.1"]).to_numpy()
    assert width[0] > 0 and width[24] > width[23]
    assert (np.diff(a[QUANTILE_COLUMNS].to_numpy(), axis=1) >= 0).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert len(frame) == len(written)


def test_forecast_cli_parquet_in_and_out(tmp_path, monkeypatch):
    source = tmp_path / "series.parquet"
    monthly = pd.DataFrame({"item_id": "m", "timestamp": pd.date_range("2020-01-31", periods=36, freq="ME"),
                            "target": np.arange(36.0)})
    monthly.to_parquet(source, index=False)
    monkeypatch.setattr(eval_cli, "_load_checkpoint_forecaster",
                        lambda path, context_points=0: StatsForecastBaseline("seasonal_naive", season_length=12))
    out = tmp_path / "fc.parquet"
    code = cli.main(["forecast", "--checkpoint", str(tmp_path), "--input", str(source), "--horizon", "3",
                     "--output", str(out), "--plot", str(tmp_path / "p.png")])
    assert code == 0
    written = pd.read_parquet(out)
    # month-end input continues at month ends
    assert list(written["timestamp"]) == list(pd.to_datetime(["2023-01-31", "2023-02-28", "2023-03-31"]))
    np.testing.assert_allclose(written["q0.5"], [24.0, 25.0, 26.0])
    assert (tmp_path / "p.png").is_file()


def test_forecast_bad_inputs_name_the_culprit(tmp_path, hourly_csv):
    forecaster = StatsForecastBaseline("seasonal_naive", season_length=24)
    with pytest.raises(FrequencyError, match="'fortnightly'"):
        forecast_file(forecaster, hourly_csv, 5, tmp_path / "o.csv", freq="fortnightly")
    with pytest.raises(DatasetError, match=r"series 'a' has 120 points, shorter than the horizon 200"):
        forecast_file(forecaster, hourly_csv, 200, tmp_path / "o.csv")

    missing = tmp_path / "missing.csv"
    hourly_frame().rename(columns={"target": "value"}).to_csv(missing, index=False)
    with pytest.raises(DatasetError, match=r"missing\.csv: missing column\(s\) target"):
        forecast_file(forecaster, missing, 5, tmp_path / "o.csv")

    irregular = tmp_path / "irregular.csv"
    frame = hourly_frame(items=("x",), length=10)
    frame.loc[5:, "timestamp"] += pd.Timedelta("17min")
    frame.to_csv(irregular, index=False)
    with pytest.raises(FrequencyError, match=r"irregular\.csv: series 'x': timestamps are irregular"):
        forecast_file(forecaster, irregular, 5, tmp_path / "o.csv")

    text = tmp_path / "text.csv"
    frame = hourly_frame(items=("x",), length=10).astype({"target": object})
    frame.loc[3, "target"] = "n/a?"
    frame.to_csv(text, index=False)
    with pytest.raises(DatasetError, match=r"text\.csv: column target: value 'n/a\?' \(line 5, item 'x'\)"):
        forecast_file(forecaster, text, 5, tmp_path / "o.csv")


def test_cli_reports_bad_input_in_one_line(tmp_path, hourly_csv, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "_load_checkpoint_forecaster",
                        lambda path, context_points=0: StatsForecastBaseline("seasonal_naive", season_length=24))
    code = cli.main(["forecast", "--checkpoint", str(tmp_path), "--input", str(hourly_csv),
                     "--horizon", "500", "--output", str(tmp_path / "o.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "timers1 forecast: error:" in err and "shorter than the horizon 500" in err


def write_yaml(tmp_path, body):
    path = tmp_path / "sets.yaml"
    path.write_text(body)
    return path


def test_eval_cli_baseline_on_yaml_dataset_json_and_csv(tmp_path, hourly_csv, capsys):
    spec = write_yaml(tmp_path, f"datasets:\n  - {{file: {hourly_csv.name}, freq: H, horizon: 12, windows: 2}}\n")
    board = tmp_path / "board.csv"
    pd.DataFrame({"model": ["seasonal_naive", "great", "seasonal_naive", "great"],
                  "config": ["series/H/12", "series/H/12", "other/D/short", "other/D/short"],
                  "MASE": [20.0, 0.1, 1.0, 1.0], "CRPS": [1.0, 0.01, 1.0, 1.0]}).to_csv(board, index=False)
    out = tmp_path / "res.json"
    code = cli.main(["eval", "--baseline", "naive", "--data", str(spec), "--output", str(out),
                     "--compare", str(board), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    result = json.loads(out.read_text())
    (row,) = result["configs"]
    assert (row["config"], row["horizon"], row["windows"], row["seasonality"]) == ("series/H/12", 12, 2, 24)
    assert row["num_series"] == 3 and row["num_instances"] == 6
    assert row["relative_MASE"] == pytest.approx(row["MASE"] / row["seasonal_naive_MASE"])
    assert result["geometric_mean"]["relative_CRPS"] == pytest.approx(row["relative_CRPS"])
    ranked = [r["model"] for r in result["leaderboard"]]
    assert ranked[0] == "great" and "naive (this run)" in ranked
    printed = capsys.readouterr().out
    assert "series/H/12" in printed and "geometric mean" in printed and "<==" in printed
    # the baseline forecasts were cached: a second run reads them back, CSV output by extension
    assert list((tmp_path / "cache" / "forecasts").rglob("*.npy"))
    csv_out = tmp_path / "res.csv"
    assert cli.main(["eval", "--baseline", "naive", "--data", str(spec), "--output", str(csv_out),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    table = pd.read_csv(csv_out)
    assert list(table["config"]) == ["series/H/12", "geometric_mean"] and bool(table["cached"].iloc[0])
    assert table["MASE"].iloc[0] == pytest.approx(row["MASE"])


def test_eval_dataset_errors(tmp_path, hourly_csv):
    bad_freq = write_yaml(tmp_path, f"- {{file: {hourly_csv.name}, freq: XYZ}}\n")
    with pytest.raises(FrequencyError, match=r"sets\.yaml: datasets\[0\]\.freq: unknown frequency 'XYZ'"):
        load_specs_yaml(bad_freq)
    unknown_field = write_yaml(tmp_path, f"- {{file: {hourly_csv.name}, freq: H, horizn: 3}}\n")
    with pytest.raises(DatasetError, match=r"unknown field\(s\) horizn"):
        load_specs_yaml(unknown_field)
    too_short = write_yaml(tmp_path, f"- {{file: {hourly_csv.name}, freq: H, horizon: 60, windows: 2}}\n")
    with pytest.raises(DatasetError, match=r"series\.csv: series 'a' has 120 points, fewer than 2 window"):
        cli_args = ["eval", "--baseline", "naive", "--data", str(too_short), "--output", str(tmp_path / "r.json")]
        eval_cli.run_eval(cli.build_parser().parse_args(cli_args))
    with pytest.raises(InputError, match="unknown configuration"):
        eval_cli._resolve_specs(str(write_yaml(tmp_path, f"- {{file: {hourly_csv.name}, freq: H}}\n")),
                                ["nope/H/short"])


def test_eval_checkpoint_goes_through_load_forecaster(tmp_path, hourly_csv, monkeypatch):
    forecast_api = pytest.importorskip("timers1.forecast")
    loaded = []

    def fake_load_forecaster(path, *args, **kwargs):
        loaded.append(path)
        return StatsForecastBaseline("naive")

    monkeypatch.setattr(forecast_api, "load_forecaster", fake_load_forecaster)
    spec = write_yaml(tmp_path, f"- {{file: {hourly_csv.name}, freq: H, horizon: 24, windows: 1, name: s/H}}\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(spec), "--output", str(out),
                     "--no-cache", "--context-points", "48"]) == 0
    assert loaded == [str(ckpt)]
    result = json.loads(out.read_text())
    assert result["model"] == str(ckpt) and result["settings"]["max_context_points"] == 48  # the path, not "ckpt"
    assert result["settings"]["checkpoint"] == str(ckpt)


def test_fracast_peer_predicts_nine_quantiles():
    pytest.importorskip("fracast")
    from timers1.eval.baselines import FracastForecaster

    forecaster = FracastForecaster()
    t = np.arange(200.0)
    # series of different lengths share one batch; one shorter than fracast's minimum of 8
    out = forecaster.predict([np.sin(t / 4) + 5, np.array([1.0, 2.0, 3.0])], horizon=12)
    assert out.shape == (2, 9, 12) and np.isfinite(out).all()
    assert forecaster.cache_key.startswith("fracast-")
