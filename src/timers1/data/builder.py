"""Building a corpus: sources -> exclusion -> cleaning -> Parquet shards + manifest.

A build config (YAML; see configs/data_default.yaml) lists sources:

    output_dir: corpora/example
    target_shard_mb: 50
    seed: 0
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
kept and dropped by reason, and totals. ``build_default_corpus`` is the no-download corpus the
README trains on; ``ensure_default_corpus`` builds it once into a cache directory.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from timers1.data import synthetic
from timers1.data.builtin import builtin_real_series
from timers1.data.corpus import DEFAULT_TARGET_SHARD_BYTES, CorpusWriter, SeriesRecord, read_manifest
from timers1.data.corpus import CorpusError
from timers1.data.ingest import (EVAL_DATASET_NAMES, RawSeries, excluded_name, hashes_of_files,
                                 read_long, read_wide, series_hash)
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
DEFAULT_CORPUS_VERSION = "v3"


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
    return cfg


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

    def as_dict(self) -> dict:
        return {"source": self.name, "series_in": self.series_in, "kept": self.kept,
                "points": self.points, "outliers_removed": self.outliers_removed,
                "imputed_points": self.imputed, "dropped": dict(sorted(self.dropped.items()))}


def _family_counts(num_series: int, weights: dict[str, float]) -> dict[str, int]:
    names = [f for f in synthetic.FAMILIES if weights.get(f, 0) > 0]
    w = np.array([weights[f] for f in names], dtype=np.float64)
    raw = num_series * w / w.sum()
    counts = np.floor(raw).astype(int)
    # Largest remainders take the leftover series so the total is exact.
    for i in np.argsort(-(raw - counts))[: num_series - counts.sum()]:
        counts[i] += 1
    return dict(zip(names, counts.tolist()))


def _synthetic_records(spec: SourceSpec, seed: int) -> Iterator[tuple[RawSeries, str, str]]:
    weights = spec.families or DEFAULT_FAMILY_WEIGHTS
    for family, count in _family_counts(spec.num_series, weights).items():
        lo, hi = DEFAULT_LENGTHS.get(family, (SHORTEST_OTHER_POINTS, spec.max_length_points))
        lo, hi = max(lo, spec.min_length_points), min(hi, spec.max_length_points)
        lo = min(lo, hi)
        for index in range(count):
            length_rng = synthetic.family_rng(seed, family + ".length", index)
            n_points = int(round(np.exp(length_rng.uniform(np.log(lo), np.log(hi)))))
            values, freq = synthetic.generate(family, seed, index, n_points)
            item = RawSeries(f"{family}_{index:06d}", values, None, spec.freq or freq)
            yield item, spec.domain or "synthetic", f"synthetic.{family}"


def _source_series(spec: SourceSpec, seed: int) -> Iterator[tuple[RawSeries, str, str]]:
    if spec.type == "synthetic":
        yield from _synthetic_records(spec, seed)
    elif spec.type == "builtin":
        found, problems = builtin_real_series()
        for problem in problems:
            print(f"timers1 data build: builtin source skipped: {problem}", file=sys.stderr)
        for series, domain, source in found:
            yield series, spec.domain or domain, source
    else:
        reader = read_long if spec.type == "long" else read_wide
        kwargs = ({"item_column": spec.item_column, "timestamp_column": spec.timestamp_column,
                   "target_column": spec.target_column} if spec.type == "long"
                  else {"timestamp_column": spec.timestamp_column or None})
        name = spec.name or Path(spec.path).name
        for series in reader(spec.path, **kwargs):
            if spec.freq:
                series.freq = spec.freq
            yield series, spec.domain or "unknown", name


def build_corpus(cfg: BuildConfig, out_dir: str | Path | None = None, progress: bool | None = None,
                 overwrite: bool = False) -> dict:
    """Build the corpus ``cfg`` describes into ``out_dir`` (or cfg.output_dir); returns the summary."""
    out_dir = Path(out_dir or cfg.output_dir or "")
    if not str(out_dir):
        raise InputError("build config: output_dir is empty and no output directory was given")
    started = time.perf_counter()
    excluded_names = list(EVAL_DATASET_NAMES) + list(cfg.exclude_names)
    excluded_hashes = set(cfg.exclude_hashes) | hashes_of_files(cfg.exclude_hash_files)
    if progress is None:
        progress = sys.stderr.isatty()
    total_hint = sum(s.num_series for s in cfg.sources if s.type == "synthetic") or None
    bar = tqdm(total=total_hint, unit="series", desc="build", disable=not progress)
    stats: list[_SourceStats] = []
    skipped_sources: list[dict] = []
    seen_hashes: set[str] = set()
    with CorpusWriter(out_dir, int(cfg.target_shard_mb * 2**20), overwrite=overwrite) as writer:
        for spec in cfg.sources:
            label = spec.name or (Path(spec.path).name if spec.path else spec.type)
            if spec.type in ("long", "wide"):
                match = excluded_name(spec.name or spec.path, excluded_names) or (
                    excluded_name(spec.path, excluded_names) if spec.path else None)
                if match:
                    skipped_sources.append({"source": label, "path": spec.path, "evaluation_set": match})
                    continue
            by_source: dict[str, _SourceStats] = {}
            for raw, domain, source in _source_series(spec, cfg.seed):
                st = by_source.get(source)
                if st is None:
                    st = by_source[source] = _SourceStats(source)
                    stats.append(st)
                st.series_in += 1
                bar.update(1)
                # Real series are checked per series too: a builtin or ingested dataset may
                # carry an evaluation set's name only in its item ids.
                if spec.type != "synthetic" and excluded_name(raw.item_id, excluded_names):
                    st.dropped["excluded_name"] += 1
                    continue
                digest = series_hash(raw.values)
                if digest in excluded_hashes:
                    st.dropped["excluded_hash"] += 1
                    continue
                if digest in seen_hashes:
                    st.dropped["duplicate"] += 1
                    continue
                result = clean_series(raw.values, spec.preprocess)
                st.outliers_removed += result.outliers_removed
                st.imputed += result.imputed
                if result.values is None:
                    st.dropped[result.drop_reason] += 1
                    continue
                seen_hashes.add(digest)
                writer.add(SeriesRecord(item_id=f"{source}/{raw.item_id}", values=result.values,
                                        domain=domain, source=source, freq=raw.freq, start=raw.start))
                st.kept += 1
                st.points += int(result.values.size)
        bar.close()
        dropped = Counter()
        for st in stats:
            dropped.update(st.dropped)
        summary = {
            "series_in": sum(st.series_in for st in stats),
            "series_kept": sum(st.kept for st in stats),
            "points_kept": sum(st.points for st in stats),
            "dropped": dict(sorted(dropped.items())),
            "outliers_removed": sum(st.outliers_removed for st in stats),
            "imputed_points": sum(st.imputed for st in stats),
            "excluded_sources": skipped_sources,
            "sources": [st.as_dict() for st in stats],
            "seed": cfg.seed,
            "seconds": round(time.perf_counter() - started, 2),
        }
        manifest = writer.close(summary)
    summary["shards"] = len(manifest["shards"])
    summary["output_dir"] = str(out_dir)
    return summary


def default_build_config(num_synthetic_series: int = DEFAULT_NUM_SYNTHETIC_SERIES, seed: int = 0,
                         include_real: bool = True, min_length_points: int = DEFAULT_MIN_LENGTH_POINTS,
                         max_length_points: int = 8192) -> BuildConfig:
    """The default corpus as a BuildConfig (so `timers1 data build` and the API agree)."""
    data: dict[str, Any] = {
        "seed": seed,
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
                         progress: bool | None = None, overwrite: bool = False) -> dict:
    """Build the no-download default corpus; returns the build summary.

    About 16M points at the default size: real series shipped in statsmodels and matplotlib
    plus ``num_synthetic_series`` synthetic ones of 16-8,192 points (per-family ranges in
    DEFAULT_LENGTHS) over all families (seasonal profiles, short growth series, hourly
    daily/weekly cycles, calendar seasonality, trends, intermittent demand, random walks, ARMA,
    canonical mixes, KernelSynth). About 15 s on two cores.
    """
    cfg = default_build_config(num_synthetic_series, seed, include_real)
    cfg.target_shard_mb = target_shard_bytes / 2**20
    return build_corpus(cfg, out_dir, progress=progress, overwrite=overwrite)


def ensure_default_corpus(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Path of the default corpus, building it first if the cache lacks a valid one.

    Cache: ``cache_dir``, else $TIMERS1_CACHE, else ~/.cache/timers1; the corpus lives in
    ``default_corpus_<version>_seed<seed>`` under it.
    """
    root = Path(cache_dir or os.environ.get("TIMERS1_CACHE") or Path.home() / ".cache" / "timers1")
    out = root / f"default_corpus_{DEFAULT_CORPUS_VERSION}_seed{seed}"
    try:
        read_manifest(out)
        return out
    except CorpusError:
        pass
    build_default_corpus(out, seed=seed, overwrite=True)
    return out


def format_summary(summary: dict) -> str:
    """Human-readable build summary (the CLI prints it; the manifest stores the dict)."""
    lines = [f"built {summary.get('output_dir', '')}: {summary['series_kept']} series, "
             f"{summary['points_kept']:,} points in {summary.get('shards', '?')} shard(s), "
             f"{summary['seconds']} s",
             f"  read {summary['series_in']} series; dropped: "
             + (", ".join(f"{k}={v}" for k, v in summary["dropped"].items()) or "none"),
             f"  outlier points removed: {summary['outliers_removed']}, points imputed: {summary['imputed_points']}"]
    for skipped in summary["excluded_sources"]:
        lines.append(f"  excluded source {skipped['source']} (evaluation set {skipped['evaluation_set']})")
    for st in summary["sources"]:
        drops = ", ".join(f"{k}={v}" for k, v in st["dropped"].items())
        lines.append(f"  {st['source']:<32} in={st['series_in']:<6} kept={st['kept']:<6} "
                     f"points={st['points']:<10,}" + (f" dropped: {drops}" if drops else ""))
    return "\n".join(lines)
