"""GIFT-Eval metrics, pooled over every (instance, horizon step) of one configuration.

These reproduce gluonts ``evaluate_model(axis=None, mask_invalid_label=True)`` with the MASE[0.5]
and MeanWeightedSumQuantileLoss metrics that GIFT-Eval reports:

- NaN labels are masked out of every sum and count.
- MASE divides by the instance's seasonal error; gluonts does this with numpy masked arrays,
  which mask every non-finite quotient, so points whose scale is 0 (or NaN) drop out of the mean.
- wQL_q = sum 2|(y - yhat_q)(1{yhat_q >= y} - q)| / sum |y|, both sums over valid labels;
  CRPS is the mean of wQL_q over the quantile levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

QUANTILE_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The quantile levels every forecaster returns, in this order (axis 1 of its output)."""
MEDIAN_INDEX = QUANTILE_LEVELS.index(0.5)


def seasonal_error(context: np.ndarray, seasonality: int) -> float:
    """gluonts seasonal error: mean |c_t - c_(t-m)| over the whole context.

    Like gluonts, falls back to m = 1 when the context is shorter than m (``m > len``), and
    propagates NaN: an instance whose context has a NaN gets a NaN scale, and MASE masks it.
    """
    context = np.asarray(context, dtype=np.float64)
    length = context.shape[-1]
    if seasonality > length:
        seasonality = 1
    if length - seasonality <= 0:
        return float("nan")
    diffs = np.abs(context[seasonality:] - context[: length - seasonality])
    return float(diffs.mean())


def mase(labels: np.ndarray, median: np.ndarray, scales: np.ndarray) -> float:
    """Pooled MASE: mean over valid (i, t) of |y - median| / scale_i.

    ``labels`` and ``median`` are [N, H]; ``scales`` is [N]. Points whose label is NaN or whose
    scaled error is not finite (scale 0 or NaN) are masked. Returns NaN when nothing is valid.
    """
    labels = np.asarray(labels, dtype=np.float64)
    median = np.asarray(median, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.abs(labels - median) / scales
    valid = np.isfinite(labels) & np.isfinite(scaled)
    if not valid.any():
        return float("nan")
    return float(scaled[valid].sum() / valid.sum())


def weighted_quantile_loss(labels: np.ndarray, forecast: np.ndarray, level: float) -> float:
    """Pooled wQL_q over valid labels: sum of 2x pinball loss / sum |y|."""
    labels = np.asarray(labels, dtype=np.float64)
    forecast = np.asarray(forecast, dtype=np.float64)
    valid = np.isfinite(labels)
    y, f = labels[valid], forecast[valid]
    loss = 2.0 * np.abs((y - f) * ((f >= y).astype(np.float64) - level))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(loss.sum() / np.abs(y).sum())


def crps(labels: np.ndarray, quantiles: np.ndarray,
         levels: Sequence[float] = QUANTILE_LEVELS) -> float:
    """Mean over levels of wQL_q ("CRPS" on GIFT-Eval). ``quantiles`` is [N, Q, H]."""
    quantiles = np.asarray(quantiles)
    if quantiles.shape[1] != len(levels):
        raise ValueError(f"quantiles has {quantiles.shape[1]} levels on axis 1, expected {len(levels)}")
    return float(np.mean([weighted_quantile_loss(labels, quantiles[:, k, :], q)
                          for k, q in enumerate(levels)]))


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of positive values; NaN if any value is missing or not positive."""
    values = [float(v) for v in values]
    if not values or any(not (v > 0) or not math.isfinite(v) for v in values):
        return float("nan")
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))
