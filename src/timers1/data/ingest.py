"""Reading user files into raw series, and the evaluation-set exclusion list.

Two layouts, each as CSV (optionally gzip/bz2/zstd compressed, by extension) or Parquet:

- long: columns ``item_id, timestamp, target`` (names configurable); one row per observation.
  Rows are grouped by item and sorted by timestamp; empty, ``NA`` or ``NaN`` targets are missing
  values (imputed later), anything else that is not a number is an error naming file and line.
- wide: one timestamp column plus one numeric column per series; the column name is the
  item_id.

Exclusion: evaluation series must never enter a training corpus. A source whose name (or file
name) matches an evaluation dataset (GIFT-Eval's M4, M3, tourism, hospital, car_parts,
us_births, saugeen, ETT, exchange_rate, plus any the config adds) is skipped whole; and any
series whose values hash (``series_hash``) to a listed hash is dropped, which also catches an
evaluation series that arrives under another name. Both are counted in the build summary.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from timers1.data import storage
from timers1.errors import InputError

# GIFT-Eval datasets that are our evaluation sets; names are matched after normalisation.
EVAL_DATASET_NAMES = ("m4", "m3", "tourism", "hospital", "car_parts", "us_births", "saugeen",
                      "ett", "exchange_rate")

NULL_STRINGS = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]


class IngestError(InputError):
    """An input file cannot be read as the layout its source declares."""


@dataclass
class RawSeries:
    item_id: str
    values: np.ndarray  # float64, NaN = missing
    start: np.datetime64 | None = None
    freq: str = ""


def normalize_name(name: str) -> str:
    """'ETTh1.csv.gz' -> 'etth1'; 'Car-Parts_M' -> 'car_parts_m'."""
    name = Path(name).name
    for _ in range(3):  # strip up to three suffixes: .csv.gz, .parquet, ...
        stem, dot, ext = name.rpartition(".")
        if dot and ext.lower() in ("csv", "gz", "bz2", "zst", "parquet", "pq", "tsv", "xz"):
            name = stem
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def excluded_name(name: str, excluded: list[str] | tuple[str, ...]) -> str | None:
    """The evaluation dataset ``name`` belongs to, or None.

    'm3_monthly', 'ett1_H', 'etth2', 'tourism-quarterly' and 'car_parts_M' all match; 'm30' or
    'metta' do not: a listed name must be followed by a separator, a digit+separator/end, or
    one letter variant like ETT's 'h'/'m' ('etth1', 'ettm2').
    """
    norm = normalize_name(name)
    for raw in excluded:
        ex = normalize_name(raw)
        variant = "" if ex[-1].isdigit() else r"(?:[hm]?\d+)?"
        if re.fullmatch(rf"{re.escape(ex)}{variant}(?:_.*)?", norm):
            return ex
    return None


def series_hash(values: np.ndarray) -> str:
    """Content hash of a series as float32 with canonical NaN (the exclusion-list key)."""
    x = np.asarray(values, dtype=np.float32).copy()
    x[~np.isfinite(x)] = np.nan
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:32]


_FREQ_BY_SECONDS = [(60, "min"), (900, "15min"), (1800, "30min"), (3600, "H"), (86400, "D"),
                    (7 * 86400, "W"), (30.44 * 86400, "M"), (91.3 * 86400, "Q"), (365.25 * 86400, "Y")]


def infer_freq(timestamps: np.ndarray) -> str:
    """Calendar frequency from the median step between datetime64 timestamps ('' if unknown)."""
    if timestamps is None or len(timestamps) < 2 or not np.issubdtype(timestamps.dtype, np.datetime64):
        return ""
    steps = np.diff(timestamps.astype("datetime64[s]").astype(np.int64))
    steps = steps[steps > 0]
    if steps.size == 0:
        return ""
    median = float(np.median(steps))
    for seconds, name in _FREQ_BY_SECONDS:
        if abs(median - seconds) <= 0.1 * seconds:
            return name
    return ""


def _read_table(path: str | Path, column_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """A CSV (optionally compressed, by extension) or Parquet file at a local path or URI."""
    if storage.file_size(path) is None:
        raise IngestError(f"{path}: file does not exist")
    suffixes = [s.lower() for s in PurePosixPath(str(path)).suffixes]
    parquet = ".parquet" in suffixes or ".pq" in suffixes
    fs, inner = storage.resolve(path)
    try:
        if parquet:
            return pq.read_table(inner, filesystem=fs)
        convert = pacsv.ConvertOptions(column_types=column_types or {}, null_values=NULL_STRINGS,
                                       strings_can_be_null=True)
        with fs.open_input_stream(inner, compression="detect") as stream:
            return pacsv.read_csv(stream, convert_options=convert)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IngestError(f"{path}: cannot be read as {'Parquet' if parquet else 'CSV'}: "
                          f"{str(exc).splitlines()[0]}") from None


def _numeric_column(path: Path, table: pa.Table, name: str, header_lines: int = 1) -> np.ndarray:
    """float64 values of a column; strings that are not numbers raise naming file, column, line."""
    column = table.column(name)
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        return column.to_numpy(zero_copy_only=False).astype(np.float64)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        texts = column.to_pylist()
        out = np.empty(len(texts), dtype=np.float64)
        for row, text in enumerate(texts):
            if text is None:
                out[row] = np.nan
                continue
            try:
                out[row] = float(text)
            except ValueError:
                raise IngestError(f"{path}: column {name!r}, line {row + 1 + header_lines}: "
                                  f"{text!r} is not a number") from None
        return out
    raise IngestError(f"{path}: column {name!r} has type {column.type}, expected numbers")


def _require_columns(path: Path, table: pa.Table, names: list[str]) -> None:
    for name in names:
        if name not in table.column_names:
            raise IngestError(f"{path}: missing column {name!r} (has {', '.join(table.column_names)})")


def _timestamps(column: pa.ChunkedArray) -> np.ndarray | None:
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return column.to_numpy(zero_copy_only=False).astype("datetime64[s]")
    if pa.types.is_string(column.type):
        try:
            return pc.strptime(column, format="%Y-%m-%d %H:%M:%S", unit="s").to_numpy(
                zero_copy_only=False).astype("datetime64[s]")
        except pa.ArrowInvalid:
            try:
                return np.array(column.to_pylist(), dtype="datetime64[s]")
            except (ValueError, TypeError):
                return None
    return None  # integer steps or something else: order is kept, no calendar


def read_long(path: str | Path, item_column: str = "item_id", timestamp_column: str = "timestamp",
              target_column: str = "target") -> list[RawSeries]:
    """Series of a long-format file (one row per observation)."""
    table = _read_table(path, {item_column: pa.string()})
    _require_columns(path, table, [item_column, timestamp_column, target_column])
    target = _numeric_column(path, table, target_column)
    items = table.column(item_column)
    if items.null_count:
        row = int(np.flatnonzero(pc.is_null(items).to_numpy(zero_copy_only=False))[0])
        raise IngestError(f"{path}: column {item_column!r}, line {row + 2}: empty item id")
    codes, names = (lambda enc: (enc.indices.to_numpy(zero_copy_only=False), enc.dictionary.to_pylist()))(
        pc.dictionary_encode(items).combine_chunks())
    stamps = _timestamps(table.column(timestamp_column))
    if stamps is not None:
        order = np.lexsort((stamps.astype(np.int64), codes))
    else:
        order = np.argsort(codes, kind="stable")
    codes, target = codes[order], target[order]
    stamps = stamps[order] if stamps is not None else None
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(codes)]])
    out = []
    for lo, hi in zip(starts, ends):
        item_stamps = stamps[lo:hi] if stamps is not None else None
        out.append(RawSeries(item_id=str(names[codes[lo]]), values=target[lo:hi],
                             start=item_stamps[0] if item_stamps is not None else None,
                             freq=infer_freq(item_stamps)))
    return out


def read_wide(path: str | Path, timestamp_column: str | None = "timestamp") -> list[RawSeries]:
    """Series of a wide file: a timestamp column (optional) and one numeric column per series."""
    table = _read_table(path)
    stamps = None
    if timestamp_column:
        _require_columns(path, table, [timestamp_column])
        stamps = _timestamps(table.column(timestamp_column))
    out = []
    for name in table.column_names:
        if name == timestamp_column:
            continue
        values = _numeric_column(path, table, name)
        out.append(RawSeries(item_id=str(name), values=values,
                             start=stamps[0] if stamps is not None and len(stamps) else None,
                             freq=infer_freq(stamps)))
    if not out:
        raise IngestError(f"{path}: no series columns besides {timestamp_column!r}")
    return out


def hashes_of_files(paths: list[str | Path], layout: str = "long") -> set[str]:
    """Value hashes of every series in evaluation files, for the exclusion list."""
    hashes: set[str] = set()
    for path in paths:
        series = read_long(path) if layout == "long" else read_wide(path)
        hashes.update(series_hash(s.values) for s in series)
    return hashes
