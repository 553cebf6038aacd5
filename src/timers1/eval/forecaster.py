"""The forecaster interface the harness scores, and batched calls into it.

A forecaster is any object with ``predict(context: list[np.ndarray], horizon: int) -> ndarray
[batch, 9, horizon]`` (quantiles 0.1..0.9 on axis 1). ``timers1.forecast.load_forecaster(path)``
returns one; the baselines in ``timers1.eval.baselines`` are others.

The harness hands it clean contexts: missing values imputed (forward fill, leading NaNs take the
first valid value, as GIFT-Eval does) and truncated to a maximum length, in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from timers1.eval.metrics import QUANTILE_LEVELS
from timers1.forecast import fill_forward


@runtime_checkable
class Forecaster(Protocol):
    def predict(self, context: list[np.ndarray], horizon: int) -> np.ndarray:
        """Quantile forecasts [len(context), 9, horizon] for levels 0.1..0.9."""
        ...


def impute_missing(values: np.ndarray) -> np.ndarray:
    """Last-value imputation: forward fill; leading NaNs take the first valid value.

    An all-NaN series becomes zeros (there is nothing to carry).
    """
    values = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(values)
    if not missing.any():
        return values
    if missing.all():
        return np.zeros_like(values)
    return fill_forward(values, missing)


def prepare_context(values: np.ndarray, max_context_points: int | None) -> np.ndarray:
    """Impute the whole history, then keep the most recent ``max_context_points`` (None/0: all).

    Imputing first means a kept part that starts inside a gap carries the last value seen before
    it, exactly what a model truncating the full imputed context itself would see.
    """
    values = impute_missing(values)
    if max_context_points:
        values = values[-max_context_points:]
    return values


def predict_batched(forecaster: Forecaster, contexts: Sequence[np.ndarray], horizon: int,
                    batch_size: int = 64, max_context_points: int | None = None,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Quantile forecasts [N, 9, horizon] for ``contexts``, ``batch_size`` series per call.

    Series are grouped by length (longest first) so that a padded batch wastes little work;
    the output is in the input order. ``progress`` is called with the series done per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    prepared = [prepare_context(c, max_context_points) for c in contexts]
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i]))
    out = np.empty((len(prepared), len(QUANTILE_LEVELS), horizon), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        result = np.asarray(forecaster.predict([prepared[i] for i in idx], horizon), dtype=np.float64)
        expected = (len(idx), len(QUANTILE_LEVELS), horizon)
        if result.shape != expected:
            raise ValueError(f"{type(forecaster).__name__}.predict returned shape {result.shape}, "
                             f"expected {expected} [batch, quantiles 0.1..0.9, horizon]")
        out[idx] = result
        if progress is not None:
            progress(len(idx))
    return out
