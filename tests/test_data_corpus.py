"""Corpus format: round trip, sharding, manifest checks, and bad input that names the file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from timers1.data.corpus import (MANIFEST_NAME, CorpusError, SeriesRecord, read_corpus, validate_corpus,
                                 write_corpus)
from timers1.errors import InputError


def _records(n: int = 40, seed: int = 0) -> list[SeriesRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        values = rng.standard_normal(int(rng.integers(10, 500))).astype(np.float32)
        out.append(SeriesRecord(f"s{i}", values, domain=["energy", "web"][i % 2], source=f"src{i % 3}",
                                freq="H" if i % 2 else "", start=np.datetime64("2020-01-01T00:00:00") if i % 2 else None))
    return out


def test_round_trip_preserves_every_series_and_field(tmp_path):
    records = _records()
    manifest = write_corpus(records, tmp_path / "c")
    corpus = read_corpus(tmp_path / "c")
    assert corpus.num_series == len(records)
    assert manifest["num_rows"] == 40 and manifest["num_points"] == sum(r.values.size for r in records)
    for i, r in enumerate(records):
        np.testing.assert_array_equal(corpus.series(i), r.values)
        assert corpus.item_ids[i] == r.item_id and corpus.freqs[i] == r.freq
        assert corpus.domain_names[corpus.domain_codes[i]] == r.domain
        assert corpus.source_names[corpus.source_codes[i]] == r.source
    table = pq.read_table(tmp_path / "c" / manifest["shards"][0]["file"])
    assert table.column("start")[1].as_py().year == 2020 and table.column("start")[0].as_py() is None
    assert manifest["domains"] == {"energy": {"rows": 20, "points": sum(r.values.size for r in records[0::2])},
                                   "web": {"rows": 20, "points": sum(r.values.size for r in records[1::2])}}
    assert validate_corpus(tmp_path / "c") == {"rows": 40, "points": manifest["num_points"], "shards": 1,
                                               "compiled": False}


def test_small_target_splits_into_several_shards_with_counts_and_hashes(tmp_path):
    records = _records(60)
    manifest = write_corpus(records, tmp_path / "c", target_shard_bytes=8_000)
    assert len(manifest["shards"]) > 3
    assert sum(s["rows"] for s in manifest["shards"]) == 60
    for shard in manifest["shards"]:
        assert len(shard["sha256"]) == 64 and shard["bytes"] == (tmp_path / "c" / shard["file"]).stat().st_size
    corpus = read_corpus(tmp_path / "c")
    np.testing.assert_array_equal(corpus.series(59), records[59].values)
    validate_corpus(tmp_path / "c")


def test_writer_refuses_non_finite_values_and_existing_corpus(tmp_path):
    with pytest.raises(InputError, match="'bad'.*finite"):
        write_corpus([SeriesRecord("bad", np.array([1.0, np.nan]), "d", "s")], tmp_path / "a")
    write_corpus(_records(3), tmp_path / "b")
    with pytest.raises(CorpusError, match="already holds a corpus"):
        write_corpus(_records(3), tmp_path / "b")
    write_corpus(_records(2), tmp_path / "b", overwrite=True)
    assert read_corpus(tmp_path / "b").num_series == 2


def test_truncated_shard_is_named(tmp_path):
    manifest = write_corpus(_records(), tmp_path / "c")
    shard = tmp_path / "c" / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorpusError, match=str(shard)):
        read_corpus(tmp_path / "c")
    with pytest.raises(CorpusError, match=rf"{shard}.*(truncated|bytes)"):
        validate_corpus(tmp_path / "c")


def test_non_parquet_file_is_named(tmp_path):
    manifest = write_corpus(_records(), tmp_path / "c")
    shard = tmp_path / "c" / manifest["shards"][0]["file"]
    shard.write_text("item_id,values\nA,1\n")
    with pytest.raises(CorpusError, match=rf"{shard}: not a readable Parquet"):
        read_corpus(tmp_path / "c")


def _replace_shard(tmp_path, table: pa.Table):
    manifest = write_corpus(_records(2), tmp_path / "c")
    shard = tmp_path / "c" / manifest["shards"][0]["file"]
    pq.write_table(table, shard)
    return shard


def test_missing_column_is_named(tmp_path):
    table = pa.table({"item_id": ["a"], "values": [[1.0, 2.0]], "freq": [""], "domain": ["d"]})
    shard = _replace_shard(tmp_path, table)
    with pytest.raises(CorpusError, match=rf"{shard}: missing column 'source'"):
        read_corpus(tmp_path / "c")


def test_non_numeric_values_are_named(tmp_path):
    table = pa.table({"item_id": ["a"], "values": [["1.0", "x"]], "freq": [""], "domain": ["d"], "source": ["s"]})
    shard = _replace_shard(tmp_path, table)
    with pytest.raises(CorpusError, match=rf"{shard}: column 'values' has type list<.*string"):
        read_corpus(tmp_path / "c")


def test_nan_in_a_shard_names_file_and_row(tmp_path):
    table = pa.table({"item_id": ["a", "b"], "values": [[1.0, 2.0], [3.0, float("nan")]], "freq": ["", ""],
                      "domain": ["d", "d"], "source": ["s", "s"]})
    shard = _replace_shard(tmp_path, table)
    with pytest.raises(CorpusError, match=rf"{shard}: row 1 \(item_id 'b'\)"):
        read_corpus(tmp_path / "c")


def test_manifest_problems_are_named(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=rf"{MANIFEST_NAME}: missing"):
        read_corpus(tmp_path / "empty")
    manifest = write_corpus(_records(3), tmp_path / "c")
    path = tmp_path / "c" / MANIFEST_NAME
    path.write_text(json.dumps({**manifest, "num_rows": 99}))
    with pytest.raises(CorpusError, match="totals"):
        validate_corpus(tmp_path / "c")
    path.write_text("{not json")
    with pytest.raises(CorpusError, match=rf"{path}: not valid JSON"):
        read_corpus(tmp_path / "c")
