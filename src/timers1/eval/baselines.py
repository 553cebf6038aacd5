"""Baseline forecasters behind the harness's interface, and an on-disk forecast cache.

- statsforecast models (SeasonalNaive, Naive, AutoETS, AutoTheta): their 9 quantiles come from
  prediction intervals, q -> level = round(200 * (max(q, 1 - q) - 0.5)), the lower bound below
  the median and the upper above, the point forecast at 0.5 (as GIFT-Eval does).
- Fracast-0 from the PyPI ``fracast`` package, an optional pretrained peer.

Fitting AutoETS over GIFT-8 takes minutes, so the harness caches baseline forecasts on disk,
keyed by the forecaster's ``cache_key`` and a hash of the configuration's contexts.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from timers1.errors import InputError
from timers1.eval.metrics import QUANTILE_LEVELS

STATSFORECAST_MODELS = {
    "seasonal_naive": "SeasonalNaive",
    "naive": "Naive",
    "auto_ets": "AutoETS",
    "auto_theta": "AutoTheta",
}
PEER_MODELS = ("fracast",)
BASELINE_NAMES = tuple(STATSFORECAST_MODELS) + PEER_MODELS


class BaselineUnavailable(InputError):
    """An optional baseline's package is not installed."""


def _interval_levels() -> list[tuple[float, int]]:
    """(quantile, interval level) pairs; level 0 means the point forecast."""
    return [(q, int(round(200 * (max(q, 1 - q) - 0.5)))) for q in QUANTILE_LEVELS]


def _statsforecast_model(name: str, season_length: int):
    import statsforecast.models as sf_models

    cls = getattr(sf_models, STATSFORECAST_MODELS[name])
    return cls() if name == "naive" else cls(season_length=season_length)


def _statsforecast_quantiles(name: str, season_length: int, context: np.ndarray, horizon: int) -> np.ndarray:
    """[9, horizon] quantiles of one series from a statsforecast model's prediction intervals.

    A model that fails to fit (AutoETS on a degenerate series, say) falls back to SeasonalNaive,
    as statsforecast's own ``fallback_model`` would.
    """
    pairs = _interval_levels()
    levels = sorted({lv for _, lv in pairs if lv > 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = _statsforecast_model(name, season_length).forecast(y=context, h=horizon, level=levels)
        except Exception:  # noqa: BLE001 - any fitting failure takes the documented fallback
            if name == "seasonal_naive":
                raise
            out = _statsforecast_model("seasonal_naive", season_length).forecast(y=context, h=horizon, level=levels)
    rows = []
    for q, lv in pairs:
        key = "mean" if lv == 0 else (f"lo-{lv}" if q < 0.5 else f"hi-{lv}")
        rows.append(np.asarray(out[key], dtype=np.float64))
    return np.stack(rows)


def _quantiles_of_chunk(args) -> list[np.ndarray]:
    name, season_length, contexts, horizon = args
    return [_statsforecast_quantiles(name, season_length, c, horizon) for c in contexts]


class StatsForecastBaseline:
    """A statsforecast model as a forecaster: one fit per series, ``n_jobs`` processes."""

    def __init__(self, name: str, season_length: int = 1, n_jobs: int = 1):
        if name not in STATSFORECAST_MODELS:
            raise InputError(f"baseline {name!r} is not a statsforecast baseline; "
                             f"known: {', '.join(STATSFORECAST_MODELS)}")
        try:
            import statsforecast  # noqa: F401
        except ImportError:
            raise BaselineUnavailable(f"baseline {name!r} needs the statsforecast package "
                                      "(pip install statsforecast)") from None
        self.name = name
        self.season_length = int(season_length)
        self.n_jobs = max(1, int(n_jobs))
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    @property
    def cache_key(self) -> str:
        return f"statsforecast-{metadata.version('statsforecast')}/{self.name}-m{self.season_length}"

    def predict(self, context: list[np.ndarray], horizon: int) -> np.ndarray:
        if self.n_jobs == 1 or len(context) < 2 * self.n_jobs:
            return np.stack(_quantiles_of_chunk((self.name, self.season_length, context, horizon)))
        if self._pool is None:
            # spawn, not fork: the parent may hold torch threads, which fork does not copy safely.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.n_jobs, mp_context=multiprocessing.get_context("spawn"))
        chunks = np.array_split(np.arange(len(context)), self.n_jobs * 4)
        jobs = [(self.name, self.season_length, [context[i] for i in chunk], horizon)
                for chunk in chunks if len(chunk)]
        results = [q for part in self._pool.map(_quantiles_of_chunk, jobs) for q in part]
        return np.stack(results)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        self.close()


class FracastForecaster:
    """Fracast-0 (PyPI ``fracast``, weights bundled in the wheel) as a forecaster."""

    MIN_POINTS = 8  # fracast refuses contexts with fewer finite points

    def __init__(self, device: str = "cpu"):
        try:
            from fracast import FracastModel
        except ImportError:
            raise BaselineUnavailable("baseline 'fracast' needs the fracast package "
                                      "(pip install fracast, or pip install -e .[peers])") from None
        self.model = FracastModel.from_pretrained(device=device)
        model_levels = tuple(round(q, 3) for q in self.model.quantiles)
        if model_levels != QUANTILE_LEVELS:
            raise RuntimeError(f"fracast predicts quantiles {model_levels}, expected {QUANTILE_LEVELS}")

    @property
    def cache_key(self) -> str:
        return f"fracast-{metadata.version('fracast')}"

    def predict(self, context: list[np.ndarray], horizon: int) -> np.ndarray:
        window = self.model.context_length
        length = max(self.MIN_POINTS, min(window, max(len(c) for c in context)))
        batch = np.full((len(context), length), np.nan, dtype=np.float32)
        for row, values in enumerate(context):
            values = np.asarray(values[-length:], dtype=np.float32)
            if len(values) < self.MIN_POINTS:  # repeat the first value back to the minimum length
                values = np.concatenate([np.full(self.MIN_POINTS - len(values), values[0]), values])
            batch[row, length - len(values):] = values  # left-pad with NaN: fracast masks it
        forecast = self.model.forecast_batch(batch, horizon=horizon)  # [B, H, Q]
        return np.transpose(np.asarray(forecast, dtype=np.float64), (0, 2, 1))


def make_baseline(name: str, season_length: int = 1, n_jobs: int = 1):
    """A baseline forecaster by name (see BASELINE_NAMES)."""
    if name in STATSFORECAST_MODELS:
        return StatsForecastBaseline(name, season_length, n_jobs)
    if name == "fracast":
        return FracastForecaster()
    raise InputError(f"--baseline {name!r}: unknown; expected one of {', '.join(BASELINE_NAMES)}")


def baseline_factory(name: str, n_jobs: int = 1) -> Callable[[int], object]:
    """``season_length -> forecaster`` for ``name``; one instance per season length."""
    made: dict[int, object] = {}
    if name not in BASELINE_NAMES:
        raise InputError(f"--baseline {name!r}: unknown; expected one of {', '.join(BASELINE_NAMES)}")
    if name == "fracast":  # season-free: load the weights once
        shared = FracastForecaster()
        return lambda season_length: shared

    def factory(season_length: int):
        if season_length not in made:
            made[season_length] = make_baseline(name, season_length, n_jobs)
        return made[season_length]

    return factory


def default_cache_dir() -> Path:
    """$TIMERS1_CACHE_DIR, else $XDG_CACHE_HOME/timers1, else ~/.cache/timers1."""
    if os.environ.get("TIMERS1_CACHE_DIR"):
        return Path(os.environ["TIMERS1_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "timers1"


class ForecastCache:
    """Quantile forecasts on disk: <dir>/forecasts/<cache_key>/<task hash>.npy."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def _path(self, cache_key: str, task_hash: str) -> Path:
        safe_key = re.sub(r"[^A-Za-z0-9._=+-]+", "_", cache_key)
        return self.directory / "forecasts" / safe_key / f"{task_hash}.npy"

    def load(self, cache_key: str, task_hash: str) -> np.ndarray | None:
        path = self._path(cache_key, task_hash)
        if not path.is_file():
            return None
        try:
            return np.load(path)
        except (OSError, ValueError):  # a torn write: recompute
            return None

    def store(self, cache_key: str, task_hash: str, forecasts: np.ndarray) -> None:
        path = self._path(cache_key, task_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, forecasts)
        os.replace(tmp, path)  # atomic: concurrent runs never read half a file
