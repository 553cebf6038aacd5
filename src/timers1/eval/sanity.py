"""The sanity suite: series whose future is obvious to a person, scored for any forecaster.

A model can score well on a benchmark's averages and still bend a plain trend the wrong way.
Each pattern here is a noise-free truth plus noise, a few fixed seeds each; a model passes a
pattern when, pooled over its seeds,

- ``rel_mase`` < 1: MASE of the forecast median **against the noise-free truth** over the
  horizon, divided by the same MASE of seasonal naive on the same series. Every pattern is
  scored against its truth, not against the noisy future GIFT-Eval would use: with three seeds
  the noise in the labels alone can flip a verdict, and the truth is what "obvious" means.
  The scale of MASE is the seasonal error of the observed history (the GIFT-Eval scale).
- ``coverage_10_90`` >= 0.5: the truth lies inside the 10-90% quantile band on most horizon
  steps (inclusive bounds).

The seasonal-naive reference uses each pattern's own period as its season (1 where there is
none: then it is naive), not the frequency's GIFT default (which is 1 for daily data, 24 for
hourly): a reference that already knows the season is the one an obvious forecast must beat.
Seasonal naive itself scores ``rel_mase`` = 1 and so fails every pattern by construction.

Intermittent demand: the truth is the expected demand per step (occurrence probability x mean
size), a constant. Against the realised counts, MAE rewards a median of 0 and punishes a
forecast at the rate, and seasonal naive copies last week's spikes; against the expected rate
both a median of 0 and a median at the rate beat copying spikes, and the band check asks what a
person expects: from 0 up to a few units, containing the rate.

Scoring a model is 21 short series in one batch per pattern: a second or two on 2 CPU cores.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from timers1.eval.baselines import baseline_factory
from timers1.eval.forecaster import predict_batched
from timers1.eval.metrics import MEDIAN_INDEX, QUANTILE_LEVELS, mase, seasonal_error
from timers1.eval.runner import ForecasterSource, json_safe, resolve_forecaster

SEEDS = (0, 1, 2)
MAX_REL_MASE = 1.0
"""Pass: rel_mase strictly below this (better than seasonal naive)."""
MIN_COVERAGE = 0.5
"""Pass: the truth inside the 10-90% band on at least this fraction of horizon steps."""
LOW_INDEX, HIGH_INDEX = QUANTILE_LEVELS.index(0.1), QUANTILE_LEVELS.index(0.9)


@dataclass(frozen=True)
class SanitySeries:
    """One seeded draw of a pattern: ``observed`` = ``truth`` + noise over history + horizon."""

    pattern: str
    seed: int
    truth: np.ndarray
    observed: np.ndarray
    horizon: int

    @property
    def history(self) -> np.ndarray:
        """What the forecaster sees."""
        return self.observed[:-self.horizon]

    @property
    def truth_future(self) -> np.ndarray:
        """What the median is scored against and the band must contain."""
        return self.truth[-self.horizon:]


@dataclass(frozen=True)
class SanityPattern:
    name: str
    description: str
    freq: str
    history_points: int
    horizon: int
    seasonality: int
    """Season of the seasonal-naive reference and of the MASE scale: the pattern's own period."""
    draw: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    """(time index 0..history+horizon-1, rng) -> (truth, observed)."""

    def series(self, seed: int) -> SanitySeries:
        # Seeded by the pattern's name, not its position: adding a pattern changes no other.
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), seed])
        t = np.arange(self.history_points + self.horizon, dtype=np.float64)
        truth, observed = self.draw(t, rng)
        return SanitySeries(self.name, seed, truth, observed, self.horizon)


def _additive(truth: np.ndarray, rng: np.random.Generator, noise_std: float) -> tuple[np.ndarray, np.ndarray]:
    return truth, truth + noise_std * rng.standard_normal(truth.shape)


def _trend_weekly(t, rng):
    return _additive(10 + 0.05 * t + 3 * np.sin(2 * np.pi * t / 7), rng, 1.0)


LEVEL_SHIFT_AT = 240


def _level_shift(t, rng):
    return _additive(np.where(t < LEVEL_SHIFT_AT, 10.0, 20.0), rng, 1.0)


def _exponential_growth(t, rng):
    truth = 100 * 1.02 ** t
    # Multiplicative noise, median 1: a growing series' noise grows with it.
    return truth, truth * np.exp(0.03 * rng.standard_normal(t.shape))


INTERMITTENT_OCCURRENCE = 0.2
INTERMITTENT_MEAN_SIZE = 3.0  # 1 + Poisson(2): an order is at least one unit


def _intermittent(t, rng):
    occurs = rng.random(t.shape) < INTERMITTENT_OCCURRENCE
    sizes = 1 + rng.poisson(INTERMITTENT_MEAN_SIZE - 1, t.shape)
    truth = np.full(t.shape, INTERMITTENT_OCCURRENCE * INTERMITTENT_MEAN_SIZE)
    return truth, np.where(occurs, sizes, 0).astype(np.float64)


def _long_sine(t, rng):
    return _additive(5 + 2 * np.sin(2 * np.pi * t / 50), rng, 0.5)


def _linear_trend(t, rng):
    return _additive(20 + 0.1 * t, rng, 1.0)


def _saturating(t, rng):
    return _additive(50 / (1 + np.exp(-(t - 150) / 30)), rng, 0.5)


PATTERNS: tuple[SanityPattern, ...] = (
    SanityPattern("trend_weekly", "10 + 0.05 t + 3 sin(2 pi t / 7) + N(0, 1), daily", "D", 400, 60, 7,
                  _trend_weekly),
    SanityPattern("level_shift", f"10, then 20 from t = {LEVEL_SHIFT_AT}, + N(0, 1), daily", "D", 300, 30, 1,
                  _level_shift),
    SanityPattern("exponential_growth", "100 x 1.02^t x lognormal(0, 0.03), monthly", "M", 120, 24, 1,
                  _exponential_growth),
    SanityPattern("intermittent", f"Bernoulli({INTERMITTENT_OCCURRENCE}) x (1 + Poisson(2)) demand, daily; "
                  "truth = expected demand 0.6", "D", 365, 30, 7, _intermittent),
    SanityPattern("long_sine", "5 + 2 sin(2 pi t / 50) + N(0, 0.5^2), hourly", "H", 500, 100, 50, _long_sine),
    SanityPattern("linear_trend", "20 + 0.1 t + N(0, 1), daily", "D", 200, 30, 1, _linear_trend),
    SanityPattern("saturating", "50 / (1 + exp(-(t - 150) / 30)) + N(0, 0.5^2), daily", "D", 240, 60, 1,
                  _saturating),
)


def pattern_series(pattern: SanityPattern, seeds=SEEDS) -> list[SanitySeries]:
    return [pattern.series(seed) for seed in seeds]


def band_coverage(truth: np.ndarray, quantiles: np.ndarray) -> float:
    """Fraction of (series, step) where q0.1 <= truth <= q0.9; ``quantiles`` is [N, 9, H]."""
    low, high = quantiles[:, LOW_INDEX, :], quantiles[:, HIGH_INDEX, :]
    return float(((low <= truth) & (truth <= high)).mean())


@dataclass
class PatternResult:
    pattern: str
    description: str
    freq: str
    horizon: int
    seasonality: int
    num_series: int
    MASE: float
    seasonal_naive_MASE: float
    rel_mase: float
    coverage_10_90: float
    passed: bool


@dataclass
class SanityReport:
    model: str
    results: list[PatternResult]
    settings: dict = field(default_factory=dict)
    forecasts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Pattern -> quantiles [seeds, 9, H], for the plot; not saved."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings,
                "pass_rule": {"rel_mase_below": MAX_REL_MASE, "coverage_10_90_at_least": MIN_COVERAGE,
                              "scored_against": "noise-free truth",
                              "reference": "seasonal naive at the pattern's own period"},
                "patterns": [asdict(r) for r in self.results],
                "num_passed": sum(r.passed for r in self.results), "passed": self.passed}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(self.to_dict()), indent=2) + "\n")

    def format_table(self) -> str:
        header = (f"{'pattern':<20} {'freq':>4} {'H':>4} {'m':>3} {'MASE':>8} {'naive MASE':>10} "
                  f"{'rel MASE':>9} {'cover':>6}  result")
        lines = [f"sanity suite: {self.model}",
                 f"scored against the noise-free truth, {len(SEEDS)} seeds per pattern; m: season of the "
                 f"seasonal-naive reference; pass: rel MASE < {MAX_REL_MASE:g} and the truth inside the "
                 f"10-90% band on >= {MIN_COVERAGE:.0%} of the horizon (cover)",
                 header, "-" * len(header)]
        for r in self.results:
            lines.append(f"{r.pattern:<20} {r.freq:>4} {r.horizon:>4} {r.seasonality:>3} {r.MASE:>8.3f} "
                         f"{r.seasonal_naive_MASE:>10.3f} {r.rel_mase:>9.3f} {r.coverage_10_90:>6.2f}  "
                         f"{'pass' if r.passed else 'FAIL'}")
        lines.append("-" * len(header))
        lines.append(f"passed {sum(r.passed for r in self.results)} of {len(self.results)} patterns")
        return "\n".join(lines)


def evaluate_sanity(source: ForecasterSource, *, model_name: str = "model", batch_size: int = 64,
                    max_context_points: int | None = None,
                    patterns: tuple[SanityPattern, ...] = PATTERNS) -> SanityReport:
    """Score ``source`` (a forecaster, or a season -> forecaster factory) on every pattern.

    ``max_context_points`` truncates what the forecaster sees; the reference always sees it all.
    """
    reference = baseline_factory("seasonal_naive")
    results, forecasts = [], {}
    for pattern in patterns:
        drawn = pattern_series(pattern)
        histories = [s.history for s in drawn]
        truth = np.stack([s.truth_future for s in drawn])
        scales = np.array([seasonal_error(h, pattern.seasonality) for h in histories])
        quantiles = predict_batched(resolve_forecaster(source, pattern.seasonality), histories, pattern.horizon,
                                    batch_size=batch_size, max_context_points=max_context_points)
        naive = predict_batched(reference(pattern.seasonality), histories, pattern.horizon)
        model_mase = mase(truth, quantiles[:, MEDIAN_INDEX, :], scales)
        naive_mase = mase(truth, naive[:, MEDIAN_INDEX, :], scales)
        rel_mase = model_mase / naive_mase
        coverage = band_coverage(truth, quantiles)
        results.append(PatternResult(
            pattern=pattern.name, description=pattern.description, freq=pattern.freq, horizon=pattern.horizon,
            seasonality=pattern.seasonality, num_series=len(drawn), MASE=model_mase,
            seasonal_naive_MASE=naive_mase, rel_mase=rel_mase, coverage_10_90=coverage,
            passed=bool(rel_mase < MAX_REL_MASE and coverage >= MIN_COVERAGE)))  # NaN fails both
        forecasts[pattern.name] = quantiles
    settings = {"batch_size": batch_size, "max_context_points": max_context_points or 0, "seeds": list(SEEDS)}
    return SanityReport(model=model_name, results=results, settings=settings, forecasts=forecasts)


def plot_sanity(report: SanityReport, path: str | Path, patterns: tuple[SanityPattern, ...] = PATTERNS) -> None:
    """PNG grid, a row per pattern and a column per seed: history, truth, median, 10-90% band."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    by_name = {r.pattern: r for r in report.results}
    shown = [p for p in patterns if p.name in report.forecasts]
    fig, axes = plt.subplots(len(shown), len(SEEDS), figsize=(4.2 * len(SEEDS), 2.3 * len(shown)), squeeze=False)
    for row, pattern in zip(axes, shown):
        result = by_name[pattern.name]
        for ax, series, quantiles in zip(row, pattern_series(pattern), report.forecasts[pattern.name]):
            # Enough history to judge the pattern: three horizons, and two periods of a season.
            keep = min(pattern.history_points, max(3 * pattern.horizon, 2 * pattern.seasonality))
            t = np.arange(len(series.truth))
            past, future = t[pattern.history_points - keep:pattern.history_points], t[pattern.history_points:]
            ax.plot(past, series.history[-keep:], color="0.55", lw=0.8, label="observed")
            ax.plot(t[pattern.history_points - keep:], series.truth[pattern.history_points - keep:],
                    color="black", lw=1, ls="--", label="truth")
            ax.fill_between(future, quantiles[LOW_INDEX], quantiles[HIGH_INDEX], color="tab:blue", alpha=0.25,
                            label="10-90%")
            ax.plot(future, quantiles[MEDIAN_INDEX], color="tab:blue", lw=1.5, label="median")
            ax.axvline(pattern.history_points - 0.5, color="0.8", lw=0.8)
            verdict = "pass" if result.passed else "FAIL"
            ax.set_title(f"{pattern.name} seed {series.seed}: {verdict} (rel MASE {result.rel_mase:.2f}, "
                         f"cover {result.coverage_10_90:.2f})", fontsize=8, loc="left")
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=2)
    fig.suptitle(f"sanity suite: {report.model}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
