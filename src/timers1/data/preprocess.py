"""Series cleaning before a series enters a corpus (Timer-S1 paper, section 4.1).

Order per series: trim leading/trailing missing values -> outlier removal (k-sigma and/or IQR
on a trailing moving window; outliers become missing) -> causal mean imputation -> length
filter -> optional autoregressive-structure filter. Every drop has a reason, and the builder
counts reasons in its summary; nothing is dropped silently.

"Causal" means a value at time t is judged or filled only from points before t, so cleaning
never leaks the future into the past: the window statistics for point t use points
[t - window, t), and an imputed value is the mean of the observed points in that window
(falling back to the mean of all earlier observed points after a gap longer than the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from timers1.errors import InputError

OUTLIER_METHODS = ("none", "ksigma", "iqr", "both")


@dataclass
class PreprocessConfig:
    """How one source's series are cleaned."""

    outliers: str = "none"
    """'none', 'ksigma', 'iqr' or 'both'."""
    k_sigma: float = 4.0
    """A point further than this many trailing-window standard deviations from the window mean is an outlier."""
    iqr_k: float = 3.0
    """A point further than this many IQRs outside the trailing window's quartiles is an outlier."""
    window_points: int = 64
    """Trailing window for outlier statistics and imputation means."""
    min_window_points: int = 16
    """Outlier tests need at least this many observed points in the window."""
    impute: bool = True
    """Fill missing values causally; when False a series with any gap is dropped."""
    min_length_points: int = 32
    """Series shorter than this after cleaning are dropped."""
    min_abs_lag1_autocorr: float = 0.0
    """Drop series whose |lag-1 autocorrelation| is below this (no autoregressive structure); 0 keeps all."""

    def validate(self, where: str = "preprocess") -> "PreprocessConfig":
        if self.outliers not in OUTLIER_METHODS:
            raise InputError(f"{where}.outliers={self.outliers!r}: must be one of {', '.join(OUTLIER_METHODS)}")
        for name in ("k_sigma", "iqr_k"):
            if getattr(self, name) <= 0:
                raise InputError(f"{where}.{name}={getattr(self, name)!r}: must be > 0")
        if self.window_points < 2 or self.min_window_points < 2 or self.min_window_points > self.window_points:
            raise InputError(f"{where}.window_points={self.window_points!r}, min_window_points="
                             f"{self.min_window_points!r}: need 2 <= min_window_points <= window_points")
        if self.min_length_points < 1:
            raise InputError(f"{where}.min_length_points={self.min_length_points!r}: must be >= 1")
        if not 0.0 <= self.min_abs_lag1_autocorr <= 1.0:
            raise InputError(f"{where}.min_abs_lag1_autocorr={self.min_abs_lag1_autocorr!r}: must be in [0, 1]")
        return self


@dataclass
class CleanResult:
    values: np.ndarray | None
    """float32 cleaned series, or None when dropped."""
    drop_reason: str = ""
    """'' (kept), 'all_missing', 'too_short', 'has_missing' or 'no_autocorrelation'."""
    outliers_removed: int = 0
    imputed: int = 0


def _trailing_windows(x: np.ndarray, window: int) -> np.ndarray:
    """[n, window] view whose row t holds x[t - window : t] (NaN before the start)."""
    padded = np.concatenate([np.full(window, np.nan, dtype=x.dtype), x[:-1]]) if len(x) else x
    return sliding_window_view(padded, window)[: len(x)]


def outlier_mask(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """True where x[t] is an outlier against its trailing window (NaNs in x are ignored)."""
    if cfg.outliers == "none" or len(x) <= cfg.min_window_points:
        return np.zeros(len(x), dtype=bool)
    windows = _trailing_windows(x.astype(np.float64), cfg.window_points)
    observed = np.isfinite(windows)
    count = observed.sum(axis=1)
    enough = count >= cfg.min_window_points
    mask = np.zeros(len(x), dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        if cfg.outliers in ("ksigma", "both"):
            mean = np.nanmean(np.where(enough[:, None], windows, 0.0), axis=1)
            std = np.nanstd(np.where(enough[:, None], windows, 0.0), axis=1)
            # A flat window has std 0: any change would be an "outlier"; require a real spread.
            mask |= enough & (std > 0) & (np.abs(x - mean) > cfg.k_sigma * std)
        if cfg.outliers in ("iqr", "both"):
            rows = np.flatnonzero(enough)
            if rows.size:
                q1, q3 = np.nanpercentile(windows[rows], [25, 75], axis=1)
                iqr = q3 - q1
                xr = x[rows]
                hit = (iqr > 0) & ((xr < q1 - cfg.iqr_k * iqr) | (xr > q3 + cfg.iqr_k * iqr))
                mask[rows[hit]] = True
    return mask & np.isfinite(x)


def causal_mean_impute(x: np.ndarray, window: int) -> tuple[np.ndarray, int]:
    """Fill NaNs with the mean of the observed points among the previous ``window`` positions.

    Imputed values never feed later imputations (the means use observed points only). A gap
    longer than the window falls back to the mean of all earlier observed points. Leading NaNs
    must have been trimmed (there is no past to fill them from).
    """
    missing = ~np.isfinite(x)
    n_missing = int(missing.sum())
    if n_missing == 0:
        return x, 0
    filled = np.where(missing, 0.0, x.astype(np.float64))
    csum = np.concatenate([[0.0], np.cumsum(filled)])
    ccount = np.concatenate([[0], np.cumsum(~missing)])
    t = np.flatnonzero(missing)
    lo = np.maximum(t - window, 0)
    win_sum, win_count = csum[t] - csum[lo], ccount[t] - ccount[lo]
    all_sum, all_count = csum[t], ccount[t]
    with np.errstate(invalid="ignore", divide="ignore"):
        fill = np.where(win_count > 0, win_sum / np.maximum(win_count, 1), all_sum / np.maximum(all_count, 1))
    out = x.astype(np.float64).copy()
    out[t] = fill
    return out, n_missing


def lag1_autocorr(x: np.ndarray) -> float:
    if len(x) < 3:
        return 0.0
    d = x - x.mean()
    denom = float((d * d).sum())
    return float((d[1:] * d[:-1]).sum() / denom) if denom > 0 else 0.0


def clean_series(values: np.ndarray, cfg: PreprocessConfig) -> CleanResult:
    """Apply the cleaning pipeline to one series (see the module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    x = np.where(np.isfinite(x), x, np.nan)
    finite = np.flatnonzero(np.isfinite(x))
    if finite.size == 0:
        return CleanResult(None, "all_missing")
    x = x[finite[0]: finite[-1] + 1]
    if len(x) < cfg.min_length_points:
        return CleanResult(None, "too_short")
    outliers = outlier_mask(x, cfg)
    n_outliers = int(outliers.sum())
    if n_outliers:
        x = np.where(outliers, np.nan, x)
    if not cfg.impute and not np.isfinite(x).all():
        return CleanResult(None, "has_missing", n_outliers)
    x, n_imputed = causal_mean_impute(x, cfg.window_points)
    if cfg.min_abs_lag1_autocorr > 0 and abs(lag1_autocorr(x)) < cfg.min_abs_lag1_autocorr:
        return CleanResult(None, "no_autocorrelation", n_outliers, n_imputed)
    out = x.astype(np.float32)
    if not np.isfinite(out).all():  # values beyond float32 range
        return CleanResult(None, "not_finite_float32", n_outliers, n_imputed)
    return CleanResult(out, "", n_outliers, n_imputed)
