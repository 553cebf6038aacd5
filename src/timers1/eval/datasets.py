"""Evaluation datasets: long-format files, GIFT-Eval configurations and their test windows.

A configuration (``DatasetSpec``) says which file, at which frequency, with which horizon and
how many windows. ``build_task`` turns it into the instances GIFT-Eval scores: for each series,
``windows`` non-overlapping windows of ``horizon`` points at the very end; each window's context
is the whole history before it (gluonts ``split`` + ``generate_instances(distance=horizon)``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from timers1.config import read_yaml
from timers1.errors import InputError
from timers1.eval.frequency import TERM_MULTIPLIER, Frequency, parse_frequency
from timers1.eval.metrics import seasonal_error

REQUIRED_COLUMNS = ("item_id", "timestamp", "target")
TEST_SPLIT = 0.1
"""GIFT-Eval: the windows cover about this fraction of the shortest series."""
MAX_WINDOWS = 20
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".csv.xz", ".tsv", ".tsv.gz")
"""Text files, read by pandas; their errors name file lines (the header is line 1)."""


class DatasetError(InputError):
    """A data file or dataset description is missing, malformed or too short."""


@dataclass(frozen=True)
class Series:
    item_id: str
    timestamps: pd.DatetimeIndex
    values: np.ndarray  # float64, NaN = missing


def read_long_format(path: str | Path) -> pd.DataFrame:
    """Read a long-format CSV (optionally gzipped) or Parquet file: item_id, timestamp, target.

    Returns the frame with item_id as str, timestamp as datetime64, target as float64, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file {path} does not exist")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        elif name.endswith(CSV_SUFFIXES):
            frame = pd.read_csv(path, sep="\t" if ".tsv" in name else ",",
                                dtype={"item_id": str}, keep_default_na=True)
        else:
            raise DatasetError(f"{path}: unknown file type; expected .csv, .csv.gz or .parquet")
    except DatasetError:
        raise
    except Exception as exc:  # a parser error of any kind is bad input; name the file
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; "
                           f"found {', '.join(map(str, frame.columns))}; expected {', '.join(REQUIRED_COLUMNS)}")
    frame = frame[list(REQUIRED_COLUMNS)].copy()
    if frame.empty:
        raise DatasetError(f"{path}: no rows")
    frame["item_id"] = frame["item_id"].astype(str)
    try:
        frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: column timestamp: cannot parse as dates ({exc})") from None
    target = pd.to_numeric(frame["target"], errors="coerce")
    bad = target.isna() & frame["target"].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(f"{path}: column target: value {frame['target'].iloc[row]!r} "
                           f"(line {row + 2}, item {frame['item_id'].iloc[row]!r}) is not a number")
    frame["target"] = target.astype(np.float64)
    if frame.duplicated(["item_id", "timestamp"]).any():
        rows = np.flatnonzero(frame.duplicated(["item_id", "timestamp"], keep=False).to_numpy())
        dup = frame.iloc[rows[0]]
        same = rows[(frame["item_id"].to_numpy()[rows] == dup["item_id"])
                    & (frame["timestamp"].to_numpy()[rows] == dup["timestamp"].to_datetime64())]
        where = f" (lines {same[0] + 2} and {same[1] + 2})" if name.endswith(CSV_SUFFIXES) else ""
        raise DatasetError(f"{path}: item {dup['item_id']!r} has duplicate timestamp {dup['timestamp']}{where}")
    return frame


def frame_to_series(frame: pd.DataFrame) -> list[Series]:
    """Split a long-format frame into series, in the order items first appear."""
    out = []
    for item, group in frame.groupby("item_id", sort=False):
        if not group["timestamp"].is_monotonic_increasing:
            group = group.sort_values("timestamp", kind="stable")
        out.append(Series(str(item), pd.DatetimeIndex(group["timestamp"]), group["target"].to_numpy(np.float64)))
    return out


def aggregate_series(series: list[Series], freq: Frequency, how: str) -> list[Series]:
    """Resample every series to ``freq``, summing or averaging (a bucket of only NaN stays NaN)."""
    if how not in ("sum", "mean"):
        raise DatasetError(f"aggregate.how={how!r}: expected 'sum' or 'mean'")
    out = []
    for s in series:
        resampled = pd.Series(s.values, index=s.timestamps).resample(freq.pandas_offset)
        values = resampled.sum(min_count=1) if how == "sum" else resampled.mean()
        out.append(Series(s.item_id, pd.DatetimeIndex(values.index), values.to_numpy(np.float64)))
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation configuration (a dataset at a frequency and horizon)."""

    name: str
    """Configuration name as reported, e.g. 'm4_hourly/H/short'."""
    path: str
    """Long-format file (item_id, timestamp, target)."""
    freq: str
    """Frequency of the evaluated series (after aggregation), pandas or gluonts spelling."""
    term: str = "short"
    """GIFT-Eval term: short (x1), medium (x10), long (x15) of the base horizon."""
    horizon: int | None = None
    """Explicit prediction length; overrides the term rule."""
    windows: int | None = None
    """Explicit number of test windows; default is the GIFT-Eval rule."""
    seasonality: int | None = None
    """Explicit MASE seasonality m; default is gluonts' rule for the frequency."""
    aggregate: str | None = None
    """'sum' or 'mean' to resample the file's series to ``freq`` first (us_births/M, saugeen/M)."""
    m4_rules: bool = False
    """GIFT-Eval's M4 rules: M4 base horizons and a single window."""

    @property
    def frequency(self) -> Frequency:
        return parse_frequency(self.freq, f"{self.name}: freq")

    def resolved_horizon(self) -> int:
        if self.horizon is not None:
            return self.horizon
        if self.term not in TERM_MULTIPLIER:
            raise DatasetError(f"{self.name}: term={self.term!r}; expected one of {', '.join(TERM_MULTIPLIER)}")
        return self.frequency.base_horizon(m4=self.m4_rules) * TERM_MULTIPLIER[self.term]

    def resolved_seasonality(self) -> int:
        return self.seasonality if self.seasonality is not None else self.frequency.seasonality

    def resolved_windows(self, min_series_length: int) -> int:
        if self.windows is not None:
            return self.windows
        if self.m4_rules:
            return 1
        w = math.ceil(TEST_SPLIT * min_series_length / self.resolved_horizon())
        return min(max(1, w), MAX_WINDOWS)


def gift8_specs(data_dir: str | Path) -> list[DatasetSpec]:
    """The eight GIFT-Eval configurations rebuilt from ../shared/data/gift8 (see gift_eval.md)."""
    d = Path(data_dir)
    return [
        DatasetSpec("m4_hourly/H/short", str(d / "m4_hourly.csv.gz"), "H", m4_rules=True),
        DatasetSpec("m4_weekly/W/short", str(d / "m4_weekly.csv.gz"), "W", m4_rules=True),
        DatasetSpec("hospital/M/short", str(d / "hospital_M.csv.gz"), "M"),
        DatasetSpec("car_parts/M/short", str(d / "car_parts_M.csv.gz"), "M"),
        DatasetSpec("us_births/D/short", str(d / "us_births_D.csv.gz"), "D"),
        DatasetSpec("us_births/M/short", str(d / "us_births_D.csv.gz"), "M", aggregate="sum"),
        DatasetSpec("saugeen/D/short", str(d / "saugeen_D.csv.gz"), "D"),
        DatasetSpec("saugeen/M/short", str(d / "saugeen_D.csv.gz"), "M", aggregate="mean"),
    ]


GIFT8_NAMES = tuple(s.name for s in gift8_specs("."))

_SPEC_FIELDS = {"name", "file", "freq", "term", "horizon", "windows", "seasonality", "aggregate", "m4_rules"}


def load_specs_yaml(path: str | Path) -> list[DatasetSpec]:
    """Read dataset descriptions from YAML.

    Either a list or ``{datasets: [...]}``; each entry has ``file`` (relative paths resolve against
    the YAML's folder, or ``data_root`` if given at the top level), ``freq``, and ``horizon`` or
    ``term``; optional ``name``, ``windows``, ``seasonality``, ``aggregate`` ('sum'/'mean').
    """
    path = Path(path)
    doc = read_yaml(path, "dataset description", DatasetError)
    root = path.parent
    entries = doc
    if isinstance(doc, dict):
        if "data_root" in doc:
            root = (path.parent / str(doc["data_root"])).resolve()
        entries = doc.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: expected a list of datasets (or a mapping with key 'datasets')")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a mapping, got {entry!r}")
        unknown = sorted(set(entry) - _SPEC_FIELDS)
        if unknown:
            raise DatasetError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_SPEC_FIELDS))}")
        for key in ("file", "freq"):
            if key not in entry:
                raise DatasetError(f"{where}: missing field {key!r}")
        parse_frequency(str(entry["freq"]), f"{where}.freq")
        for key in ("horizon", "windows", "seasonality"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DatasetError(f"{where}.{key}={value!r}: expected a positive integer")
        term = entry.get("term", "short")
        if term not in TERM_MULTIPLIER:
            raise DatasetError(f"{where}.term={term!r}: expected one of {', '.join(TERM_MULTIPLIER)}")
        if entry.get("aggregate") not in (None, "sum", "mean"):
            raise DatasetError(f"{where}.aggregate={entry['aggregate']!r}: expected 'sum' or 'mean'")
        file = Path(str(entry["file"]))
        file = file if file.is_absolute() else root / file
        freq = str(entry["freq"])
        stem = file.name.split(".")[0]
        default_name = f"{stem}/{parse_frequency(freq).code}/{entry['horizon'] if entry.get('horizon') else term}"
        specs.append(DatasetSpec(
            name=str(entry.get("name", default_name)), path=str(file), freq=freq, term=term,
            horizon=entry.get("horizon"), windows=entry.get("windows"),
            seasonality=entry.get("seasonality"), aggregate=entry.get("aggregate"),
            m4_rules=bool(entry.get("m4_rules", False))))
    return specs


@dataclass
class EvalTask:
    """The scored instances of one configuration: one per (series, window)."""

    spec: DatasetSpec
    horizon: int
    windows: int
    seasonality: int
    item_ids: list[str]
    window_index: np.ndarray          # [N] 0 = earliest window
    contexts: list[np.ndarray]        # N raw histories (NaN = missing), full length
    labels: np.ndarray                # [N, H], NaN = missing (masked)
    seasonal_errors: np.ndarray = field(default=None)  # [N]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_series(self) -> int:
        return len(set(self.item_ids))

    def content_hash(self) -> str:
        """Hash of everything a forecast depends on: horizon, contexts (values and lengths)."""
        h = hashlib.sha256()
        h.update(f"{self.horizon}|{self.windows}|{len(self.contexts)}".encode())
        for ctx in self.contexts:
            h.update(np.int64(len(ctx)).tobytes())
            h.update(np.ascontiguousarray(ctx, dtype=np.float64).tobytes())
        return h.hexdigest()[:20]


def build_task(spec: DatasetSpec, series: list[Series] | None = None) -> EvalTask:
    """Load ``spec``'s data (unless ``series`` is given) and cut its test windows."""
    if series is None:
        series = frame_to_series(read_long_format(spec.path))
        if spec.aggregate:
            series = aggregate_series(series, spec.frequency, spec.aggregate)
    horizon = spec.resolved_horizon()
    if horizon < 1:
        raise DatasetError(f"{spec.name}: horizon={horizon} must be >= 1")
    min_length = min(len(s.values) for s in series)
    windows = spec.resolved_windows(min_length)
    seasonality = spec.resolved_seasonality()
    need = windows * horizon + 1  # at least one context point before the earliest window
    for s in series:
        if len(s.values) < need:
            raise DatasetError(
                f"{spec.path}: series {s.item_id!r} has {len(s.values)} points, fewer than "
                f"{windows} window(s) x horizon {horizon} + 1 context point = {need} ({spec.name})")
    item_ids, window_index, contexts, labels, scales = [], [], [], [], []
    for s in series:
        n = len(s.values)
        for w in range(windows):
            start = n - (windows - w) * horizon
            context = s.values[:start]
            item_ids.append(s.item_id)
            window_index.append(w)
            contexts.append(context)
            labels.append(s.values[start:start + horizon])
            scales.append(seasonal_error(context, seasonality))
    return EvalTask(spec=spec, horizon=horizon, windows=windows, seasonality=seasonality,
                    item_ids=item_ids, window_index=np.asarray(window_index),
                    contexts=contexts, labels=np.stack(labels), seasonal_errors=np.asarray(scales))
