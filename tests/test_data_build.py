"""Builder: ingest, exclusion of evaluation sets, preprocessing, synthetic determinism, CLI."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from timers1.cli import main as cli_main
from timers1.data import synthetic
from timers1.data.builder import build_corpus, build_default_corpus, parse_build_config
from timers1.data.corpus import read_corpus, validate_corpus
from timers1.data.ingest import IngestError, excluded_name, read_long, read_wide, series_hash
from timers1.data.preprocess import PreprocessConfig, causal_mean_impute, clean_series, outlier_mask
from timers1.errors import InputError

from .conftest import SHARED_DIR

EXTRA_DIR = SHARED_DIR / "data" / "extra"


def _write_long_csv(path, series: dict[str, list], start="2021-01-01 00:00:00", step_hours=1):
    base = np.datetime64(start.replace(" ", "T"))
    lines = ["item_id,timestamp,target"]
    for item, values in series.items():
        for i, v in enumerate(values):
            ts = str(base + np.timedelta64(i * step_hours, "h")).replace("T", " ")
            lines.append(f"{item},{ts},{'' if v is None else v}")
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _build(tmp_path, sources, **extra):
    cfg = parse_build_config({"sources": sources, **extra})
    return build_corpus(cfg, tmp_path / "corpus", progress=False)


# -- synthetic ------------------------------------------------------------------------------

def test_every_family_is_deterministic_finite_and_seed_dependent():
    for family in synthetic.FAMILIES:
        a, freq = synthetic.generate(family, seed=1, index=3, n_points=300)
        b, _ = synthetic.generate(family, seed=1, index=3, n_points=300)
        c, _ = synthetic.generate(family, seed=2, index=3, n_points=300)
        assert a.dtype == np.float32 and a.shape == (300,) and np.isfinite(a).all(), family
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), family
    hourly, freq = synthetic.generate("hourly", 0, 0, 24 * 7 * 8)
    assert freq == "H"
    spectrum = np.abs(np.fft.rfft(hourly - hourly.mean()))
    weeks = len(hourly) // (24 * 7)
    # Hourly series carry a daily cycle: energy at 1/24 (or its harmonics) stands out.
    daily_bins = [k * 7 * weeks for k in (1, 2, 3, 4)]
    assert max(spectrum[daily_bins]) > 5 * np.median(spectrum)


def test_profile_series_repeat_their_calendar_shape():
    """Seasonal naive at the series' own calendar period beats the series mean by far for most
    profile series: the shape repeats, whatever it is."""
    period_of = {"H": 24, "30min": 48, "15min": 96, "D": 7, "M": 12, "Q": 4, "W": 52}
    ratios = []
    for index in range(100):
        x, freq = synthetic.generate("profile", 0, index, 2000)
        p = period_of[freq]
        ratios.append(np.mean(np.abs(x[p:] - x[:-p])) / np.mean(np.abs(x - x.mean())))
    assert np.median(ratios) < 0.5 and np.mean(np.array(ratios) < 1.0) > 0.9


def test_short_growth_series_keep_their_direction():
    """The growth family's short series trend on: the slope of the second half mostly has the
    sign of the first (a stationary process would make that a coin flip)."""
    freqs, same_direction = set(), []
    for index in range(200):
        x, freq = synthetic.generate("growth", 0, index, 40)
        freqs.add(freq)
        half = len(x) // 2
        slopes = [np.polyfit(np.arange(half), part, 1)[0] for part in (x[:half], x[half:2 * half])]
        same_direction.append(np.sign(slopes[0]) == np.sign(slopes[1]))
    assert freqs == {"A", "Q", "M", "W"}
    assert np.mean(same_direction) > 0.62
    long_x, long_freq = synthetic.generate("growth", 0, 1, 900)
    assert long_freq in ("M", "W") and np.ptp(np.log(np.abs(long_x) + 1e-9)) < 6  # no yearly 900-point series, no blow-up


def test_synthetic_build_is_deterministic_and_counts_families(tmp_path):
    source = {"type": "synthetic", "num_series": 40, "min_length_points": 64, "max_length_points": 300,
              "families": {"kernelsynth": 1, "canonical": 1, "intermittent": 1, "random_walk": 1}}
    summary = _build(tmp_path, [source], seed=7)
    assert summary["series_kept"] == 40 and summary["dropped"] == {}
    first = read_corpus(tmp_path / "corpus")
    assert {s["source"]: s["kept"] for s in summary["sources"]} == {
        "synthetic.kernelsynth": 10, "synthetic.canonical": 10, "synthetic.intermittent": 10,
        "synthetic.random_walk": 10}
    cfg = parse_build_config({"sources": [source], "seed": 7})
    build_corpus(cfg, tmp_path / "again", progress=False)
    second = read_corpus(tmp_path / "again")
    np.testing.assert_array_equal(first.values, second.values)
    assert first.item_ids == second.item_ids
    assert first.manifest["shards"][0]["sha256"] == second.manifest["shards"][0]["sha256"]


def test_default_corpus_small_mixes_real_and_synthetic_and_excludes_nothing_evaluated(tmp_path):
    summary = build_default_corpus(tmp_path / "d", num_synthetic_series=48)
    corpus = read_corpus(tmp_path / "d")
    assert validate_corpus(tmp_path / "d")["rows"] == summary["series_kept"] == corpus.num_series
    sources = set(corpus.source_names)
    assert "statsmodels.co2" in sources and "synthetic.hourly" in sources and "synthetic.kernelsynth" in sources
    assert len(set(corpus.domain_names)) >= 5
    assert not any(excluded_name(s.split(".")[-1], ("m4", "m3", "tourism", "ett", "exchange_rate")) for s in sources)
    # Fertility has countries without data: dropped and counted, not silently lost.
    assert summary["dropped"].get("all_missing", 0) > 0


# -- ingest -----------------------------------------------------------------------------------

def test_long_csv_ingest_groups_sorts_imputes_and_infers_freq(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(100).round(3).tolist()
    a[10] = None
    path = _write_long_csv(tmp_path / "shop.csv.gz", {"b": list(range(50)), "a": a, "empty": [None] * 40, "tiny": [1, 2]})
    raw = {s.item_id: s for s in read_long(path)}
    assert set(raw) == {"a", "b", "empty", "tiny"} and raw["a"].freq == "H"
    assert str(raw["a"].start) == "2021-01-01T00:00:00"
    summary = _build(tmp_path, [{"type": "long", "path": str(path), "domain": "retail"}],
                     preprocess={"min_length_points": 10})
    assert summary["series_kept"] == 2
    assert summary["dropped"] == {"all_missing": 1, "too_short": 1}
    assert summary["imputed_points"] == 1
    corpus = read_corpus(tmp_path / "corpus")
    series_a = corpus.series(corpus.item_ids.index("shop.csv.gz/a"))
    assert series_a[10] == pytest.approx(np.mean(a[:10]), rel=1e-5)  # causal: only the past fills the gap


def test_wide_csv_and_parquet_ingest(tmp_path):
    (tmp_path / "w.csv").write_text("timestamp,x,y\n2020-01-01,1,10\n2020-01-02,2,\n2020-01-03,3,30\n")
    series = read_wide(tmp_path / "w.csv")
    assert [s.item_id for s in series] == ["x", "y"] and series[0].freq == "D"
    assert np.isnan(series[1].values[1])
    pq.write_table(pa.table({"item_id": ["p"] * 3, "timestamp": ["2020-01-01 00:00:00"] * 3, "target": [1.0, 2.0, 3.0]}),
                   tmp_path / "l.parquet")
    assert read_long(tmp_path / "l.parquet")[0].values.tolist() == [1.0, 2.0, 3.0]


def test_ingest_errors_name_file_column_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,timestamp,target\na,2020-01-01 00:00:00,1\na,2020-01-01 01:00:00,abc\n")
    with pytest.raises(IngestError, match=r"bad\.csv: column 'target', line 3: 'abc' is not a number"):
        read_long(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("item_id,timestamp,value\na,2020-01-01,1\n")
    with pytest.raises(IngestError, match=r"missing\.csv: missing column 'target'"):
        read_long(missing)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all")
    with pytest.raises(IngestError, match=r"fake\.parquet: cannot be read as Parquet"):
        read_long(fake)
    with pytest.raises(InputError, match="sources\\[0\\].path"):
        parse_build_config({"sources": [{"type": "long"}]})
    with pytest.raises(InputError, match="unknown field"):
        parse_build_config({"sources": [{"type": "synthetic", "num_series": 1, "colour": 1}]})


def test_evaluation_sets_are_excluded_by_name_and_by_hash(tmp_path):
    values = {"u": [float(i % 7) for i in range(60)], "v": [float(i) for i in range(60)]}
    m3 = _write_long_csv(tmp_path / "m3_monthly.csv", values)
    renamed = tmp_path / "innocent.csv"
    shutil.copy(m3, renamed)
    summary = _build(tmp_path, [{"type": "long", "path": str(m3)}, {"type": "long", "path": str(renamed)}],
                     exclude={"hash_files": [str(m3)]})
    assert summary["excluded_sources"][0]["evaluation_set"] == "m3"
    assert summary["series_kept"] == 0 and summary["dropped"] == {"excluded_hash": 2}
    assert excluded_name("ETTh1", ["ett"]) == "ett" and excluded_name("car-parts_M", ["car_parts"]) == "car_parts"
    assert excluded_name("m30_sales", ["m3"]) is None and excluded_name("metta", ["ett"]) is None
    assert series_hash(np.array([1.0, np.nan])) == series_hash(np.array([1.0, np.nan], dtype=np.float32))


@pytest.mark.skipif(not EXTRA_DIR.is_dir(), reason="../shared/data/extra not present")
def test_real_csv_fixtures_ingest_and_never_enter_a_corpus(tmp_path):
    ett = EXTRA_DIR / "ett1_H.csv.gz"
    series = read_long(ett)
    assert len(series) == 7 and all(len(s.values) == 17420 and s.freq == "H" for s in series)
    exchange = read_long(EXTRA_DIR / "exchange_rate_D.csv.gz")
    assert len(exchange) == 8 and exchange[0].freq == "D"
    # By name, the evaluation files are refused whole; a renamed copy is caught by value hash.
    copy = tmp_path / "renamed_sensor.csv.gz"
    shutil.copy(ett, copy)
    summary = _build(tmp_path, [{"type": "long", "path": str(ett)}, {"type": "long", "path": str(copy)},
                                {"type": "synthetic", "num_series": 2, "min_length_points": 64, "max_length_points": 64}],
                     exclude={"hash_files": [str(ett)]})
    assert [s["evaluation_set"] for s in summary["excluded_sources"]] == ["ett"]
    assert summary["dropped"] == {"excluded_hash": 7}
    corpus = read_corpus(tmp_path / "corpus")
    assert corpus.num_series == 2 and all(s.startswith("synthetic.") for s in corpus.source_names)


# -- preprocessing -----------------------------------------------------------------------------

def test_outlier_removal_flags_spikes_and_imputation_is_causal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(300)
    x[[100, 200]] = 50.0
    for method in ("ksigma", "iqr", "both"):
        cfg = PreprocessConfig(outliers=method, window_points=64)
        flagged = np.flatnonzero(outlier_mask(x, cfg))
        assert {100, 200} <= set(flagged.tolist()) and len(flagged) < 10, method
        result = clean_series(x, cfg)
        assert result.outliers_removed == len(flagged) and abs(result.values[100]) < 3
    y = np.array([1.0, 2.0, np.nan, 4.0, np.nan, np.nan])
    filled, n = causal_mean_impute(y, window=2)
    assert n == 3 and filled[2] == 1.5 and filled[4] == 4.0 and filled[5] == 4.0
    # Changing the future never changes an imputed value.
    z = y.copy()
    z[3] = 100.0
    assert causal_mean_impute(z, window=2)[0][2] == filled[2]


def test_drops_have_reasons():
    cfg = PreprocessConfig(min_length_points=5, min_abs_lag1_autocorr=0.5)
    assert clean_series(np.full(10, np.nan), cfg).drop_reason == "all_missing"
    assert clean_series(np.array([np.nan, 1, 2, np.nan]), cfg).drop_reason == "too_short"
    noise = np.random.default_rng(0).standard_normal(500)
    assert clean_series(noise, cfg).drop_reason == "no_autocorrelation"
    assert clean_series(np.cumsum(noise), cfg).drop_reason == ""
    with pytest.raises(InputError, match="preprocess.outliers='zscore'"):
        PreprocessConfig(outliers="zscore").validate()


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_build_validate_inspect(tmp_path, capsys):
    path = _write_long_csv(tmp_path / "sensors.csv", {"s1": [float(np.sin(i / 5)) for i in range(200)]})
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "target_shard_mb": 0.01, "seed": 3,
        "sources": [{"type": "long", "path": "sensors.csv", "domain": "iot"},
                    {"type": "synthetic", "num_series": 30, "min_length_points": 64, "max_length_points": 512}]}))
    assert cli_main(["data", "build", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "31 series" in out and "synthetic.hourly" in out
    assert cli_main(["data", "validate", str(tmp_path / "out")]) == 0
    assert "ok: 31 series" in capsys.readouterr().out
    png = tmp_path / "samples.png"
    assert cli_main(["data", "inspect", str(tmp_path / "out"), "--png", str(png), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["series"] == 31 and {d["name"] for d in stats["domains"]} == {"iot", "synthetic"}
    assert sum(stats["length_histogram"].values()) == 31
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Bad input: one line naming the culprit, exit 2.
    shard = sorted((tmp_path / "out").glob("shard-*.parquet"))[0]
    shard.write_bytes(b"garbage")
    assert cli_main(["data", "validate", str(tmp_path / "out")]) == 2
    assert str(shard) in capsys.readouterr().err
