"""Forecast long-format series with any forecaster: quantiles out, and a picture of them.

``forecast_file(forecaster, input, horizon, output)`` reads item_id/timestamp/target (CSV or
Parquet), forecasts every series ``horizon`` steps past its end, and writes one row per
(item_id, timestamp) with columns q0.1 .. q0.9; timestamps continue at each series' inferred
frequency (or ``freq``). ``plot_forecasts`` draws history, median and the 10-90% band.

The quantiles of every row are sorted after the model: its nine heads are trained jointly but
not constrained to be ordered, and an output row where q0.6 > q0.7 is not a distribution.
Sorting leaves every set of quantiles that was already ordered as it was (the model's own
output, which parity tests compare with the released code, is ``Forecaster.predict``'s).

Missing target values (NaN) inside a series are accepted and filled with the last observed
value before them (leading ones with the first observed value), the GIFT-Eval imputation;
a one-line warning says how many there were.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from timers1.errors import InputError
from timers1.eval.datasets import DatasetError, Series, frame_to_series, read_long_format
from timers1.eval.forecaster import Forecaster, predict_batched
from timers1.eval.frequency import Frequency, infer_frequency, parse_frequency
from timers1.eval.metrics import QUANTILE_LEVELS

QUANTILE_COLUMNS = [f"q{q:g}" for q in QUANTILE_LEVELS]


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def forecast_series(forecaster: Forecaster, series: Sequence[Series], horizon: int, *,
                    freq: str | None = None, source: str = "input", batch_size: int = 64,
                    max_context_points: int | None = None,
                    warn: Callable[[str], None] = _warn) -> pd.DataFrame:
    """Quantile forecasts of every series as a long frame: item_id, timestamp, q0.1 .. q0.9,
    non-decreasing in every row. Missing values are filled (see the module's docstring) and
    counted in one ``warn`` line."""
    if not isinstance(horizon, (int, np.integer)) or isinstance(horizon, bool) or horizon < 1:
        raise InputError(f"--horizon {horizon!r}: must be a positive integer")
    if not series:
        raise DatasetError(f"{source}: no series")
    fixed = parse_frequency(freq, "--freq") if freq else None
    frequencies: list[Frequency] = []
    for s in series:
        observed = int(np.isfinite(s.values).sum())
        if observed == 0:
            raise DatasetError(f"{source}: series {s.item_id!r} has no values (all NaN)")
        if len(s.values) < horizon:
            raise DatasetError(f"{source}: series {s.item_id!r} has {len(s.values)} points, "
                               f"shorter than the horizon {horizon}")
        frequencies.append(fixed or infer_frequency(s.timestamps, f"{source}: series {s.item_id!r}"))
    missing = [int(np.isnan(s.values).sum()) for s in series]
    if sum(missing):
        warn(f"{source}: {sum(missing)} missing target value(s) in {sum(1 for m in missing if m)} series, "
             f"filled with the last observed value before each (leading ones with the first observed value)")
    quantiles = predict_batched(forecaster, [s.values for s in series], horizon,
                                batch_size=batch_size, max_context_points=max_context_points)
    quantiles = np.sort(quantiles, axis=1)  # [N, Q, H]: each step's quantiles in order
    parts = []
    for s, f, q in zip(series, frequencies, quantiles):
        offset = f.pandas_offset
        future = pd.date_range(s.timestamps[-1] + offset, periods=horizon, freq=offset)
        part = pd.DataFrame(q.T, columns=QUANTILE_COLUMNS)
        part.insert(0, "timestamp", future)
        part.insert(0, "item_id", s.item_id)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def check_output_path(path: str | Path) -> str:
    """'parquet' or 'csv' by extension; an error naming the path otherwise."""
    name = Path(path).name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst")):
        return "csv"
    raise InputError(f"--output {path}: unknown file type; use .csv, .csv.gz or .parquet")


def write_frame(frame: pd.DataFrame, path: str | Path) -> None:
    """Write CSV (.csv, .csv.gz) or Parquet (.parquet) by extension."""
    kind = check_output_path(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def plot_forecasts(series: Sequence[Series], forecasts: pd.DataFrame, path: str | Path,
                   max_series_plotted: int = 4, history_points: int | None = None) -> None:
    """PNG: per series (the first ``max_series_plotted``), history, median and 10-90% band."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    shown = list(series)[:max(1, max_series_plotted)]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.6 * len(shown)), squeeze=False)
    by_item = {item: g for item, g in forecasts.groupby("item_id", sort=False)}
    for ax, s in zip(axes[:, 0], shown):
        fc = by_item[s.item_id]
        keep = min(len(s.values), history_points or max(4 * len(fc), 96))
        ax.plot(s.timestamps[-keep:], s.values[-keep:], color="black", lw=1, label="history")
        ax.fill_between(fc["timestamp"], fc["q0.1"], fc["q0.9"], color="tab:blue", alpha=0.25,
                        label="10-90%")
        ax.plot(fc["timestamp"], fc["q0.5"], color="tab:blue", lw=1.5, label="median")
        shown = f"all {keep:,}" if keep == len(s.values) else f"last {keep:,} of {len(s.values):,}"
        ax.set_title(f"{s.item_id}: {shown} history points, {len(fc)} forecast", fontsize=9, loc="left")
        ax.set_ylabel("target", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("timestamp", fontsize=8)
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def forecast_file(forecaster: Forecaster, input_path: str | Path, horizon: int, output_path: str | Path,
                  *, plot_path: str | Path | None = None, max_series_plotted: int = 4,
                  freq: str | None = None, batch_size: int = 64,
                  max_context_points: int | None = None) -> pd.DataFrame:
    """Read ``input_path``, forecast, write ``output_path`` (and ``plot_path``); return the frame."""
    check_output_path(output_path)
    series = frame_to_series(read_long_format(input_path))
    forecasts = forecast_series(forecaster, series, horizon, freq=freq, source=str(input_path),
                                batch_size=batch_size, max_context_points=max_context_points)
    write_frame(forecasts, output_path)
    if plot_path:
        plot_forecasts(series, forecasts, plot_path, max_series_plotted)
    return forecasts
