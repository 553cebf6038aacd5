"""The ensemble at inference (``mirror``, ``ensemble_contexts``) and the forecast-space scores
on the corpus' held-out series that choose it (``timers1 eval --validation``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from timers1 import cli
from timers1.config import ConfigError, load_config, save_config
from timers1.data import build_default_corpus, open_compiled, validation_windows
from timers1.errors import InputError
from timers1.eval import cli as eval_cli
from timers1.eval.metrics import QUANTILE_LEVELS
from timers1.eval.validation import score_validation, window_scores
from timers1.forecast import Forecaster, ForecastInputError
from timers1.model import build_model
from tests.conftest import CONFIGS_DIR


@pytest.fixture(scope="module")
def model():
    cfg = load_config(CONFIGS_DIR / "tiny.yaml")
    model = build_model(cfg.model, cfg.moe, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _series(n_series: int = 5):
    rng = np.random.default_rng(0)
    t = np.arange(300)
    return [10 + 0.05 * t[:n] + 3 * np.sin(2 * np.pi * t[:n] / 7) + rng.normal(0, 0.5, n)
            for n in rng.integers(40, 300, n_series)]


def test_mirror_averages_the_negated_series_forecast_mapped_back(model):
    series = _series()
    plain = Forecaster(model, max_context_points=128).predict(series, 40)
    negated = Forecaster(model, max_context_points=128).predict([-s for s in series], 40)
    mirrored = Forecaster(model, max_context_points=128, mirror=True).predict(series, 40)
    # The quantile at level q of -x is minus the one at 1 - q: reverse the level axis.
    expected = (np.sort(plain, axis=1) + np.sort(-negated[:, ::-1], axis=1)) / 2
    np.testing.assert_allclose(mirrored, expected, rtol=1e-12)
    assert np.abs(mirrored - plain).max() > 1e-3  # the negated series is another question
    assert (np.diff(mirrored, axis=1) >= 0).all()


def test_ensemble_contexts_average_each_context_length_forecast(model):
    series = _series()
    members = [Forecaster(model, max_context_points=n).predict(series, 20) for n in (128, 48, 32)]
    ensemble = Forecaster(model, max_context_points=128, ensemble_contexts=[48, 32, 48, 128]).predict(series, 20)
    np.testing.assert_allclose(ensemble, sum(np.sort(m, axis=1) for m in members) / 3, rtol=1e-12)


def test_both_ensembles_make_every_pair_a_member(model):
    forecaster = Forecaster(model, max_context_points=128, mirror=True, ensemble_contexts=[32])
    assert forecaster.members == [(128, 1.0), (128, -1.0), (32, 1.0), (32, -1.0)]
    # Without an ensemble the released path is untouched: one member, no sorting.
    plain = Forecaster(model, max_context_points=128)
    assert plain.members == [(128, 1.0)]


def test_ensemble_errors_name_the_value(model):
    with pytest.raises(ForecastInputError, match="ensemble_contexts: 0"):
        Forecaster(model, ensemble_contexts=[0])
    with pytest.raises(ConfigError, match="eval.ensemble_contexts"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["eval.ensemble_contexts=[64,0]"])
    model.model_cfg.quantiles, saved = [0.1, 0.5, 0.8], model.model_cfg.quantiles
    try:
        with pytest.raises(ForecastInputError, match="symmetric about 0.5"):
            Forecaster(model, mirror=True)
    finally:
        model.model_cfg.quantiles = saved


def test_window_scores_by_hand():
    context = np.array([0.0, 2.0, 0.0, 2.0])  # mean 1, std 1
    target = np.array([[1.0, 3.0]])
    median_only = np.repeat(np.array([[1.0, 1.0]])[:, None, :], len(QUANTILE_LEVELS), axis=1)
    crps, mae = window_scores(median_only, target, [context])
    # errors 0 and 2 at every level: mean_q 2 * q * 2 = 2 * 0.5 * 2 = 2; denominator T * s = 2 * 1
    assert mae[0] == pytest.approx(2.0 / (2 * (1 + 1e-5)))
    assert crps[0] == pytest.approx(2.0 / (2 * (1 + 1e-5)))
    # A flat context: the floor takes 0.2 * rms(y - m) instead of s ~ 1e-5.
    crps_flat, _ = window_scores(median_only, target, [np.ones(4)])
    rms = np.sqrt((0.0 + 4.0) / 2)
    assert crps_flat[0] == pytest.approx(2.0 / (2 * 0.2 * rms))
    perfect = np.repeat(target[:, None, :], len(QUANTILE_LEVELS), axis=1)
    assert window_scores(perfect, target, [context])[0][0] == 0.0


@pytest.fixture(scope="module")
def val_setup(tmp_path_factory, model):
    from timers1.hf import write_model_dir

    root = tmp_path_factory.mktemp("ens")
    corpus = root / "corpus"
    build_default_corpus(corpus, num_synthetic_series=32, include_real=False, progress=False,
                         validation_fraction=0.25)
    cfg_path = root / "run.yaml"
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", [f"data.corpus_dir={corpus}", "data.context_points=64",
                                                  "eval.val_windows=24", "eval.val_context_points=[32]"])
    save_config(cfg, cfg_path)
    write_model_dir(root / "model", cfg, model.state_dict())
    return corpus, cfg_path, root / "model"


def test_validation_scores_the_held_out_windows_as_forecasts(val_setup, model):
    corpus, cfg_path, _ = val_setup
    cfg = load_config(cfg_path)
    forecaster = Forecaster(model)
    report = score_validation(forecaster, cfg)
    assert [v["context_points"] for v in report.views] == [64, 32]
    # The full view by hand: the same windows, context in, 48 points out.
    values, mask = validation_windows(open_compiled(corpus), 64 + 48, 24)
    seen = mask[:, :64].sum(axis=1) > 0  # windows of series no longer than the horizon have nothing to read
    values, mask = values[seen], mask[seen]
    contexts = [row[:64][keep[:64] > 0].astype(np.float64) for row, keep in zip(values, mask)]
    crps, mae = window_scores(forecaster.predict(contexts, 48), values[:, 64:].astype(np.float64), contexts)
    assert report.views[0]["windows"] == len(values)
    assert report.views[0]["CRPS"] == pytest.approx(crps.mean(), rel=1e-6)  # other batches, other BLAS sums
    assert report.views[0]["MAE"] == pytest.approx(mae.mean(), rel=1e-6)
    assert report.summary["CRPS"] == pytest.approx((report.views[0]["CRPS"] + report.views[1]["CRPS"]) / 2)
    assert report.views[0]["CRPS"] != report.views[1]["CRPS"]
    # No real series in this corpus: no real-only scores.
    assert "CRPS_real" not in report.views[0] and np.isnan(report.summary["CRPS_real"])


def test_eval_cli_validation_with_an_ensemble(val_setup, tmp_path, capsys):
    _, cfg_path, model_dir = val_setup
    plain, mirrored = tmp_path / "plain.json", tmp_path / "mirror.json"
    assert cli.main(["eval", "--checkpoint", str(model_dir), "--validation", str(cfg_path),
                     "--output", str(plain)]) == 0
    assert cli.main(["eval", "--checkpoint", str(model_dir), "--validation", str(cfg_path), "--mirror",
                     "--ensemble-contexts", "32", "--output", str(mirrored)]) == 0
    out = capsys.readouterr().out
    assert "validation split of" in out and "mean" in out
    a, b = json.loads(plain.read_text()), json.loads(mirrored.read_text())
    assert a["summary"]["CRPS"] > 0 and b["summary"]["CRPS"] > 0 and a["summary"] != b["summary"]
    # A baseline scores too (without seasonality: the windows carry no frequency).
    naive = tmp_path / "naive.json"
    assert cli.main(["eval", "--baseline", "naive", "--validation", str(cfg_path), "--output", str(naive)]) == 0
    assert json.loads(naive.read_text())["model"] == "naive (seasonality 1)"
    for args, message in ((["--baseline", "naive", "--validation", str(cfg_path), "--mirror"], "only with --checkpoint"),
                          (["--checkpoint", str(model_dir), "--validation", str(cfg_path), "--sanity"],
                           "exactly one of --data"),
                          (["--checkpoint", str(model_dir), "--validation", str(cfg_path), "--output", "x.csv"],
                           "written as .json")):
        with pytest.raises(InputError, match=message):
            eval_cli.run_eval(cli.build_parser().parse_args(["eval", *args]))
