"""GIFT-Eval protocol harness: datasets and windows, metrics, baselines, runner, sanity suite,
forecast CLI.

Scores anything with ``predict(context: list[np.ndarray], horizon: int) -> [batch, 9, horizon]``
(quantiles 0.1..0.9), never the trainer. Names below load on first use, so that building the
CLI parser (which imports this package) does not pay for pandas, statsforecast or matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DatasetSpec": "datasets", "EvalTask": "datasets", "build_task": "datasets",
    "gift8_specs": "datasets", "load_specs_yaml": "datasets",
    "Forecaster": "forecaster", "predict_batched": "forecaster",
    "QUANTILE_LEVELS": "metrics", "crps": "metrics", "geometric_mean": "metrics", "mase": "metrics",
    "seasonal_error": "metrics",
    "EvalReport": "runner", "compare_with_leaderboard": "runner", "evaluate": "runner",
    "make_baseline": "baselines", "baseline_factory": "baselines", "ForecastCache": "baselines",
    "forecast_file": "forecasting", "forecast_series": "forecasting", "plot_forecasts": "forecasting",
    "SanityReport": "sanity", "evaluate_sanity": "sanity", "plot_sanity": "sanity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"timers1.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'timers1.eval' has no attribute {name!r}")
