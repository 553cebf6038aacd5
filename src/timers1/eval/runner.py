"""The GIFT-Eval harness: forecast every configuration, score it, relate it to seasonal naive.

``evaluate(forecaster, specs)`` returns an ``EvalReport``: per configuration MASE and CRPS, the
seasonal-naive scores computed by the same harness (cached; they reproduce the leaderboard's own
to 1e-6), the ratios, and their geometric means, which is the leaderboard score.
``compare_with_leaderboard`` places the report among the published models.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from timers1.errors import InputError
from timers1.eval.baselines import ForecastCache, baseline_factory
from timers1.eval.datasets import DatasetSpec, EvalTask, build_task
from timers1.eval.forecaster import Forecaster, predict_batched
from timers1.eval.metrics import MEDIAN_INDEX, crps, geometric_mean, mase

ForecasterSource = Forecaster | Callable[[int], Forecaster]
"""A forecaster, or a function from the configuration's seasonality to one (baselines)."""


@dataclass
class ConfigResult:
    config: str
    horizon: int
    windows: int
    seasonality: int
    num_series: int
    num_instances: int
    MASE: float
    CRPS: float
    seasonal_naive_MASE: float = math.nan
    seasonal_naive_CRPS: float = math.nan
    relative_MASE: float = math.nan
    relative_CRPS: float = math.nan
    seconds: float = 0.0
    cached: bool = False


@dataclass
class EvalReport:
    model: str
    results: list[ConfigResult]
    settings: dict = field(default_factory=dict)
    comparison: pd.DataFrame | None = None

    @property
    def geometric_mean(self) -> dict[str, float]:
        return {
            "relative_MASE": geometric_mean([r.relative_MASE for r in self.results]),
            "relative_CRPS": geometric_mean([r.relative_CRPS for r in self.results]),
            "num_configs": len(self.results),
        }

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.results])

    def to_dict(self) -> dict:
        out = {"model": self.model, "settings": self.settings,
               "configs": [asdict(r) for r in self.results],
               "geometric_mean": self.geometric_mean}
        if self.comparison is not None:
            out["leaderboard"] = self.comparison.to_dict(orient="records")
        return out

    def save(self, path: str | Path) -> None:
        """JSON, or CSV (one row per configuration plus a 'geometric_mean' row) by extension."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".csv":
            frame = self.to_frame()
            gm = self.geometric_mean
            summary = {"config": "geometric_mean", "relative_MASE": gm["relative_MASE"],
                       "relative_CRPS": gm["relative_CRPS"]}
            frame = pd.concat([frame, pd.DataFrame([summary])], ignore_index=True)
            frame.insert(0, "model", self.model)
            frame.to_csv(path, index=False)
        else:
            path.write_text(json.dumps(json_safe(self.to_dict()), indent=2) + "\n")

    def format_table(self) -> str:
        header = f"{'configuration':<24} {'H':>4} {'W':>3} {'m':>3} {'MASE':>9} {'CRPS':>9} {'rel MASE':>9} {'rel CRPS':>9} {'s':>7}"
        lines = [f"model: {self.model}", "H: horizon (points forecast), W: test windows per series, "
                 "m: seasonality of MASE and seasonal naive; rel: relative to seasonal naive (lower is better); "
                 "s: seconds", header, "-" * len(header)]
        for r in self.results:
            lines.append(f"{r.config:<24} {r.horizon:>4} {r.windows:>3} {r.seasonality:>3} {r.MASE:>9.4f} "
                         f"{r.CRPS:>9.4f} {r.relative_MASE:>9.4f} {r.relative_CRPS:>9.4f} "
                         f"{r.seconds:>6.1f}{'*' if r.cached else ' '}")
        gm = self.geometric_mean
        lines.append("-" * len(header))
        lines.append(f"{'geometric mean (' + str(gm['num_configs']) + ' configs)':<46} {'':>9} {'':>9} "
                     f"{gm['relative_MASE']:>9.4f} {gm['relative_CRPS']:>9.4f}")
        if any(r.cached for r in self.results):
            lines.append("* forecasts read from the cache")
        return "\n".join(lines)


def json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def resolve_forecaster(source: ForecasterSource, seasonality: int) -> Forecaster:
    """The forecaster itself, or the one a baseline factory makes for ``seasonality``."""
    if isinstance(source, Forecaster):
        return source
    if callable(source):
        return source(seasonality)
    raise TypeError(f"expected a forecaster with predict(context, horizon) or a factory, got {source!r}")


def forecast_task(source: ForecasterSource, task: EvalTask, *, batch_size: int = 64,
                  max_context_points: int | None = None, cache: ForecastCache | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, bool]:
    """Quantile forecasts [N, 9, H] for every instance of ``task``; (forecasts, from_cache).

    Only forecasters with a ``cache_key`` (the baselines) are cached; a trained model changes
    between runs and is always run.
    """
    forecaster = resolve_forecaster(source, task.seasonality)
    cache_key = getattr(forecaster, "cache_key", None)
    task_hash = f"{task.content_hash()}-ctx{max_context_points or 0}"
    if cache is not None and cache_key:
        hit = cache.load(cache_key, task_hash)
        if hit is not None and hit.shape == (len(task.contexts), 9, task.horizon):
            return hit, True
    forecasts = predict_batched(forecaster, task.contexts, task.horizon, batch_size=batch_size,
                                max_context_points=max_context_points, progress=progress)
    if cache is not None and cache_key:
        cache.store(cache_key, task_hash, forecasts)
    return forecasts, False


def score(task: EvalTask, forecasts: np.ndarray) -> tuple[float, float]:
    """(MASE on the median, CRPS) of ``forecasts`` [N, 9, H] on ``task``."""
    return (mase(task.labels, forecasts[:, MEDIAN_INDEX, :], task.seasonal_errors),
            crps(task.labels, forecasts))


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, desc=desc, unit="series", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty())
    return bar.update, bar.close


def evaluate(source: ForecasterSource, specs: Sequence[DatasetSpec], *, model_name: str = "model",
             batch_size: int = 64, max_context_points: int | None = None,
             cache: ForecastCache | None = None, relative: bool = True,
             log: Callable[[str], None] | None = None, progress: bool = False) -> EvalReport:
    """Score ``source`` on every configuration of ``specs``.

    ``relative``: also run seasonal naive (through the same harness, cached when ``cache`` is
    given) to report ratios and their geometric means. ``max_context_points`` truncates what the
    forecaster sees (None: the whole history); the seasonal naive reference always sees it all.
    """
    reference = baseline_factory("seasonal_naive") if relative else None
    results = []
    for spec in specs:
        started = time.perf_counter()
        task = build_task(spec)
        update, close = _progress_bar(len(task.contexts), spec.name, progress)
        try:
            forecasts, cached = forecast_task(source, task, batch_size=batch_size,
                                              max_context_points=max_context_points,
                                              cache=cache, progress=update)
        finally:
            close()
        mase_value, crps_value = score(task, forecasts)
        seconds = time.perf_counter() - started
        result = ConfigResult(config=spec.name, horizon=task.horizon, windows=task.windows,
                              seasonality=task.seasonality, num_series=task.num_series,
                              num_instances=len(task.contexts), MASE=mase_value, CRPS=crps_value,
                              seconds=round(seconds, 3), cached=cached)
        if reference is not None:
            ref_forecasts, _ = forecast_task(reference, task, batch_size=max(batch_size, 256), cache=cache)
            result.seasonal_naive_MASE, result.seasonal_naive_CRPS = score(task, ref_forecasts)
            result.relative_MASE = result.MASE / result.seasonal_naive_MASE
            result.relative_CRPS = result.CRPS / result.seasonal_naive_CRPS
        results.append(result)
        if log is not None:
            log(f"{spec.name}: MASE {mase_value:.4f} CRPS {crps_value:.4f} "
                f"({len(task.contexts)} instances, {seconds:.1f}s{', cached' if cached else ''})")
    settings = {"batch_size": batch_size, "max_context_points": max_context_points or 0}
    return EvalReport(model=model_name, results=results, settings=settings)


def compare_with_leaderboard(report: EvalReport, leaderboard_csv: str | Path) -> pd.DataFrame:
    """Rank ``report`` among the leaderboard's models (columns model, config, MASE, CRPS).

    Every model is scored the leaderboard's way, the geometric mean over configurations of its
    metric divided by the leaderboard's seasonal_naive on that configuration, using only the
    configurations the report covers; models missing any of them are left out.
    """
    path = Path(leaderboard_csv)
    if not path.is_file():
        raise InputError(f"--compare {path}: file does not exist")
    board = pd.read_csv(path)
    missing = [c for c in ("model", "config", "MASE", "CRPS") if c not in board.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(board.columns)}")
    if "seasonal_naive" not in set(board["model"]):
        raise InputError(f"{path}: no 'seasonal_naive' rows to normalise by")
    configs = [r.config for r in report.results if r.config in set(board["config"])]
    if not configs:
        raise InputError(f"{path}: none of the evaluated configurations "
                         f"({', '.join(r.config for r in report.results)}) is on this leaderboard")
    board = board[board["config"].isin(configs)]
    naive = board[board["model"] == "seasonal_naive"].set_index("config")
    rows = []
    for model, group in board.groupby("model"):
        group = group.set_index("config")
        if not set(configs) <= set(group.index):
            continue
        rows.append({"model": model,
                     "relative_MASE": geometric_mean([group.at[c, "MASE"] / naive.at[c, "MASE"] for c in configs]),
                     "relative_CRPS": geometric_mean([group.at[c, "CRPS"] / naive.at[c, "CRPS"] for c in configs]),
                     "ours": False})
    ours = {r.config: r for r in report.results}
    label = f"{report.model} (this run)"
    rows = [r for r in rows if r["model"] != label]
    rows.append({"model": label,
                 "relative_MASE": geometric_mean([ours[c].MASE / naive.at[c, "MASE"] for c in configs]),
                 "relative_CRPS": geometric_mean([ours[c].CRPS / naive.at[c, "CRPS"] for c in configs]),
                 "ours": True})
    table = pd.DataFrame(rows)
    table["rank_MASE"] = table["relative_MASE"].rank(method="min").astype(int)
    table["rank_CRPS"] = table["relative_CRPS"].rank(method="min").astype(int)
    table = table.sort_values(["relative_CRPS", "relative_MASE"], kind="stable").reset_index(drop=True)
    table.attrs["configs"] = configs
    return table[["rank_CRPS", "rank_MASE", "model", "relative_CRPS", "relative_MASE", "ours"]]


def format_comparison(table: pd.DataFrame, around: int = 5) -> str:
    """The rank table: the top ``around`` models, then ``around`` either side of ours."""
    ours_at = int(np.flatnonzero(table["ours"].to_numpy())[0])
    keep = sorted(set(range(min(around, len(table)))) |
                  set(range(max(0, ours_at - around), min(len(table), ours_at + around + 1))))
    lines = [f"leaderboard ({len(table)} models, {len(table.attrs.get('configs', []))} configurations, "
             "geometric mean relative to seasonal naive; sorted by CRPS)",
             f"{'CRPS#':>5} {'MASE#':>5}  {'model':<40} {'rel CRPS':>9} {'rel MASE':>9}"]
    previous = -1
    for i in keep:
        if i != previous + 1:
            lines.append(f"{'...':>5}")
        row = table.iloc[i]
        marker = " <==" if row["ours"] else ""
        model = row["model"] if len(row["model"]) <= 40 else "..." + row["model"][-37:]  # a path's end says most
        lines.append(f"{row['rank_CRPS']:>5} {row['rank_MASE']:>5}  {model:<40} "
                     f"{row['relative_CRPS']:>9.4f} {row['relative_MASE']:>9.4f}{marker}")
        previous = i
    return "\n".join(lines)
