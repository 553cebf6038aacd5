"""The memory-mapped training form: same batches as the in-memory reader, bounded private
memory, clear errors for damaged files, and a streaming builder whose output does not depend
on its worker count (from local paths and pyarrow.fs URIs alike)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from timers1.data.builder import HashSet64, build_corpus, build_default_corpus, parse_build_config
from timers1.data.compiled import BIN_FILE, IDX_FILE, compile_corpus, open_compiled
from timers1.data.corpus import MANIFEST_NAME, CorpusError, SeriesRecord, read_corpus, validate_corpus, write_corpus
from timers1.data.ingest import series_hash
from timers1.data.loader import CorpusLoader
from tests.test_data_loader import _same, _take

W = 96
AUGMENT = dict(flip_probability=0.3, resample_probability=0.3, truncate_probability=0.3, truncate_min_points=8,
               mixup_probability=0.3,
               mixture_weights={"web": 0.5, "src1": 2.0})


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    records = [SeriesRecord(f"s{i}", np.cumsum(rng.standard_normal(int(rng.integers(20, 600)))).astype(np.float32),
                            domain=["energy", "web", "retail"][i % 3], source=f"src{i % 2}") for i in range(50)]
    out = tmp_path_factory.mktemp("compiled")
    write_corpus(records, out, target_shard_bytes=20_000)  # several shards = several megatron documents
    compile_corpus(out)
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2)])
def test_batches_equal_the_in_memory_reader(corpus_dir, world, workers):
    memory = read_corpus(corpus_dir)
    for rank in range(world):
        mapped = _take(CorpusLoader(corpus_dir, W, 8, rank=rank, world_size=world, seed=4, num_workers=workers,
                                    **AUGMENT), 6)
        in_memory = _take(CorpusLoader(memory, W, 8, rank=rank, world_size=world, seed=4, **AUGMENT), 6)
        _same(mapped, in_memory)
        assert any(float(b["mask"].mean()) < 1 for b in mapped)  # padding and truncation were exercised


def test_resume_mid_epoch_and_reshard_match_the_in_memory_reader(corpus_dir):
    memory = read_corpus(corpus_dir)
    # Exact resume on the same layout, the checkpoint taken from the in-memory reader.
    reference = _take(CorpusLoader(memory, W, 8, seed=2, **AUGMENT), 7)
    first = CorpusLoader(memory, W, 8, seed=2, **AUGMENT)
    _take(first, 3)
    resumed = CorpusLoader(corpus_dir, W, 8, seed=2, **AUGMENT)
    resumed.load_state_dict(first.state_dict())
    _same(_take(resumed, 4), reference[3:])
    # Reshard 2 ranks -> 1: the single rank continues at the first slot neither rank consumed.
    ranks = [CorpusLoader(corpus_dir, W, 4, rank=r, world_size=2, seed=2, **AUGMENT) for r in range(2)]
    for loader in ranks:
        _take(loader, 5)
    single = CorpusLoader(corpus_dir, W, 8, seed=2, **AUGMENT)
    single.load_state_dict(ranks[0].state_dict())
    expected = CorpusLoader(memory, W, 8, seed=2, **AUGMENT)
    _take(expected, 5)  # 5 batches of 8 = the 2 x 5 x 4 slots the two ranks consumed
    _same(_take(single, 3), _take(expected, 3))


def test_training_form_is_checked_at_start_up(corpus_dir, tmp_path):
    import shutil

    work = tmp_path / "c"
    shutil.copytree(corpus_dir, work)
    open_compiled(work)
    manifest = json.loads((work / MANIFEST_NAME).read_text())

    bin_path = work / BIN_FILE
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-40])
    with pytest.raises(CorpusError, match=rf"{bin_path}: is \d+ bytes, manifest says \d+ \(truncated"):
        CorpusLoader(work, W, 4)
    bin_path.write_bytes(data)

    idx_path = work / IDX_FILE
    index = idx_path.read_bytes()
    idx_path.write_bytes(index[:-8])
    with pytest.raises(CorpusError, match=rf"{idx_path}: is \d+ bytes"):
        open_compiled(work)
    idx_path.write_bytes(index)

    # A manifest whose shard hash was changed: the compiled form no longer belongs to it.
    changed = json.loads(json.dumps(manifest))
    changed["shards"][0]["sha256"] = "0" * 64
    (work / MANIFEST_NAME).write_text(json.dumps(changed))
    with pytest.raises(CorpusError, match=rf"{work / MANIFEST_NAME}: the compiled form was made from other shards"):
        open_compiled(work)
    (work / MANIFEST_NAME).write_text(json.dumps(manifest))

    # A truncated shard beside the compiled files is refused too (a stat, not a read).
    shard = work / manifest["shards"][1]["file"]
    shard_bytes = shard.read_bytes()
    shard.write_bytes(shard_bytes[:100])
    with pytest.raises(CorpusError, match=rf"{shard}: is 100 bytes"):
        open_compiled(work)
    shard.write_bytes(shard_bytes)

    # Same size, other bytes: only --deep notices, and names the file.
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    bin_path.write_bytes(bytes(flipped))
    assert validate_corpus(work)["compiled"] is True
    with pytest.raises(CorpusError, match=rf"{bin_path}: sha256 does not match"):
        validate_corpus(work, deep=True)
    bin_path.write_bytes(data)
    assert validate_corpus(work, deep=True) == {"rows": 50, "points": manifest["num_points"],
                                               "shards": len(manifest["shards"]), "compiled": True}

    parquet_only = tmp_path / "p"
    write_corpus([SeriesRecord("a", np.arange(10, dtype=np.float32), "d", "s")], parquet_only)
    with pytest.raises(CorpusError, match=rf"{parquet_only}: has no memory-mapped training form; run `timers1 data compile"):
        CorpusLoader(parquet_only, W, 4)


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from timers1.data.compiled import open_compiled
    from timers1.data.corpus import CorpusError, read_corpus
    from timers1.data.loader import WindowSampler

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    corpus_dir, cap_bytes = sys.argv[1], int(sys.argv[2])
    corpus = open_compiled(corpus_dir)  # imports megatron-core before the cap
    # RLIMIT_DATA counts private memory (heap, anonymous mappings), not read-only file mappings.
    resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + cap_bytes, resource.RLIM_INFINITY))
    anon_before = status("RssAnon")
    sampler = WindowSampler(corpus, 4096, seed=0, resample_probability=0.2)
    checksum = 0.0
    for batch in range(60):
        checksum += float(sampler.sample(batch * 64, 64).values.sum())
    out = {"anon_growth": status("RssAnon") - anon_before, "file_rss": status("RssFile"), "checksum": checksum}
    try:
        read_corpus(corpus_dir)
        out["in_memory"] = "loaded"
    except (MemoryError, CorpusError) as exc:  # out of memory, or of memory for a reader thread
        out["in_memory"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
""")


def test_a_corpus_larger_than_the_memory_cap_still_yields_batches(tmp_path):
    points_per_series, num_series = 2_000_000, 20  # 160 MB of float32 values
    rng = np.random.default_rng(0)
    records = (SeriesRecord(f"long{i}", np.cumsum(rng.standard_normal(points_per_series), dtype=np.float32),
                            "d", "s") for i in range(num_series))
    write_corpus(records, tmp_path / "big")
    compile_corpus(tmp_path / "big")
    corpus_bytes = points_per_series * num_series * 4
    cap = 32 << 20
    probe = tmp_path / "probe.py"
    probe.write_text(_MEMORY_PROBE)
    proc = subprocess.run([sys.executable, str(probe), str(tmp_path / "big"), str(cap)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(out["checksum"])
    assert out["anon_growth"] < cap < corpus_bytes / 4  # windows came from the page cache, not private copies
    assert out["in_memory"] != "loaded"  # the cap is real: the in-memory reader cannot load this corpus under it


def test_hash_set_deduplicates_across_growth():
    seen = HashSet64(capacity=4)
    digests = [series_hash(np.array([i], np.float32)) for i in range(1000)]
    for d in digests:
        assert d not in seen
        seen.add(d)
    seen.add(digests[3])
    assert len(seen) == 1000 and all(d in seen for d in digests)
    assert series_hash(np.array([5000.0], np.float32)) not in seen


def test_streaming_build_is_independent_of_workers_and_equals_the_serial_build(tmp_path):
    summaries = [build_default_corpus(tmp_path / f"w{w}", num_synthetic_series=150, progress=False, workers=w,
                                      target_shard_bytes=300_000) for w in (1, 2)]
    one, two = (read_corpus(tmp_path / f"w{w}") for w in (1, 2))
    assert one.item_ids == two.item_ids and one.freqs == two.freqs
    np.testing.assert_array_equal(one.values, two.values)
    np.testing.assert_array_equal(one.offsets, two.offsets)
    assert [one.domain_names[c] for c in one.domain_codes] == [two.domain_names[c] for c in two.domain_codes]
    assert summaries[0]["sources"] == summaries[1]["sources"] and summaries[1]["workers"] == 2
    assert any(s["source"].startswith("statsmodels.") for s in summaries[0]["sources"])  # the builtin real series
    m1, m2 = (json.loads((tmp_path / f"w{w}" / MANIFEST_NAME).read_text())["compiled"] for w in (1, 2))
    assert m1["files"][BIN_FILE]["sha256"] == m2["files"][BIN_FILE]["sha256"]


def test_directory_of_files_through_a_uri_with_dedup_and_exclusion(tmp_path):
    raw = tmp_path / "raw"
    (raw / "part2").mkdir(parents=True)
    stamps = pd.date_range("2021-01-01", periods=120, freq="h")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(120), rng.standard_normal(120)
    pd.DataFrame({"item_id": ["a"] * 120 + ["b"] * 120, "timestamp": list(stamps) * 2,
                  "target": np.concatenate([a, b])}).to_csv(raw / "one.csv", index=False)
    # The same series "a" again under another id (a duplicate by value), and a new one.
    pd.DataFrame({"item_id": ["a_copy"] * 120 + ["c"] * 120, "timestamp": list(stamps) * 2,
                  "target": np.concatenate([a, rng.standard_normal(120)])}).to_parquet(raw / "part2" / "two.parquet")
    # An evaluation set's file inside the directory is skipped by name.
    pd.DataFrame({"item_id": ["m"] * 120, "timestamp": stamps, "target": rng.standard_normal(120)}).to_csv(
        raw / "m4_hourly.csv", index=False)
    cfg = parse_build_config({"preprocess": {"outliers": "none"},
                              "sources": [{"type": "long", "path": f"file://{raw}", "name": "shop", "domain": "retail"}]})
    summary = build_corpus(cfg, tmp_path / "corpus", progress=False, workers=2)
    corpus = read_corpus(tmp_path / "corpus")
    assert corpus.item_ids == ["shop/one/a", "shop/one/b", "shop/two/c"]
    assert summary["dropped"] == {"duplicate": 1}
    assert [s["path"].rsplit("/", 1)[-1] for s in summary["excluded_sources"]] == ["m4_hourly.csv"]
    # A Parquet corpus given as a URI compiles into a local directory of its own.
    compiled = compile_corpus(f"file://{tmp_path / 'corpus'}", tmp_path / "train")
    assert compiled["parquet_dir"] == f"file://{tmp_path / 'corpus'}"
    batch = next(iter(CorpusLoader(tmp_path / "train", 64, 4)))
    assert batch["values"].shape == (4, 64)
    assert validate_corpus(f"file://{tmp_path / 'corpus'}", deep=True)["rows"] == 3
    assert validate_corpus(tmp_path / "train", deep=True) == {"rows": 3, "points": 360, "shards": 1, "compiled": True}
