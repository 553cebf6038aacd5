"""The corpus format: Parquet shards of one series per row, plus a JSON manifest.

A corpus is a directory::

    manifest.json            format, version, totals, per-shard rows/points/bytes/sha256,
                             per-domain counts and the build summary
    shard-00000.parquet      zstd-compressed, one row per series, columns in SCHEMA order
    shard-00001.parquet      ...

Columns: ``item_id`` (string), ``values`` (list<float32>, finite, no nulls), ``start``
(timestamp[s], nullable: synthetic and index-only series have none), ``freq`` (string, '' when
unknown), ``domain`` and ``source`` (strings; the mixture weights of the sampler key on them),
``held_out`` (bool: the series belongs to the validation split and is never trained on; the
builder chooses it by content hash; shards written before the column existed read as all
False).

Shards are closed once the file reaches ``target_shard_bytes`` (50 MB by default, as
TimeBench stores them), checked after every row group, so a shard overshoots the target by at
most one row group. The manifest carries a sha256 of each shard so ``validate_corpus`` can tell
a truncated or swapped file from a good one without trusting Parquet's own footer.

Every read error is an ``InputError`` (``CorpusError``) naming the file, and the column or row
where there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from timers1.data import storage
from timers1.errors import InputError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "timers1-corpus"
FORMAT_VERSION = 1
DEFAULT_TARGET_SHARD_BYTES = 50 * 1024 * 1024

SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("values", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=False),
    pa.field("start", pa.timestamp("s"), nullable=True),
    pa.field("freq", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("held_out", pa.bool_(), nullable=False),
])
HELD_OUT_COLUMN = "held_out"
# Columns a shard may lack (it predates them); readers then use their default.
OPTIONAL_COLUMNS = (HELD_OUT_COLUMN,)
COLUMNS = [f.name for f in SCHEMA if f.name not in OPTIONAL_COLUMNS]

# Source names of generated series: "synthetic.<family>" (the builder's); every other source is
# real data (a package's dataset, or a file). Validation reports the two kinds apart.
SYNTHETIC_SOURCE_PREFIX = "synthetic."


def is_synthetic_source(name: str) -> bool:
    return name.startswith(SYNTHETIC_SOURCE_PREFIX)


class CorpusError(InputError):
    """A corpus directory, manifest or shard is missing, corrupt or not in the corpus format."""


@dataclass
class SeriesRecord:
    """One series on its way into a corpus."""

    item_id: str
    values: np.ndarray
    """float32, finite; preprocessing has already imputed or dropped missing values."""
    domain: str
    source: str
    freq: str = ""
    start: np.datetime64 | None = None
    held_out: bool = False
    """In the validation split: never trained on."""


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    fs, inner = storage.resolve(path)
    with fs.open_input_stream(inner) as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class CorpusWriter:
    """Streams SeriesRecords into size-bounded Parquet shards and writes the manifest on close.

    Rows are buffered up to ``row_group_bytes`` of raw float32 values, then written as one row
    group; the shard's on-disk size is checked after each row group. Use as a context manager
    or call ``close(summary)`` explicitly; an exception inside the ``with`` block leaves no
    manifest behind, so a half-written corpus never validates.
    """

    def __init__(self, out_dir: str | Path, target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
                 row_group_bytes: int | None = None, overwrite: bool = False):
        if target_shard_bytes < 1:
            raise InputError(f"target_shard_bytes={target_shard_bytes!r}: must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob("shard-*.parquet")) + list(self.out_dir.glob(MANIFEST_NAME))
        if existing and not overwrite:
            raise CorpusError(f"{self.out_dir}: already holds a corpus ({existing[0].name}); "
                              f"pass overwrite=True (--overwrite) to replace it")
        for path in existing:
            path.unlink()
        self.target_shard_bytes = int(target_shard_bytes)
        # Several row groups per shard keep readers' memory bounded; tiny targets (tests) get
        # tiny row groups so that they still produce several shards.
        self.row_group_bytes = int(row_group_bytes or max(1, min(8 << 20, self.target_shard_bytes // 4)))
        self._shards: list[dict] = []
        self._domains: dict[str, dict[str, int]] = {}
        self._buffer: list[SeriesRecord] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._shard_rows = 0
        self._shard_points = 0
        self._closed = False

    # -- writing --------------------------------------------------------------------------
    def add(self, record: SeriesRecord) -> None:
        values = np.asarray(record.values, dtype=np.float32)
        if values.ndim != 1 or values.size == 0:
            raise InputError(f"series {record.item_id!r}: values must be a non-empty 1-D array")
        if not np.isfinite(values).all():
            raise InputError(f"series {record.item_id!r}: values must be finite (impute or drop first)")
        record.values = values
        self._buffer.append(record)
        self._buffer_bytes += values.nbytes
        stats = self._domains.setdefault(record.domain, {"rows": 0, "points": 0})
        stats["rows"] += 1
        stats["points"] += int(values.size)
        if self._buffer_bytes >= self.row_group_bytes:
            self._flush_row_group()

    def extend(self, records: Iterable[SeriesRecord]) -> None:
        for record in records:
            self.add(record)

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        batch = self._buffer
        self._buffer, self._buffer_bytes = [], 0
        lengths = np.fromiter((r.values.size for r in batch), dtype=np.int64, count=len(batch))
        offsets = np.zeros(len(batch) + 1, dtype=np.int32 if lengths.sum() < 2**31 else np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate([r.values for r in batch])
        list_type = SCHEMA.field("values").type
        values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()), type=list_type)
        starts = pa.array([None if r.start is None else np.datetime64(r.start, "s") for r in batch],
                          type=pa.timestamp("s"))
        table = pa.Table.from_arrays([
            pa.array([str(r.item_id) for r in batch], type=pa.string()),
            values,
            starts,
            pa.array([r.freq or "" for r in batch], type=pa.string()),
            pa.array([r.domain for r in batch], type=pa.string()),
            pa.array([r.source for r in batch], type=pa.string()),
            pa.array([bool(r.held_out) for r in batch], type=pa.bool_()),
        ], schema=SCHEMA)
        if self._writer is None:
            path = self.out_dir / f"shard-{len(self._shards):05d}.parquet"
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pq.ParquetWriter(self._sink, SCHEMA, compression="zstd")
            self._shards.append({"file": path.name})
        self._writer.write_table(table)
        self._shard_rows += len(batch)
        self._shard_points += int(lengths.sum())
        if self._sink.tell() >= self.target_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        entry = self._shards[-1]
        path = self.out_dir / entry["file"]
        entry.update(rows=self._shard_rows, points=self._shard_points, bytes=path.stat().st_size,
                     sha256=file_sha256(path))
        self._writer, self._sink = None, None
        self._shard_rows = self._shard_points = 0

    def close(self, summary: dict | None = None) -> dict:
        """Flush, close the last shard and write manifest.json; returns the manifest."""
        if self._closed:
            raise RuntimeError("CorpusWriter.close() called twice")
        self._flush_row_group()
        self._close_shard()
        self._closed = True
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_rows": sum(s["rows"] for s in self._shards),
            "num_points": sum(s["points"] for s in self._shards),
            "target_shard_bytes": self.target_shard_bytes,
            "shards": self._shards,
            "domains": dict(sorted(self._domains.items())),
            "summary": summary or {},
        }
        write_manifest(self.out_dir, manifest)
        return manifest

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None
        self._closed = True

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_corpus(records: Iterable[SeriesRecord], out_dir: str | Path,
                 target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES, overwrite: bool = False,
                 summary: dict | None = None) -> dict:
    """Write records as a corpus; returns the manifest."""
    with CorpusWriter(out_dir, target_shard_bytes, overwrite=overwrite) as writer:
        writer.extend(records)
        return writer.close(summary)


# ---------------------------------------------------------------------------------------------
# Reading

def read_manifest(corpus_dir: str | Path) -> dict:
    """The manifest of a corpus directory (a local path or a pyarrow.fs URI)."""
    path = storage.join(corpus_dir, MANIFEST_NAME)
    if not storage.is_dir(corpus_dir):
        raise CorpusError(f"{corpus_dir}: corpus directory does not exist")
    if storage.file_size(path) is None:
        raise CorpusError(f"{path}: missing; {corpus_dir} is not a built corpus (run `timers1 data build`)")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorpusError(f"{path}: field 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise CorpusError(f"{path}: field 'version' is {manifest.get('version')!r}, expected {FORMAT_VERSION}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "file" in s for s in shards):
        raise CorpusError(f"{path}: field 'shards' must be a list of {{file, rows, points, bytes, sha256}}")
    return manifest


def write_manifest(corpus_dir: str | Path, manifest: dict) -> None:
    """Atomically replace a local corpus directory's manifest (a reader never sees half of one)."""
    tmp = Path(corpus_dir) / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    os.replace(tmp, Path(corpus_dir) / MANIFEST_NAME)


def corpus_fingerprint(manifest: dict) -> str:
    """A short id of the corpus content (from the shard hashes); loader state records it so a
    resume on another corpus is refused, and the compiled form records the one it was made from."""
    digest = hashlib.sha256()
    for shard in manifest.get("shards", []):
        digest.update(str(shard.get("sha256", shard.get("file"))).encode())
    return digest.hexdigest()[:16]


def _check_schema(path: Path, schema: pa.Schema, columns: list[str]) -> None:
    for name in columns:
        if name in OPTIONAL_COLUMNS and name not in schema.names:
            continue
        if name not in schema.names:
            raise CorpusError(f"{path}: missing column {name!r} (has {', '.join(schema.names)})")
        want = SCHEMA.field(name).type
        got = schema.field(name).type
        if name == "values":
            ok = pa.types.is_list(got) or pa.types.is_large_list(got)
            ok = ok and (pa.types.is_floating(got.value_type) or pa.types.is_integer(got.value_type))
            if not ok:
                raise CorpusError(f"{path}: column 'values' has type {got}, expected {want} (numeric values)")
        elif name == "start":
            if not (pa.types.is_timestamp(got) or pa.types.is_null(got)):
                raise CorpusError(f"{path}: column 'start' has type {got}, expected {want}")
        elif name == HELD_OUT_COLUMN:
            if not pa.types.is_boolean(got):
                raise CorpusError(f"{path}: column {name!r} has type {got}, expected {want}")
        elif not (pa.types.is_string(got) or pa.types.is_large_string(got) or pa.types.is_dictionary(got)):
            raise CorpusError(f"{path}: column {name!r} has type {got}, expected {want}")


def _read_parquet(path: str | Path, columns: list[str], read):
    """``read(parquet_file)`` on the shard at ``path`` (path or URI) after checking its schema has
    ``columns``; any read failure becomes a CorpusError naming the file."""
    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_file(inner) as source:
            parquet = pq.ParquetFile(source)
            _check_schema(Path(str(path)), parquet.schema_arrow, columns)
            return read(parquet)
    except (CorpusError, MemoryError):  # out of memory is not a corrupt shard
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet shard (corrupt, truncated or another format): "
                          f"{str(exc).splitlines()[0]}") from None


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read one shard (path or URI), checking that it is Parquet with the corpus columns and types."""
    columns = list(columns or COLUMNS)
    if storage.file_size(path) is None:
        raise CorpusError(f"{path}: shard file does not exist")
    return _read_parquet(path, columns, lambda parquet: parquet.read(
        columns=[c for c in columns if c not in OPTIONAL_COLUMNS or c in parquet.schema_arrow.names]))


def held_out_of(table: pa.Table) -> np.ndarray:
    """The shard's ``held_out`` column as bool [rows] (all False for a shard without it)."""
    if HELD_OUT_COLUMN not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return table.column(HELD_OUT_COLUMN).to_numpy(zero_copy_only=False).astype(bool)


def read_checked_shard(corpus_dir: str | Path, entry: dict, columns: list[str],
                       verify_hash: bool = False) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(table, flat float32 values, int64 lengths) of one manifest entry, with its rows, points
    and values checked against the manifest (and its sha256 when ``verify_hash``)."""
    path = storage.join(corpus_dir, entry["file"])
    if verify_hash:
        check_file(path, entry, verify_hash=True)
    table = read_shard(path, list(dict.fromkeys(["item_id", "values", *columns])))
    column = table.column("values")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if (pc.sum(pc.is_null(column)).as_py() or 0) > 0:
        row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise CorpusError(f"{path}: row {row}: column 'values' is null")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    bad = ~np.isfinite(flat)
    if bad.any():
        row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(bad)[0], side="right"))
        raise CorpusError(f"{path}: row {row} (item_id {table.column('item_id')[row].as_py()!r}): "
                          f"column 'values' holds a NaN, null or infinite value")
    if "rows" in entry and entry["rows"] != table.num_rows:
        raise CorpusError(f"{path}: has {table.num_rows} rows, manifest says {entry['rows']}")
    if "points" in entry and entry["points"] != int(lengths.sum()):
        raise CorpusError(f"{path}: has {int(lengths.sum())} points, manifest says {entry['points']}")
    return table, flat, lengths.astype(np.int64)


@dataclass
class Corpus:
    """A whole corpus in memory, laid out for fast window sampling.

    ``values`` holds every series back to back; series i is
    ``values[offsets[i]:offsets[i + 1]]``. Domains and sources are integer codes into
    ``domain_names`` / ``source_names``.
    """

    values: np.ndarray
    offsets: np.ndarray
    item_ids: list[str]
    domain_codes: np.ndarray
    domain_names: list[str]
    source_codes: np.ndarray
    source_names: list[str]
    freqs: list[str]
    manifest: dict = field(default_factory=dict)
    directory: Path | None = None
    held_out: np.ndarray | None = None
    """bool [num_series]: the validation split (never trained on); None: nothing held out."""

    def __post_init__(self) -> None:
        if self.held_out is None:
            self.held_out = np.zeros(self.num_series, dtype=bool)

    @property
    def num_series(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_points(self) -> int:
        return int(self.offsets[-1])

    def series(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index]:self.offsets[index + 1]]

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        """Points [start, start + length) of series ``index`` (a view)."""
        begin = self.offsets[index] + start
        return self.values[begin:begin + length]

    @property
    def fingerprint(self) -> str:
        return corpus_fingerprint(self.manifest)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    encoded = pc.dictionary_encode(column).combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32), encoded.dictionary.to_pylist()


def read_corpus(corpus_dir: str | Path, verify_hashes: bool = False) -> Corpus:
    """Load a whole corpus into memory (tests, inspection, small corpora; training maps the
    compiled form instead, see compiled.py). ``verify_hashes`` also checks every shard's sha256."""
    manifest = read_manifest(corpus_dir)
    flats, lengths_all, item_ids, domains, sources, freqs, held_out = [], [], [], [], [], [], []
    for entry in manifest["shards"]:
        table, flat, lengths = read_checked_shard(corpus_dir, entry, ["freq", "domain", "source", HELD_OUT_COLUMN],
                                                  verify_hashes)
        held_out.append(held_out_of(table))
        flats.append(flat)
        lengths_all.append(lengths)
        item_ids.extend(table.column("item_id").to_pylist())
        freqs.extend(table.column("freq").to_pylist())
        domains.append(table.column("domain"))
        sources.append(table.column("source"))
    offsets = np.zeros(len(item_ids) + 1, dtype=np.int64)
    if lengths_all:
        np.cumsum(np.concatenate(lengths_all), out=offsets[1:])
    values = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    domain_codes, domain_names = _codes(pa.chunked_array(
        [c for col in domains for c in col.chunks], type=pa.string())) if domains else (np.zeros(0, np.int32), [])
    source_codes, source_names = _codes(pa.chunked_array(
        [c for col in sources for c in col.chunks], type=pa.string())) if sources else (np.zeros(0, np.int32), [])
    return Corpus(values=values, offsets=offsets, item_ids=item_ids, domain_codes=domain_codes,
                  domain_names=domain_names, source_codes=source_codes, source_names=source_names,
                  freqs=freqs, manifest=manifest,
                  held_out=np.concatenate(held_out) if held_out else np.zeros(0, bool), directory=Path(corpus_dir) if not storage.is_uri(corpus_dir) else None)


def check_file(path: str | Path, entry: dict, verify_hash: bool = False) -> None:
    """A file the manifest lists exists with the manifest's size (and sha256 when asked)."""
    size = storage.file_size(path)
    if size is None:
        raise CorpusError(f"{path}: listed in the manifest but does not exist")
    if "bytes" in entry and size != entry["bytes"]:
        raise CorpusError(f"{path}: is {size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
    if verify_hash and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        raise CorpusError(f"{path}: sha256 does not match the manifest (corrupt or replaced)")


def validate_corpus(corpus_dir: str | Path, deep: bool = False) -> dict:
    """Check a corpus; returns {rows, points, shards, compiled} or raises CorpusError naming the file.

    Always: the manifest parses; every shard exists with the manifest's size; every shard's
    Parquet footer has the corpus columns and the manifest's row count; totals add up; no shard
    lies in the directory that the manifest does not list; the compiled training form (when
    there is one) has the manifest's file sizes and an index that agrees with the manifest.
    ``deep`` also checks every file's sha256 and reads every value (finite, counts, and equal
    between the Parquet shards and the compiled form), one shard at a time.
    """
    from timers1.data.compiled import check_compiled  # the compiled form builds on this module

    manifest = read_manifest(corpus_dir)
    manifest_path = storage.join(corpus_dir, MANIFEST_NAME)
    listed = {entry["file"] for entry in manifest["shards"]}
    # A training form compiled into a directory of its own names where its shards are.
    parquet_dir = (manifest.get("compiled") or {}).get("parquet_dir", corpus_dir)
    if not storage.is_uri(corpus_dir):
        for stray in sorted(Path(corpus_dir).glob("shard-*.parquet")):
            if stray.name not in listed:
                raise CorpusError(f"{stray}: shard is not listed in {manifest_path}")
    rows = points = 0
    for entry in manifest["shards"]:
        path = storage.join(parquet_dir, entry["file"])
        if deep:
            _, _, lengths = read_checked_shard(parquet_dir, entry, [], verify_hash=True)
            shard_rows, shard_points = len(lengths), int(lengths.sum())
        else:
            check_file(path, entry)
            shard_rows = _read_parquet(path, COLUMNS, lambda parquet: parquet.metadata.num_rows)
            if "rows" in entry and entry["rows"] != shard_rows:
                raise CorpusError(f"{path}: has {shard_rows} rows, manifest says {entry['rows']}")
            shard_points = int(entry.get("points", 0))
        rows += shard_rows
        points += shard_points
    if manifest.get("num_rows", rows) != rows or manifest.get("num_points", points) != points:
        raise CorpusError(f"{manifest_path}: totals (num_rows={manifest.get('num_rows')}, "
                          f"num_points={manifest.get('num_points')}) do not match the shards "
                          f"({rows} rows, {points} points)")
    compiled = check_compiled(corpus_dir, manifest, deep=deep) if "compiled" in manifest else False
    return {"rows": rows, "points": points, "shards": len(manifest["shards"]), "compiled": bool(compiled)}


def length_histogram(lengths: np.ndarray) -> list[tuple[str, int]]:
    """Counts of series lengths in power-of-4 bins: [1,64), [64,256), ..., [65536, inf)."""
    edges = [1, 64, 256, 1024, 4096, 16384, 65536, math.inf]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        label = f"{lo}-{hi - 1}" if hi != math.inf else f">={lo}"
        out.append((label, int(((lengths >= lo) & (lengths < hi)).sum())))
    return out
