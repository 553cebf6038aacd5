"""GIFT-Eval protocol harness: datasets and windows, metrics, baselines, runner, forecast CLI.

Scores anything with ``predict(context: list[np.ndarray], horizon: int) -> [batch, 9, horizon]``
(quantiles 0.1..0.9), never the trainer. Heavy modules (statsforecast, matplotlib) load lazily.
"""

from timers1.eval.datasets import DatasetSpec, EvalTask, build_task, gift8_specs, load_specs_yaml
from timers1.eval.forecaster import Forecaster, predict_batched
from timers1.eval.metrics import QUANTILE_LEVELS, crps, geometric_mean, mase, seasonal_error
from timers1.eval.runner import EvalReport, compare_with_leaderboard, evaluate

__all__ = [
    "DatasetSpec", "EvalTask", "build_task", "gift8_specs", "load_specs_yaml",
    "Forecaster", "predict_batched",
    "QUANTILE_LEVELS", "crps", "geometric_mean", "mase", "seasonal_error",
    "EvalReport", "compare_with_leaderboard", "evaluate",
]
