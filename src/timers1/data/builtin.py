"""Real series that ship inside installed packages, so the default corpus needs no download.

statsmodels.datasets (bundled CSVs): co2 (weekly Mauna Loa, with gaps), elec_equip (monthly
euro-area orders), elnino (monthly sea-surface temperature, 1950-2010), sunspots (yearly),
nile (yearly river flow), macrodata (quarterly US macro, 12 series), danish_data and
interest_inflation (quarterly), strikes, fertility (yearly, one series per country).
matplotlib's sample data: Stocks.csv (monthly prices of 10 tickers/indices), goog.npz (daily
prices and volumes), eeg.dat (4 EEG channels).

None of these is a GIFT-Eval evaluation set (see ingest.EVAL_DATASET_NAMES); the builder runs
them through the same exclusion check anyway. A package that is missing or a dataset that
fails to load is skipped and reported, never fatal: the synthetic part alone is a corpus.
"""

from __future__ import annotations

import os

import numpy as np

from timers1.data.ingest import RawSeries

# (dataset, domain)
_STATSMODELS = [("co2", "climate"), ("elec_equip", "industry"), ("elnino", "climate"),
                ("sunspots", "nature"), ("nile", "nature"), ("macrodata", "economics"),
                ("danish_data", "economics"), ("interest_inflation", "economics"),
                ("strikes", "economics"), ("fertility", "demographics")]
_SKIP_COLUMNS = {"year", "quarter", "YEAR", "Country Name", "Country Code", "Indicator Name",
                 "Indicator Code", "index"}
_FREQ = {"co2": "W", "elec_equip": "M", "elnino": "M", "sunspots": "Y", "nile": "Y", "macrodata": "Q",
         "danish_data": "Q", "interest_inflation": "Q", "strikes": "", "fertility": "Y"}


def _statsmodels_series(name: str) -> list[RawSeries]:
    import importlib

    data = importlib.import_module(f"statsmodels.datasets.{name}").load_pandas().data
    freq = _FREQ[name]
    if name == "elnino":  # one row per year, one column per month: read row-major
        months = data.drop(columns=["YEAR"]).to_numpy(dtype=np.float64)
        return [RawSeries("elnino_sst", months.reshape(-1), np.datetime64("1950-01-01", "s"), freq)]
    if name == "fertility":  # one row per country, one column per year
        years = [c for c in data.columns if c not in _SKIP_COLUMNS]
        out = []
        for _, row in data.iterrows():
            values = row[years].to_numpy(dtype=np.float64)
            out.append(RawSeries(f"fertility_{row['Country Code']}", values,
                                 np.datetime64(f"{years[0]}-01-01", "s"), freq))
        return out
    start = None
    index = data.index
    if hasattr(index, "to_numpy") and np.issubdtype(index.dtype, np.datetime64):
        start = index.to_numpy()[0].astype("datetime64[s]")
    out = []
    columns = [c for c in data.columns if c not in _SKIP_COLUMNS]
    for column in columns:
        values = data[column].to_numpy(dtype=np.float64)
        out.append(RawSeries(name if len(columns) == 1 else f"{name}_{column}", values, start, freq))
    return out


def _matplotlib_series() -> list[tuple[RawSeries, str]]:
    import matplotlib

    root = os.path.join(matplotlib.get_data_path(), "sample_data")
    out: list[tuple[RawSeries, str]] = []
    stocks = os.path.join(root, "Stocks.csv")
    if os.path.isfile(stocks):
        lines = [ln for ln in open(stocks, encoding="utf-8").read().splitlines() if not ln.startswith("#")]
        header = lines[0].split(",")
        rows = [ln.split(",") for ln in lines[1:] if ln]
        for j, name in enumerate(header[1:], start=1):
            values = np.array([float(r[j]) if r[j] else np.nan for r in rows])
            out.append((RawSeries(f"stocks_{name.strip('^')}", values,
                                  np.datetime64(rows[0][0], "s"), "M"), "finance"))
    goog = os.path.join(root, "goog.npz")
    if os.path.isfile(goog):
        with np.load(goog) as npz:
            prices = npz["price_data"]
        start = prices["date"][0].astype("datetime64[s]")
        out.append((RawSeries("goog_adj_close", prices["adj_close"].astype(np.float64), start, "D"), "finance"))
        out.append((RawSeries("goog_volume", prices["volume"].astype(np.float64), start, "D"), "finance"))
    eeg = os.path.join(root, "eeg.dat")
    if os.path.isfile(eeg):
        channels = np.fromfile(eeg, dtype=np.float64).reshape(800, 4)
        for c in range(channels.shape[1]):
            out.append((RawSeries(f"eeg_channel{c}", channels[:, c].copy(), None, ""), "health"))
    return out


def builtin_real_series() -> tuple[list[tuple[RawSeries, str, str]], list[str]]:
    """([(series, domain, source)], problems): every offline real series we can find."""
    found: list[tuple[RawSeries, str, str]] = []
    problems: list[str] = []
    for name, domain in _STATSMODELS:
        try:
            for series in _statsmodels_series(name):
                found.append((series, domain, f"statsmodels.{name}"))
        except Exception as exc:  # optional data: report and carry on with the rest
            problems.append(f"statsmodels.datasets.{name}: {type(exc).__name__}: {exc}")
    try:
        for series, domain in _matplotlib_series():
            found.append((series, domain, "matplotlib.sample_data"))
    except Exception as exc:
        problems.append(f"matplotlib sample_data: {type(exc).__name__}: {exc}")
    return found, problems
