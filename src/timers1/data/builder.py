"""Building a corpus: sources -> exclusion -> cleaning -> Parquet shards + manifest.

A build config (YAML; see configs/data_default.yaml) lists sources:

    output_dir: corpora/example
    target_shard_mb: 50
    seed: 0
    validation_fraction: 0.02                               # held out by content hash
    real_validation_fraction: 0.1                           # of real sources (default: the above)
    exclude: {names: [], hashes: [], hash_files: []}
    preprocess: {outliers: ksigma, min_length_points: 32}   # defaults for every source
    sources:
      - {type: builtin}                                     # offline real series (builtin.py)
      - {type: synthetic, num_series: 2000, min_length_points: 256, max_length_points: 8192,
         families: {kernelsynth: 1, hourly: 2}}
      - {type: long, path: sales.csv.gz, name: sales, domain: retail}
      - {type: wide, path: sensors.parquet, timestamp_column: time, domain: iot,
         preprocess: {outliers: iqr}}

``build_corpus`` returns the summary (also stored in the manifest): per source the series read,
kept, held out and dropped by reason, totals, and ``real_sources`` (every real source by package
and dataset, so an evaluation elsewhere can exclude them).

The validation split: a series is held out (kept in the corpus, marked ``held_out``, never
trained on; the trainer scores it) when its content hash, the one deduplication uses, falls in
the lowest ``validation_fraction`` of the hash range (``real_validation_fraction`` for series of
real sources: they are few and the ones a held-out score should speak for, so the default corpus
holds out a larger share of them). The choice depends on the values alone: not on the order of
sources, the number of workers or the rest of the corpus.

``build_default_corpus`` is the no-download corpus the README trains on;
``ensure_default_corpus`` builds it once into a cache directory.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from timers1.data import storage, synthetic
from timers1.data.builtin import builtin_real_series
from timers1.data.compiled import compile_corpus
from timers1.data.corpus import (DEFAULT_TARGET_SHARD_BYTES, SYNTHETIC_SOURCE_PREFIX, CorpusError, CorpusWriter,
                                 SeriesRecord, read_manifest)
from timers1.data.ingest import (EVAL_DATASET_NAMES, RawSeries, excluded_name, hashes_of_files,
                                 normalize_name, read_long, read_wide, series_hash)
from timers1.data.preprocess import PreprocessConfig, clean_series
from timers1.config import read_yaml
from timers1.errors import InputError

SOURCE_TYPES = ("builtin", "synthetic", "long", "wide")

# Share of the default corpus's synthetic series per family. Calendar-seasonal families get the
# most: hourly data with daily and weekly cycles and short monthly calendars are what
# forecasters are most often asked about, and repeating a seasonal shape is the skill that
# beats seasonal naive.
DEFAULT_FAMILY_WEIGHTS = {"profile": 0.22, "growth": 0.12, "hourly": 0.12, "seasonal": 0.1,
                          "kernelsynth": 0.07, "canonical": 0.08, "trend": 0.07, "intermittent": 0.08,
                          "random_walk": 0.07, "arma": 0.07}
# Series lengths per family (log-uniform); hourly series span at least six weeks; KernelSynth
# stays near its Gaussian-process grid (synthetic.KERNELSYNTH_MAX_GRID), as Chronos' does.
# Only families whose short series look like real short series (yearly-to-weekly growth,
# monthly calendars, sparse demand) go below 256 points: a short piece of a stationary or
# high-frequency process teaches that short series revert to their mean, which real short
# series mostly do not.
DEFAULT_LENGTHS = {"hourly": (1024, 8192), "kernelsynth": (256, 1024), "growth": (16, 1024),
                   "profile": (32, 4096), "intermittent": (32, 4096), "trend": (64, 8192)}
SHORTEST_OTHER_POINTS = 256
# Many series rather than long ones: a small model trained for an hour sees each of 2,400 (v1)
# series dozens of times and starts to memorise them; 10,000 keep it under ~10 epochs.
DEFAULT_NUM_SYNTHETIC_SERIES = 10000
DEFAULT_MIN_LENGTH_POINTS = 16
# v4: v3's generators run on one BLAS thread (the same bits on every machine; v3's KernelSynth
# series depended on the thread count) and the cache holds the compiled training form.
# v5: DEFAULT_VALIDATION_FRACTION of the series held out for validation (a smaller training set).
# v6: real series from pydataset (Rdatasets) and vega_datasets; DEFAULT_REAL_VALIDATION_FRACTION
# of the real series held out (v5 held out 2 of 245, too few to score real data on).
DEFAULT_CORPUS_VERSION = "v6"
DEFAULT_VALIDATION_FRACTION = 0.02
DEFAULT_REAL_VALIDATION_FRACTION = 0.1


@dataclass
class SourceSpec:
    """One entry of ``sources`` in a build config."""

    type: str
    path: str = ""
    name: str = ""
    """Dataset name; checked against the evaluation exclusion list (defaults to the file name)."""
    domain: str = ""
    freq: str = ""
    """Overrides the frequency inferred from timestamps."""
    item_column: str = "item_id"
    timestamp_column: str = "timestamp"
    target_column: str = "target"
    num_series: int = 0
    min_length_points: int = 256
    """Bounds on generated lengths; each family also keeps to its own range (DEFAULT_LENGTHS)."""
    max_length_points: int = 8192
    families: dict[str, float] = field(default_factory=dict)
    preprocess: PreprocessConfig | None = None


@dataclass
class BuildConfig:
    output_dir: str = ""
    target_shard_mb: float = DEFAULT_TARGET_SHARD_BYTES / 2**20
    seed: int = 0
    exclude_names: list[str] = field(default_factory=list)
    """Added to EVAL_DATASET_NAMES, which always apply."""
    exclude_hashes: list[str] = field(default_factory=list)
    exclude_hash_files: list[str] = field(default_factory=list)
    """Long-format files whose series are excluded by value hash wherever they turn up."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sources: list[SourceSpec] = field(default_factory=list)
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    """Share of series held out for validation, chosen by content hash (``is_held_out``)."""
    real_validation_fraction: float | None = None
    """The same share for series of real (non-synthetic) sources; None: ``validation_fraction``."""

    def held_out_fraction(self, real: bool) -> float:
        return self.real_validation_fraction if real and self.real_validation_fraction is not None \
            else self.validation_fraction


def _fill(cls, data: Any, where: str, skip: tuple[str, ...] = ()):
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for name, value in data.items():
        default = known[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise InputError(f"{where}.{name}={value!r}: expected true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}.{name}={value!r}: expected a number")
        if isinstance(default, str) and not isinstance(value, str):
            raise InputError(f"{where}.{name}={value!r}: expected a string")
        out[name] = value
    return out


def _preprocess(data: Any, base: PreprocessConfig, where: str) -> PreprocessConfig:
    values = dict(vars(base))
    values.update(_fill(PreprocessConfig, data or {}, where))
    return PreprocessConfig(**values).validate(where)


def parse_build_config(data: dict, where: str = "build config") -> BuildConfig:
    if not isinstance(data, dict):
        raise InputError(f"{where}: top level must be a mapping")
    data = dict(data)
    exclude = data.pop("exclude", {}) or {}
    sources = data.pop("sources", None)
    preprocess = data.pop("preprocess", {})
    cfg = BuildConfig(**_fill(BuildConfig, data, where,
                              skip=("exclude_names", "exclude_hashes", "exclude_hash_files", "preprocess", "sources")))
    if not isinstance(exclude, dict) or set(exclude) - {"names", "hashes", "hash_files"}:
        raise InputError(f"{where}.exclude: must be a mapping with names, hashes and/or hash_files")
    cfg.exclude_names = [str(x) for x in exclude.get("names", []) or []]
    cfg.exclude_hashes = [str(x) for x in exclude.get("hashes", []) or []]
    cfg.exclude_hash_files = [str(x) for x in exclude.get("hash_files", []) or []]
    cfg.preprocess = _preprocess(preprocess, PreprocessConfig(), f"{where}.preprocess")
    if not isinstance(sources, list) or not sources:
        raise InputError(f"{where}.sources: must be a non-empty list")
    for i, raw in enumerate(sources):
        sw = f"{where}.sources[{i}]"
        raw = dict(raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or raw.get("type") not in SOURCE_TYPES:
            raise InputError(f"{sw}.type={raw.get('type') if isinstance(raw, dict) else raw!r}: "
                             f"must be one of {', '.join(SOURCE_TYPES)}")
        pre = raw.pop("preprocess", None)
        spec = SourceSpec(**_fill(SourceSpec, raw, sw, skip=("preprocess",)))
        # Synthetic series are clean by construction; outlier removal would erase the
        # impulses and intermittent demand that the generators put there on purpose.
        base = cfg.preprocess if spec.type in ("long", "wide", "builtin") else PreprocessConfig(
            min_length_points=cfg.preprocess.min_length_points)
        spec.preprocess = _preprocess(pre, base, f"{sw}.preprocess")
        if spec.type in ("long", "wide") and not spec.path:
            raise InputError(f"{sw}.path: required for a {spec.type} source")
        if spec.type == "synthetic":
            if spec.num_series < 1:
                raise InputError(f"{sw}.num_series={spec.num_series!r}: must be >= 1")
            if not 1 <= spec.min_length_points <= spec.max_length_points:
                raise InputError(f"{sw}.min_length_points/max_length_points="
                                 f"{spec.min_length_points}/{spec.max_length_points}: need 1 <= min <= max")
            for fam, w in spec.families.items():
                if fam not in synthetic.FAMILIES or not isinstance(w, (int, float)) or w < 0:
                    raise InputError(f"{sw}.families.{fam}={w!r}: family must be one of "
                                     f"{', '.join(synthetic.FAMILIES)} with a weight >= 0")
        cfg.sources.append(spec)
    if cfg.target_shard_mb <= 0:
        raise InputError(f"{where}.target_shard_mb={cfg.target_shard_mb!r}: must be > 0")
    for key in ("validation_fraction", "real_validation_fraction"):
        fraction = getattr(cfg, key)
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 <= fraction < 1):
            raise InputError(f"{where}.{key}={fraction!r}: must be in [0, 1)")
    return cfg


def is_held_out(digest: str, validation_fraction: float) -> bool:
    """Whether the series with content hash ``digest`` (``series_hash``) is in the validation
    split. Uses the hash's last 64 bits: deduplication keys on its first 64 (HashSet64), and
    the split should not correlate with where a series lands in that table."""
    return int(digest[16:32], 16) < validation_fraction * 2.0**64


def load_build_config(path: str | Path) -> BuildConfig:
    path = Path(path)
    data = read_yaml(path, "build config", InputError)
    cfg = parse_build_config(data, str(path))
    # Relative data paths are tried next to the config file first, so a config can travel
    # with its data; otherwise they are relative to the working directory.
    for spec in cfg.sources:
        beside = path.parent / spec.path
        if spec.path and not Path(spec.path).is_absolute() and beside.exists():
            spec.path = str(beside)
    return cfg


# ---------------------------------------------------------------------------------------------

@dataclass
class _SourceStats:
    name: str
    series_in: int = 0
    kept: int = 0
    points: int = 0
    outliers_removed: int = 0
    imputed: int = 0
    dropped: Counter = field(default_factory=Counter)
    held_out: int = 0
    held_out_points: int = 0
    real: bool = False
    path: str = ""

    def as_dict(self) -> dict:
        return {"source": self.name, "series_in": self.series_in, "kept": self.kept,
                "points": self.points, "held_out": self.held_out, "held_out_points": self.held_out_points,
                "outliers_removed": self.outliers_removed,
                "imputed_points": self.imputed, "dropped": dict(sorted(self.dropped.items()))}

    def real_source(self) -> dict:
        """This source as ``real_sources`` lists it: builtin sources are named package.dataset
        (statsmodels.co2, matplotlib.sample_data); a file source is the dataset its config
        names, package "file", with its path."""
        package, dataset = self.name.split(".", 1) if not self.path and "." in self.name else ("file", self.name)
        out = {"package": package, "dataset": dataset, "series": self.kept, "points": self.points,
               "held_out_series": self.held_out, "held_out_points": self.held_out_points}
        if self.path:
            out["path"] = self.path
        return out


def _family_counts(num_series: int, weights: dict[str, float]) -> dict[str, int]:
    names = [f for f in synthetic.FAMILIES if weights.get(f, 0) > 0]
    w = np.array([weights[f] for f in names], dtype=np.float64)
    raw = num_series * w / w.sum()
    counts = np.floor(raw).astype(int)
    # Largest remainders take the leftover series so the total is exact.
    for i in np.argsort(-(raw - counts))[: num_series - counts.sum()]:
        counts[i] += 1
    return dict(zip(names, counts.tolist()))


# ---------------------------------------------------------------------------------------------
# Work units: the builder splits every source into independent units (a file, a block of
# synthetic series, the builtin set) that worker processes read, hash and clean; the parent
# takes their results in unit order, so the corpus is the same whatever the number of workers.

SYNTHETIC_UNIT_SERIES = 64
INPUT_FILE_PATTERNS = ("*.csv", "*.csv.gz", "*.csv.bz2", "*.csv.zst", "*.tsv", "*.parquet", "*.pq")


@dataclass
class _Unit:
    spec: SourceSpec
    seed: int
    source: str = ""
    """Source name for read files (a directory source names all its files after itself)."""
    path: str = ""
    item_prefix: str = ""
    family: str = ""
    first: int = 0
    stop: int = 0


@dataclass
class _Processed:
    """One series after a worker has looked at it; the parent decides whether it is kept."""

    item_id: str
    domain: str
    source: str
    freq: str
    start: Any
    digest: str = ""
    excluded_name: bool = False
    values: np.ndarray | None = None
    drop_reason: str = ""
    outliers_removed: int = 0
    imputed: int = 0


def _synthetic_units(spec: SourceSpec, seed: int) -> Iterator[_Unit]:
    weights = spec.families or DEFAULT_FAMILY_WEIGHTS
    for family, count in _family_counts(spec.num_series, weights).items():
        for first in range(0, count, SYNTHETIC_UNIT_SERIES):
            yield _Unit(spec, seed, family=family, first=first, stop=min(count, first + SYNTHETIC_UNIT_SERIES))


def _synthetic_series(unit: _Unit) -> Iterator[tuple[RawSeries, str, str]]:
    spec, family = unit.spec, unit.family
    lo, hi = DEFAULT_LENGTHS.get(family, (SHORTEST_OTHER_POINTS, spec.max_length_points))
    lo, hi = max(lo, spec.min_length_points), min(hi, spec.max_length_points)
    lo = min(lo, hi)
    for index in range(unit.first, unit.stop):
        length_rng = synthetic.family_rng(unit.seed, family + ".length", index)
        n_points = int(round(np.exp(length_rng.uniform(np.log(lo), np.log(hi)))))
        values, freq = synthetic.generate(family, unit.seed, index, n_points)
        item = RawSeries(f"{family}_{index:06d}", values, None, spec.freq or freq)
        yield item, spec.domain or "synthetic", f"{SYNTHETIC_SOURCE_PREFIX}{family}"


def _unit_series(unit: _Unit) -> Iterator[tuple[RawSeries, str, str]]:
    spec = unit.spec
    if spec.type == "synthetic":
        yield from _synthetic_series(unit)
    elif spec.type == "builtin":
        found, problems = builtin_real_series()
        for problem in problems:
            print(f"timers1 data build: builtin source skipped: {problem}", file=sys.stderr)
        for series, domain, source in found:
            yield series, spec.domain or domain, source
    else:
        if spec.type == "long":
            found = read_long(unit.path, item_column=spec.item_column, timestamp_column=spec.timestamp_column,
                              target_column=spec.target_column)
        else:
            found = read_wide(unit.path, timestamp_column=spec.timestamp_column or None)
        for series in found:
            if spec.freq:
                series.freq = spec.freq
            series.item_id = unit.item_prefix + series.item_id
            yield series, spec.domain or "unknown", unit.source


def _process_unit(unit: _Unit, excluded_names: list[str]) -> list[_Processed]:
    """Read, hash and clean the series of one unit (runs in a worker process)."""
    # One BLAS thread: generators that factorise matrices (KernelSynth) then give the same bits
    # on every machine and in every process, and workers do not oversubscribe the cores.
    with threadpool_limits(limits=1):
        return _process_unit_series(unit, excluded_names)


def _process_unit_series(unit: _Unit, excluded_names: list[str]) -> list[_Processed]:
    out = []
    for raw, domain, source in _unit_series(unit):
        item = _Processed(raw.item_id, domain, source, raw.freq, raw.start)
        # Real series are checked per series too: a builtin or ingested dataset may carry an
        # evaluation set's name only in its item ids.
        if unit.spec.type != "synthetic" and excluded_name(raw.item_id, excluded_names):
            item.excluded_name = True
        else:
            item.digest = series_hash(raw.values)
            result = clean_series(raw.values, unit.spec.preprocess)
            item.values, item.drop_reason = result.values, result.drop_reason or ""
            item.outliers_removed, item.imputed = result.outliers_removed, result.imputed
        out.append(item)
    return out


def _source_units(spec: SourceSpec, seed: int, excluded_names: list[str],
                  skipped_sources: list[dict]) -> Iterator[_Unit]:
    if spec.type == "synthetic":
        yield from _synthetic_units(spec, seed)
        return
    if spec.type == "builtin":
        yield _Unit(spec, seed)
        return
    label = spec.name or Path(spec.path.rstrip("/")).name
    match = excluded_name(spec.name or spec.path, excluded_names) or excluded_name(spec.path, excluded_names)
    if match:
        skipped_sources.append({"source": label, "path": spec.path, "evaluation_set": match})
        return
    files = storage.expand(spec.path, INPUT_FILE_PATTERNS)
    several = len(files) > 1 or storage.is_dir(spec.path)
    for path in files:
        match = excluded_name(path, excluded_names) if several else None
        if match:  # an evaluation set's file inside a directory of training files
            skipped_sources.append({"source": label, "path": path, "evaluation_set": match})
            continue
        prefix = f"{_file_stem(path)}/" if several else ""
        yield _Unit(spec, seed, source=label, path=path, item_prefix=prefix)


def _file_stem(path: str) -> str:
    return normalize_name(path.rsplit("/", 1)[-1])


class HashSet64:
    """Set of 64-bit content hashes in one open-addressing numpy table: 16 bytes per series at
    most (a Python set of hex strings costs ~120), so deduplicating 100M series takes 1.6 GB,
    not 12. Keys are the first 64 bits of the series' sha256: a false duplicate needs ~4e9
    series before it becomes likely."""

    def __init__(self, capacity: int = 1 << 16):
        self._table = np.zeros(1 << max(4, (capacity - 1).bit_length()), dtype=np.uint64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _slot(self, key: int) -> int:
        """Slot holding ``key``, or the empty slot where it would go (linear probing)."""
        table = self._table
        mask = table.size - 1
        slot = key & mask
        while True:
            held = int(table[slot])
            if held == 0 or held == key:
                return slot
            slot = (slot + 1) & mask

    @staticmethod
    def _key(digest: str) -> int:
        return int(digest[:16], 16) or 1  # 0 marks an empty slot

    def __contains__(self, digest: str) -> bool:
        return int(self._table[self._slot(self._key(digest))]) != 0

    def add(self, digest: str) -> None:
        key = self._key(digest)
        slot = self._slot(key)
        if int(self._table[slot]) == key:
            return
        self._table[slot] = key
        self._size += 1
        if 2 * self._size > self._table.size:
            self._grow()

    def _grow(self) -> None:
        keys = self._table[self._table != 0]
        self._table = np.zeros(self._table.size * 2, dtype=np.uint64)
        for key in keys.tolist():
            self._table[self._slot(key)] = key


def _results_in_order(units: Iterator[_Unit], excluded_names: list[str],
                      workers: int) -> Iterator[tuple[_Unit, list[_Processed]]]:
    """(unit, its processed series) in the order given; with workers, at most 2 units per worker
    are in flight, so memory stays bounded by a few units however large the input."""
    if workers <= 1:
        for unit in units:
            yield unit, _process_unit(unit, excluded_names)
        return
    # spawn, not fork: the trainer calls the builder after torch has started its thread pools.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for unit in units:
            pending.append((unit, pool.submit(_process_unit, unit, excluded_names)))
            if len(pending) >= 2 * workers:
                unit, future = pending.popleft()
                yield unit, future.result()
        while pending:
            unit, future = pending.popleft()
            yield unit, future.result()


def default_workers() -> int:
    """One core stays with the parent, which writes the shards (zstd Parquet, ~20M points/s):
    on 2 cores a worker pool was slower than building in-process (9.3M vs 13.0M points/s on
    wide files), so there the build runs in-process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


def build_corpus(cfg: BuildConfig, out_dir: str | Path | None = None, progress: bool | None = None,
                 overwrite: bool = False, workers: int | None = None, compile: bool = True) -> dict:
    """Build the corpus ``cfg`` describes into ``out_dir`` (or cfg.output_dir); returns the summary.

    Streams: sources are split into units (files, blocks of synthetic series) that ``workers``
    processes read and clean while the parent deduplicates by value hash (``HashSet64``) and
    writes shards as they fill (``workers`` 1: all in this process; default: CPUs - 1, at
    most 8); memory is a few units plus 16 bytes per series kept. The output does not depend
    on ``workers``. ``compile`` also writes the memory-mapped training
    form (compiled.py), which is what training reads.
    """
    out_dir = Path(out_dir or cfg.output_dir or "")
    if not str(out_dir):
        raise InputError("build config: output_dir is empty and no output directory was given")
    started = time.perf_counter()
    workers = default_workers() if workers is None else max(1, int(workers))
    excluded_names = list(EVAL_DATASET_NAMES) + list(cfg.exclude_names)
    excluded_hashes = set(cfg.exclude_hashes) | hashes_of_files(cfg.exclude_hash_files)
    if progress is None:
        progress = sys.stderr.isatty()
    total_hint = sum(s.num_series for s in cfg.sources if s.type == "synthetic") or None
    bar = tqdm(total=total_hint, unit="series", desc="build", disable=not progress)
    stats: list[_SourceStats] = []
    by_source: dict[tuple[int, str], _SourceStats] = {}  # per (config entry, source name)
    skipped_sources: list[dict] = []
    seen_hashes = HashSet64()
    units = (unit for spec in cfg.sources
             for unit in _source_units(spec, cfg.seed, excluded_names, skipped_sources))
    with CorpusWriter(out_dir, int(cfg.target_shard_mb * 2**20), overwrite=overwrite) as writer:
        for unit, processed in _results_in_order(units, excluded_names, workers):
            for item in processed:
                st = by_source.get((id(unit.spec), item.source))
                if st is None:
                    st = by_source[(id(unit.spec), item.source)] = _SourceStats(
                        item.source, real=unit.spec.type != "synthetic", path=unit.spec.path)
                    stats.append(st)
                st.series_in += 1
                bar.update(1)
                if item.excluded_name:
                    st.dropped["excluded_name"] += 1
                    continue
                if item.digest in excluded_hashes:
                    st.dropped["excluded_hash"] += 1
                    continue
                if item.digest in seen_hashes:
                    st.dropped["duplicate"] += 1
                    continue
                st.outliers_removed += item.outliers_removed
                st.imputed += item.imputed
                if item.values is None:
                    # Not remembered: another source's preprocessing may keep the same values.
                    st.dropped[item.drop_reason] += 1
                    continue
                seen_hashes.add(item.digest)
                held_out = is_held_out(item.digest, cfg.held_out_fraction(st.real))
                writer.add(SeriesRecord(item_id=f"{item.source}/{item.item_id}", values=item.values,
                                        domain=item.domain, source=item.source, freq=item.freq, start=item.start,
                                        held_out=held_out))
                st.kept += 1
                st.points += int(item.values.size)
                if held_out:
                    st.held_out += 1
                    st.held_out_points += int(item.values.size)
        bar.close()
        dropped = Counter()
        for st in stats:
            dropped.update(st.dropped)
        summary = {
            "series_in": sum(st.series_in for st in stats),
            "series_kept": sum(st.kept for st in stats),
            "points_kept": sum(st.points for st in stats),
            "validation_fraction": cfg.validation_fraction,
            "real_validation_fraction": cfg.held_out_fraction(real=True),
            "held_out_series": sum(st.held_out for st in stats),
            "held_out_points": sum(st.held_out_points for st in stats),
            "dropped": dict(sorted(dropped.items())),
            "outliers_removed": sum(st.outliers_removed for st in stats),
            "imputed_points": sum(st.imputed for st in stats),
            "excluded_sources": skipped_sources,
            "sources": [st.as_dict() for st in stats],
            "real_sources": [st.real_source() for st in stats if st.real and st.kept],
            "seed": cfg.seed,
            "seconds": round(time.perf_counter() - started, 2),
            "workers": workers,
        }
        summary["points_per_s"] = round(summary["points_kept"] / max(summary["seconds"], 1e-9))
        manifest = writer.close(summary)
    summary["shards"] = len(manifest["shards"])
    summary["output_dir"] = str(out_dir)
    if compile:
        summary["compile_seconds"] = compile_corpus(out_dir, progress=progress)["seconds"]
    return summary


def default_build_config(num_synthetic_series: int = DEFAULT_NUM_SYNTHETIC_SERIES, seed: int = 0,
                         include_real: bool = True, min_length_points: int = DEFAULT_MIN_LENGTH_POINTS,
                         max_length_points: int = 8192,
                         validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                         real_validation_fraction: float = DEFAULT_REAL_VALIDATION_FRACTION) -> BuildConfig:
    """The default corpus as a BuildConfig (so `timers1 data build` and the API agree)."""
    data: dict[str, Any] = {
        "seed": seed,
        "validation_fraction": validation_fraction,
        "real_validation_fraction": real_validation_fraction,
        # Real series here are short and few; 4-sigma on a 64-point window removes only the
        # glitches without touching their seasonality.
        "preprocess": {"outliers": "ksigma", "k_sigma": 4.0, "min_length_points": DEFAULT_MIN_LENGTH_POINTS},
        "sources": [{"type": "synthetic", "num_series": num_synthetic_series,
                     "min_length_points": min_length_points, "max_length_points": max_length_points}],
    }
    if include_real:
        data["sources"].insert(0, {"type": "builtin"})
    return parse_build_config(data, "default corpus")


def build_default_corpus(out_dir: str | Path, num_synthetic_series: int = DEFAULT_NUM_SYNTHETIC_SERIES,
                         seed: int = 0, include_real: bool = True,
                         target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
                         progress: bool | None = None, overwrite: bool = False,
                         workers: int | None = None,
                         validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                         real_validation_fraction: float = DEFAULT_REAL_VALIDATION_FRACTION) -> dict:
    """Build the no-download default corpus and its training form; returns the build summary.

    About 16M points at the default size: real series shipped in statsmodels, matplotlib,
    pydataset and vega_datasets plus ``num_synthetic_series`` synthetic ones of 16-8,192 points (per-family ranges in
    DEFAULT_LENGTHS) over all families (seasonal profiles, short growth series, hourly
    daily/weekly cycles, calendar seasonality, trends, intermittent demand, random walks, ARMA,
    canonical mixes, KernelSynth). About 15 s on two cores.
    """
    cfg = default_build_config(num_synthetic_series, seed, include_real, validation_fraction=validation_fraction,
                               real_validation_fraction=real_validation_fraction)
    cfg.target_shard_mb = target_shard_bytes / 2**20
    return build_corpus(cfg, out_dir, progress=progress, overwrite=overwrite, workers=workers)


def ensure_default_corpus(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Path of the default corpus, building (and compiling) it first if the cache lacks it.

    Cache: ``cache_dir``, else $TIMERS1_CACHE, else ~/.cache/timers1; the corpus lives in
    ``default_corpus_<version>_seed<seed>`` under it. Every rank of a job may call this at
    once: a file lock lets the first build while the others wait and then find it built.
    """
    root = Path(cache_dir or os.environ.get("TIMERS1_CACHE") or Path.home() / ".cache" / "timers1")
    out = root / f"default_corpus_{DEFAULT_CORPUS_VERSION}_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = read_manifest(out)
        except CorpusError:
            build_default_corpus(out, seed=seed, overwrite=True)
            return out
        if "compiled" not in manifest:  # cached by a version that trained from Parquet
            compile_corpus(out)
    return out


def format_summary(summary: dict) -> str:
    """Human-readable build summary (the CLI prints it; the manifest stores the dict)."""
    lines = [f"built {summary.get('output_dir', '')}: {summary['series_kept']} series, "
             f"{summary['points_kept']:,} points in {summary.get('shards', '?')} shard(s), "
             f"{summary['seconds']} s ({summary.get('points_per_s', 0):,} points/s with "
             f"{summary.get('workers', 1)} worker(s))"
             + (f"; training form compiled in {summary['compile_seconds']} s" if "compile_seconds" in summary else ""),
             f"  held out for validation: {summary.get('held_out_series', 0)} series, "
             f"{summary.get('held_out_points', 0):,} points (validation_fraction "
             f"{summary.get('validation_fraction', 0)}, of real sources "
             f"{summary.get('real_validation_fraction', summary.get('validation_fraction', 0))})",
             f"  read {summary['series_in']} series; dropped: "
             + (", ".join(f"{k}={v}" for k, v in summary["dropped"].items()) or "none"),
             f"  outlier points removed: {summary['outliers_removed']}, points imputed: {summary['imputed_points']}"]
    for skipped in summary["excluded_sources"]:
        lines.append(f"  excluded source {skipped['source']} (evaluation set {skipped['evaluation_set']})")
    for st in summary["sources"]:
        drops = ", ".join(f"{k}={v}" for k, v in st["dropped"].items())
        lines.append(f"  {st['source']:<32} in={st['series_in']:<6} kept={st['kept']:<6} "
                     f"held_out={st.get('held_out', 0):<5} points={st['points']:<10,}"
                     + (f" dropped: {drops}" if drops else ""))
    return "\n".join(lines)
