"""GIFT-Eval metrics and the harness plumbing against hand-computed cases."""

import math

import numpy as np
import pytest

from timers1.eval.forecaster import impute_missing, predict_batched, prepare_context
from timers1.eval.frequency import FrequencyError, parse_frequency
from timers1.eval.metrics import (QUANTILE_LEVELS, crps, geometric_mean, mase, seasonal_error,
                                  weighted_quantile_loss)

NAN = float("nan")


def test_seasonal_error_hand_computed():
    context = np.array([1.0, 2.0, 4.0, 7.0])
    assert seasonal_error(context, 1) == pytest.approx((1 + 2 + 3) / 3)
    assert seasonal_error(context, 2) == pytest.approx((3 + 5) / 2)
    # gluonts: a season longer than the context falls back to m = 1.
    assert seasonal_error(context, 5) == pytest.approx(2.0)
    # m equal to the length leaves no pair: no scale.
    assert math.isnan(seasonal_error(context, 4))
    assert math.isnan(seasonal_error(np.array([1.0, NAN, 3.0]), 1))


def test_mase_masks_nan_labels_and_zero_scale():
    labels = np.array([[1.0, 2.0, NAN],
                       [5.0, 5.0, 5.0]])
    median = np.array([[2.0, 2.0, 2.0],
                       [4.0, 4.0, 4.0]])
    # series 0: errors 1, 0 (third label NaN) over scale 2; series 1 has zero scale: masked.
    assert mase(labels, median, np.array([2.0, 0.0])) == pytest.approx((0.5 + 0.0) / 2)
    # with a real scale, series 1 contributes 1/4 three times.
    assert mase(labels, median, np.array([2.0, 4.0])) == pytest.approx((0.5 + 0 + 0.25 * 3) / 5)
    # NaN scale (NaN in the context) is masked the same way.
    assert mase(labels, median, np.array([NAN, 4.0])) == pytest.approx(0.25)
    # nothing valid: NaN, not an exception.
    assert math.isnan(mase(np.array([[NAN]]), np.array([[1.0]]), np.array([1.0])))


def test_weighted_quantile_loss_hand_computed():
    labels = np.array([[1.0, 3.0, NAN]])
    forecast = np.array([[2.0, 2.0, 100.0]])
    # y=1, f=2: f >= y: 2|(1-2)(1-0.1)| = 1.8; y=3, f=2: 2|(3-2)(0-0.1)| = 0.2; NaN label skipped
    # in both the loss and the |y| sum.
    assert weighted_quantile_loss(labels, forecast, 0.1) == pytest.approx(2.0 / 4.0)
    # at q=0.9: 2|(-1)(0.1)| = 0.2 and 2|(1)(-0.9)| = 1.8.
    assert weighted_quantile_loss(labels, forecast, 0.9) == pytest.approx(2.0 / 4.0)
    # f == y counts as f >= y: zero loss.
    assert weighted_quantile_loss(np.array([[2.0]]), np.array([[2.0]]), 0.3) == 0.0


def test_crps_is_mean_of_wql_over_levels():
    rng = np.random.default_rng(0)
    labels = rng.normal(10, 1, size=(3, 5))
    labels[0, 1] = NAN
    quantiles = np.sort(rng.normal(10, 1, size=(3, 9, 5)), axis=1)
    expected = np.mean([weighted_quantile_loss(labels, quantiles[:, k], q) for k, q in enumerate(QUANTILE_LEVELS)])
    assert crps(labels, quantiles) == pytest.approx(expected)
    perfect = np.repeat(np.nan_to_num(labels)[:, None, :], 9, axis=1)
    assert crps(labels, perfect) == 0.0


def test_geometric_mean():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(geometric_mean([1.0, NAN]))
    assert math.isnan(geometric_mean([1.0, 0.0]))
    assert math.isnan(geometric_mean([]))


def test_last_value_imputation():
    np.testing.assert_array_equal(impute_missing(np.array([NAN, 1.0, NAN, 3.0, NAN])), [1, 1, 1, 3, 3])
    np.testing.assert_array_equal(impute_missing(np.array([NAN, NAN])), [0, 0])
    # imputation sees the whole history before truncation: the kept NaN carries 5.
    np.testing.assert_array_equal(prepare_context(np.array([1.0, 5.0, NAN, 2.0]), 2), [5, 2])


class LastValue:
    """Flat forecaster: every quantile is the last context value (records batch sizes)."""

    def __init__(self):
        self.batches = []

    def predict(self, context, horizon):
        self.batches.append(len(context))
        last = np.array([c[-1] for c in context])
        return np.broadcast_to(last[:, None, None], (len(context), 9, horizon)).copy()


def test_predict_batched_keeps_order_and_batches():
    forecaster = LastValue()
    contexts = [np.arange(n, dtype=float) + 100 * n for n in (3, 9, 1, 5, 7)]
    out = predict_batched(forecaster, contexts, horizon=4, batch_size=2, max_context_points=2)
    assert out.shape == (5, 9, 4)
    np.testing.assert_array_equal(out[:, 4, 0], [c[-1] for c in contexts])
    assert forecaster.batches == [2, 2, 1]


def test_predict_batched_rejects_wrong_shape():
    class Bad:
        def predict(self, context, horizon):
            return np.zeros((len(context), horizon, 9))

    with pytest.raises(ValueError, match=r"expected \(2, 9, 3\)"):
        predict_batched(Bad(), [np.ones(4), np.ones(5)], horizon=3)


@pytest.mark.parametrize("freq, code, season", [
    ("H", "H", 24), ("h", "H", 24), ("15min", "15T", 96), ("15T", "15T", 96), ("10min", "10T", 144),
    ("7min", "7T", 1), ("D", "D", 1), ("W-SUN", "W", 1), ("M", "M", 12), ("ME", "M", 12),
    ("MS", "M", 12), ("Q", "Q", 4), ("A", "A", 1), ("YE", "A", 1), ("B", "B", 5), ("S", "S", 3600),
])
def test_frequency_rules(freq, code, season):
    f = parse_frequency(freq)
    assert (f.code, f.seasonality) == (code, season)


def test_gift_eval_horizons():
    assert parse_frequency("H").base_horizon() == 48
    assert parse_frequency("M").base_horizon() == 12
    assert parse_frequency("M").base_horizon(m4=True) == 18
    assert parse_frequency("W").base_horizon(m4=True) == 13
    with pytest.raises(FrequencyError, match="'Q'"):
        parse_frequency("Q").base_horizon()


def test_unknown_frequency_names_the_value():
    with pytest.raises(FrequencyError, match=r"data\.yaml: freq: unknown frequency 'fortnightly'"):
        parse_frequency("fortnightly", "data.yaml: freq")
