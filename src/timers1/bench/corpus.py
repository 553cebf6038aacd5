"""`timers1 bench corpus`: the training form at scale: build rate, start-up, private memory, loader rate.

For each size in ``--sizes-gib`` (or the corpus given with ``--corpus``):

1. Writes wide-layout Parquet input files of random-walk and seasonal series (numpy, fast) and
   builds a corpus from them with the real streaming builder (read, hash, dedup, clean, write
   shards, compile the memory-mapped form): ``build_points_per_s`` and per core.
2. In a fresh process, so nothing else is resident: the time from opening the compiled corpus
   to the first batch (``startup_s``), the window sampler's points/s on one core with
   augmentation (``points_per_s_per_core``), and ``private_rss_mib``: the process's anonymous
   memory (RSS minus file pages; the corpus pages are file pages shared through the page cache)
   while sampling.
3. Optionally (``--cold``), the same sampling right after evicting the corpus from the page cache
   (posix_fadvise DONTNEED), against a ``dd``-style sequential read of series.bin from cold:
   what a first epoch on a fresh node costs.

One JSON line per size, then a summary line with the ratios the issue sets targets for (private
RSS and start-up of the largest size over the smallest; loader rate against 20M points/s/core).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from timers1.bench.data import TARGET_POINTS_PER_S_PER_CORE

INPUT_FILE_POINTS = 8 << 20  # 32 MiB of float32 per input file
SERIES_POINTS = 1 << 17


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[0.25, 2.0],
                   help="corpus sizes to build and measure, in GiB of float32 values")
    p.add_argument("--corpus", default=None, help="measure this compiled corpus instead of building synthetic ones")
    p.add_argument("--work-dir", default=None, help="where corpora are built (default: a temporary directory, removed)")
    p.add_argument("--workers", type=int, default=None, help="builder processes (default: CPUs - 1, at most 8)")
    p.add_argument("--window-points", type=int, default=2880, help="points per window (flagship context: 2880)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per loader batch")
    p.add_argument("--seconds", type=float, default=3.0, help="time spent measuring the loader at each size")
    p.add_argument("--cold", action="store_true", help="also measure from a cold page cache against a sequential read")


def _write_inputs(directory: Path, points: int, seed: int) -> int:
    """Wide Parquet files of random walks with a daily cycle; returns the points written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    columns_per_file = INPUT_FILE_POINTS // SERIES_POINTS
    written, index = 0, 0
    cycle = np.sin(2 * np.pi * np.arange(SERIES_POINTS) / 24).astype(np.float32)
    while written < points:
        n_columns = max(1, min(columns_per_file, (points - written) // SERIES_POINTS))
        walks = np.cumsum(rng.standard_normal((n_columns, SERIES_POINTS), dtype=np.float32), axis=1)
        walks += rng.uniform(0, 5, (n_columns, 1)).astype(np.float32) * cycle
        table = pa.table({f"s{index}_{c}": walks[c] for c in range(n_columns)})
        pq.write_table(table, directory / f"input-{index:05d}.parquet", compression="zstd")
        written += n_columns * SERIES_POINTS
        index += 1
    return written


def _build(work: Path, gib: float, workers: int | None) -> tuple[Path, dict]:
    from timers1.data.builder import build_corpus, parse_build_config

    inputs, out = work / f"inputs_{gib:g}", work / f"corpus_{gib:g}"
    _write_inputs(inputs, int(gib * 2**30 / 4), seed=int(gib * 1000))
    cfg = parse_build_config({"preprocess": {"outliers": "none"}, "sources": [
        {"type": "wide", "path": str(inputs), "timestamp_column": "", "name": "bench_random_walks",
         "domain": "bench"}]})
    started = time.perf_counter()
    summary = build_corpus(cfg, out, progress=None, overwrite=True, workers=workers)
    summary["total_seconds"] = time.perf_counter() - started
    shutil.rmtree(inputs)
    return out, summary


_PROBE = """
import json, os, sys, time
import numpy as np
from timers1.data.compiled import _megatron_indexed_dataset, open_compiled, BIN_FILE
from timers1.data.loader import WindowSampler
from timers1.bench.data import _measure

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
corpus_dir, window, batch, seconds, cold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
_megatron_indexed_dataset()  # imports are not start-up of the corpus
def evict(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
out = {}
if cold:
    bin_path = os.path.join(corpus_dir, BIN_FILE)
    evict(bin_path)
    started, total = time.perf_counter(), 0
    with open(bin_path, "rb", buffering=0) as fh:
        while chunk := fh.read(8 << 20):
            total += len(chunk)
            if time.perf_counter() - started > seconds:
                break
    out["dd_points_per_s"] = total / 4 / (time.perf_counter() - started)
    evict(bin_path)
started = time.perf_counter()
corpus = open_compiled(corpus_dir)
sampler = WindowSampler(corpus, window, seed=0, flip_probability=0.5, resample_probability=0.2)
sampler.sample(0, batch)
out["startup_s"] = time.perf_counter() - started
out["points_per_s_per_core"] = _measure(sampler, batch, seconds, warm=not cold)
out["private_rss_mib"] = status("RssAnon") / 2**20
out["file_rss_mib"] = status("RssFile") / 2**20
out["num_series"], out["num_points"] = corpus.num_series, corpus.num_points
print(json.dumps(out))
"""


def _probe(corpus_dir: Path, args, cold: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one core, as labelled
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(corpus_dir), str(args.window_points),
                           str(args.batch_size), str(args.seconds), "1" if cold else "0"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"loader probe on {corpus_dir} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    tmp = None
    if args.corpus:
        targets = [(Path(args.corpus), None)]
    else:
        work = Path(args.work_dir) if args.work_dir else Path(tmp := tempfile.mkdtemp(prefix="timers1-bench-corpus-"))
        targets = [(work, gib) for gib in args.sizes_gib]
    rows = []
    try:
        for where, gib in targets:
            row: dict = {"bench": "corpus"}
            if gib is not None:
                corpus_dir, summary = _build(where, gib, args.workers)
                row.update(corpus_gib=gib, build_points_per_s=round(summary["points_kept"] / summary["total_seconds"]),
                           build_points_per_s_per_core=round(summary["points_kept"] / summary["total_seconds"]
                                                             / summary["workers"]),
                           build_workers=summary["workers"], build_seconds=round(summary["seconds"], 1),
                           compile_seconds=summary["compile_seconds"])
            else:
                corpus_dir = where
            warm = _probe(corpus_dir, args, cold=False)
            row.setdefault("corpus_gib", round(warm["num_points"] * 4 / 2**30, 3))
            row.update(num_series=warm["num_series"], private_rss_mib=round(warm["private_rss_mib"], 1),
                       file_rss_mib=round(warm["file_rss_mib"], 1), startup_s=round(warm["startup_s"], 3),
                       points_per_s_per_core=round(warm["points_per_s_per_core"]),
                       window_points=args.window_points, batch_size=args.batch_size)
            if args.cold:
                cold = _probe(corpus_dir, args, cold=True)
                row.update(cold_points_per_s=round(cold["points_per_s_per_core"]),
                           dd_points_per_s=round(cold["dd_points_per_s"]),
                           cold_to_dd_ratio=round(cold["points_per_s_per_core"] / cold["dd_points_per_s"], 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
            if gib is not None and not args.work_dir:
                shutil.rmtree(corpus_dir)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    small, large = min(rows, key=lambda r: r["corpus_gib"]), max(rows, key=lambda r: r["corpus_gib"])
    print(json.dumps({
        "bench": "corpus", "metric": "summary", "sizes_gib": [r["corpus_gib"] for r in rows],
        "private_rss_ratio": round(large["private_rss_mib"] / small["private_rss_mib"], 3), "private_rss_target": 1.1,
        "startup_ratio": round(large["startup_s"] / small["startup_s"], 3), "startup_target": 2.0,
        "min_points_per_s_per_core": min(r["points_per_s_per_core"] for r in rows),
        "loader_target": TARGET_POINTS_PER_S_PER_CORE,
        "meets_targets": bool(large["private_rss_mib"] <= 1.1 * small["private_rss_mib"]
                              and large["startup_s"] <= 2.0 * small["startup_s"]
                              and min(r["points_per_s_per_core"] for r in rows) >= TARGET_POINTS_PER_S_PER_CORE),
    }))
    return 0


NAME = "corpus"
HELP = "training-form corpora at scale: build rate, start-up, private RSS, loader rate (JSON lines)"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
