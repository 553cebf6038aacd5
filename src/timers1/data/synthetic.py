"""Synthetic series generators, deterministic for a seed.

Families (the source name of a generated series is ``synthetic.<family>``):

- ``kernelsynth``: Chronos' KernelSynth. Draw 1-5 kernels from a bank (linear, RBF, rational
  quadratic, periodic at calendar periods, white noise, constant), combine them with random
  + and x, and sample a Gaussian process on a grid of at most 1,024 points (longer series are
  interpolated from it; the Cholesky factor is what costs).
- ``canonical``: the Timer-S1 canonical signals (linear, sine, exponential, power, impulse,
  step) and their additive and multiplicative mixes, plus noise.
- ``hourly``: daily (24) and weekly (168) cycles with harmonics, weekday/weekend profiles,
  trend, AR(1) noise; some non-negative like load or traffic, some multiplicative.
- ``seasonal``: calendar seasonality for other frequencies (7, 12, 4, 52, 48/336, 96/672, 365).
- ``profile``: a random shape over one calendar period (smoothed noise, a few peaks, or one
  value per season like a monthly pattern) repeated with slowly drifting amplitude and shape,
  day-of-week factors on sub-daily data, level shifts, trend and noise, optionally positive or
  integer counts. Sinusoids alone never look like a load curve or a sales calendar; this is
  what teaches the model to carry an arbitrary seasonal shape forward, as seasonal naive does.
- ``growth``: short low-frequency series (yearly, quarterly, monthly, weekly) as economies and
  businesses make them: a level growing or shrinking at a drifting rate (multiplicative random
  walk with drift, damping or a turning point), calendar seasonality where the frequency has
  one, and noise. A short window cut from a long high-frequency series is most often a piece
  of a cycle that turns back; a short real series is most often a trend that goes on. Without
  this family the model's prior for short contexts is mean reversion.
- ``trend``: linear, exponential, damped, logistic and piecewise-linear trends with noise.
- ``intermittent``: sparse demand (Bernoulli occurrence x Poisson or gamma sizes), some
  seasonal; integer-valued like retail sales.
- ``random_walk``: Gaussian random walks with and without drift, geometric walks, OU processes.
- ``arma``: stationary AR(1-3)/ARMA processes with random roots, and GARCH-like volatility.

Every series comes from its own generator seeded by (seed, family, index), so a series does not
depend on how many others were generated or in which order.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.signal import lfilter

FAMILIES = ("kernelsynth", "canonical", "hourly", "seasonal", "profile", "growth", "trend",
            "intermittent", "random_walk", "arma")
# The Cholesky factor is O(grid^3): 512 points cost ~20 ms here, 1,024 ~160 ms. Longer series
# are linearly interpolated from the grid.
KERNELSYNTH_MAX_GRID = 512
# Periods (in steps) a calendar gives to hourly, daily, weekly, monthly, quarterly, 15- and
# 30-minute data; the kernel bank and the seasonal family both draw from them.
CALENDAR_PERIODS = (24, 168, 7, 30.44, 365.25, 12, 4, 52.18, 48, 336, 96, 672, 60)
FREQ_OF_PERIOD = {24: "H", 168: "H", 7: "D", 365.25: "D", 12: "M", 4: "Q", 52.18: "W",
                  48: "30min", 336: "30min", 96: "15min", 672: "15min", 60: "min"}


def family_rng(seed: int, family: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(family.encode()), index])


# ---------------------------------------------------------------------------------------------
# KernelSynth

def _kernel(rng: np.random.Generator, t: np.ndarray, n_points: int) -> np.ndarray:
    """One random kernel matrix on the grid t (in [0, 1])."""
    kind = rng.choice(["linear", "rbf", "rq", "periodic", "periodic", "periodic", "white", "const"])
    d = t[:, None] - t[None, :]
    if kind == "linear":
        c = rng.uniform(0, 1)
        return rng.uniform(0.1, 1.0) * (t[:, None] - c) * (t[None, :] - c)
    if kind == "rbf":
        length = rng.choice([0.01, 0.05, 0.1, 0.3, 1.0])
        return np.exp(-0.5 * (d / length) ** 2)
    if kind == "rq":
        length, alpha = rng.choice([0.05, 0.1, 0.5, 1.0]), rng.choice([0.1, 1.0, 10.0])
        return (1 + d**2 / (2 * alpha * length**2)) ** (-alpha)
    if kind == "periodic":
        period_steps = float(rng.choice(CALENDAR_PERIODS))
        period = period_steps / n_points
        length = rng.choice([0.5, 1.0, 2.0])
        return np.exp(-2 * np.sin(np.pi * np.abs(d) / period) ** 2 / length**2)
    if kind == "white":
        return rng.uniform(0.01, 0.2) * np.eye(len(t))
    return rng.uniform(0.1, 1.0) * np.ones_like(d)


def kernelsynth(rng: np.random.Generator, n_points: int) -> np.ndarray:
    grid = min(n_points, KERNELSYNTH_MAX_GRID)
    t = np.linspace(0, 1, grid)
    cov = _kernel(rng, t, grid)
    for _ in range(rng.integers(0, 5)):
        other = _kernel(rng, t, grid)
        cov = cov + other if rng.random() < 0.5 else cov * other
    noise = rng.standard_normal(grid)
    scale = float(np.mean(np.diag(cov))) or 1.0
    # Products of smooth kernels are numerically singular; more jitter is cheaper than eigh.
    for jitter in (1e-6, 1e-4, 1e-2):
        try:
            sample = np.linalg.cholesky(cov + jitter * scale * np.eye(grid)) @ noise
            break
        except np.linalg.LinAlgError:
            continue
    else:
        sample = noise * np.sqrt(scale)
    if grid < n_points:
        sample = np.interp(np.linspace(0, grid - 1, n_points), np.arange(grid), sample)
    return sample


# ---------------------------------------------------------------------------------------------
# Canonical signals and their mixes

def _canonical_component(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    kind = rng.choice(["linear", "sine", "exponential", "power", "impulse", "step"])
    if kind == "linear":
        return rng.normal(0, 1) + rng.normal(0, 2) * t / n
    if kind == "sine":
        period = float(rng.choice(CALENDAR_PERIODS)) if rng.random() < 0.7 else rng.uniform(4, n / 2)
        return rng.uniform(0.3, 2) * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    if kind == "exponential":
        return np.exp(rng.uniform(-3, 3) * t / n)
    if kind == "power":
        return (1 + t / n) ** rng.uniform(-2, 3)
    if kind == "impulse":
        out = np.zeros(n)
        if rng.random() < 0.5:  # periodic impulses (e.g. a monthly event in daily data)
            period = int(rng.choice([7, 12, 24, 30, 52, 168]))
            out[rng.integers(0, period)::period] = rng.uniform(1, 5)
        else:
            out[rng.integers(0, n, size=rng.integers(1, 6))] = rng.uniform(1, 5)
        return out
    out = np.zeros(n)
    for pos in rng.integers(1, n, size=rng.integers(1, 4)):
        out[pos:] += rng.normal(0, 1.5)
    return out


def canonical(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _canonical_component(rng, n)
    for _ in range(rng.integers(0, 3)):
        other = _canonical_component(rng, n)
        if rng.random() < 0.6:
            x = x + other
        else:  # multiplicative mix: scale one component by (1 + normalized other)
            x = x * (1 + 0.5 * other / (np.abs(other).max() + 1e-9))
    return x + rng.uniform(0, 0.1) * (np.abs(x).std() + 1e-3) * rng.standard_normal(n)


# ---------------------------------------------------------------------------------------------
# Calendar-seasonal families

def _harmonics(rng: np.random.Generator, t: np.ndarray, period: float, max_order: int) -> np.ndarray:
    out = np.zeros_like(t)
    for order in range(1, rng.integers(1, max_order + 1) + 1):
        amp = rng.normal(0, 1) / order
        out += amp * np.sin(2 * np.pi * order * t / period + rng.uniform(0, 2 * np.pi))
    return out


def _ar1_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    phi = rng.uniform(0, 0.9)
    return scale * lfilter([1.0], [1.0, -phi], rng.standard_normal(n)) * np.sqrt(1 - phi**2)


def _trend(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / n
    return rng.normal(0, 1) * t + (rng.normal(0, 0.5) * t**2 if rng.random() < 0.3 else 0)


def hourly(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    daily = _harmonics(rng, t, 24, 4)
    weekly = _harmonics(rng, t, 168, 3) * rng.uniform(0, 0.8)
    hour_of_week = (t + rng.integers(0, 168)) % 168
    weekend = hour_of_week >= 120
    weekend_scale = np.where(weekend, rng.uniform(0.3, 1.1), 1.0)
    season = (daily + weekly) * weekend_scale
    if n > 24 * 365 and rng.random() < 0.5:
        season += _harmonics(rng, t, 24 * 365.25, 2)
    trend = _trend(rng, n) * rng.uniform(0, 2)
    noise = _ar1_noise(rng, n, rng.uniform(0.05, 0.5))
    if rng.random() < 0.4:  # multiplicative seasonality, positive like load or traffic
        level = np.exp(0.3 * trend)
        x = level * (1.5 + np.tanh(season)) * (1 + 0.1 * noise)
    else:
        x = season + trend + noise
    if rng.random() < 0.3:  # clipped at zero, like solar output or occupancy
        x = np.maximum(x - np.quantile(x, rng.uniform(0.2, 0.5)), 0)
    return x


def seasonal(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    t = np.arange(n, dtype=np.float64)
    options = [(7, 365.25), (12, None), (4, None), (52.18, None), (48, 336), (96, 672), (60, 1440)]
    primary, secondary = options[rng.integers(0, len(options))]
    x = _harmonics(rng, t, primary, 4)
    if secondary is not None and n > secondary:
        x += _harmonics(rng, t, secondary, 2) * rng.uniform(0.2, 1.5)
    x += _trend(rng, n) * rng.uniform(0, 3) + _ar1_noise(rng, n, rng.uniform(0.05, 0.6))
    if rng.random() < 0.3:
        x = np.exp(0.5 * x / (np.abs(x).max() + 1e-9))
    return x, FREQ_OF_PERIOD.get(primary, "")


# (period, steps per day or None, freq): the calendars a profile series is drawn on.
PROFILE_CALENDARS = ((24, 24, "H"), (24, 24, "H"), (48, 48, "30min"), (96, 96, "15min"),
                     (7, 1, "D"), (12, None, "M"), (12, None, "M"), (4, None, "Q"), (52, None, "W"),
                     (13, None, "W"))


def _circular_bump(period: int, center: float, width: float) -> np.ndarray:
    """A Gaussian bump on a circle of ``period`` steps (it wraps from the last step to the first)."""
    dist = np.abs(np.arange(period) - center)
    return np.exp(-0.5 * (np.minimum(dist, period - dist) / max(width, 0.5)) ** 2)


def _profile_shape(rng: np.random.Generator, period: int) -> np.ndarray:
    """One period of a seasonal shape, zero mean and unit std."""
    kind = rng.choice(["smooth", "peaks", "steps"])
    if kind == "smooth":  # circularly smoothed noise: broad irregular shapes
        kernel = _circular_bump(period, 0.0, rng.uniform(0.03, 0.25) * period)
        shape = np.real(np.fft.ifft(np.fft.fft(rng.standard_normal(period)) * np.fft.fft(kernel)))
    elif kind == "peaks":  # a few bumps, like morning and evening load peaks
        shape = np.zeros(period)
        for _ in range(rng.integers(1, 4)):
            center, width = rng.uniform(0, period), rng.uniform(0.03, 0.2) * period
            shape += rng.uniform(0.3, 1.0) * _circular_bump(period, center, width)
        if rng.random() < 0.3:
            shape = -shape  # troughs instead of peaks
    else:  # one free value per season (a monthly or quarterly calendar)
        shape = rng.standard_normal(period)
    shape = shape - shape.mean()
    return shape / (shape.std() + 1e-9)


def profile(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    period, per_day, freq = PROFILE_CALENDARS[rng.integers(0, len(PROFILE_CALENDARS))]
    t = np.arange(n)
    phase = (t + rng.integers(0, period)) % period
    # The shape drifts from one template to another over the series.
    drift = np.clip(t / max(n - 1, 1) * rng.uniform(0, 1.0), 0, 1)
    start_shape, end_shape = _profile_shape(rng, period), _profile_shape(rng, period)
    season = (1 - drift) * start_shape[phase] + drift * end_shape[phase]
    if per_day is not None and per_day > 1 and rng.random() < 0.7:
        # Day-of-week factors: weekends (or any days) run at another level and amplitude.
        day = ((t + rng.integers(0, 7 * per_day)) // per_day) % 7
        day_scale = np.exp(rng.normal(0, 0.25, size=7))
        if rng.random() < 0.6:
            day_scale[5:] *= rng.uniform(0.3, 0.9)
        season = season * day_scale[day] + rng.normal(0, 0.3) * (day_scale[day] - day_scale.mean())
    amplitude = np.exp(np.cumsum(rng.normal(0, rng.uniform(0, 0.02), size=n)))
    level = _trend(rng, n) * rng.uniform(0, 2.5)
    if rng.random() < 0.25:  # level shifts
        for pos in rng.integers(1, n, size=rng.integers(1, 3)):
            level[pos:] += rng.normal(0, 1.0)
    # Noise relative to the seasonal amplitude, log-uniform: most real profiles are clear.
    noise = _ar1_noise(rng, n, float(np.exp(rng.uniform(np.log(0.03), np.log(0.8)))))
    style = rng.random()
    if style < 0.45:
        x = amplitude * season + level + noise
    else:  # positive and multiplicative, like demand, traffic or load
        base = np.exp(0.4 * level)
        x = base * np.maximum(1.0 + rng.uniform(0.15, 0.7) * amplitude * (season + noise), 0.02)
        if style > 0.8:  # integer counts at a modest level, like admissions or sales
            x = rng.poisson(x * rng.uniform(2, 200)).astype(np.float64)
    return x, freq


# (period, freq, longest plausible series): nobody has 300 years of yearly data.
GROWTH_CALENDARS = ((1, "A", 100), (1, "A", 100), (4, "Q", 300), (12, "M", 1024), (12, "M", 1024),
                    (52, "W", 1024), (1, "W", 1024))


def growth(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    fitting = [c for c in GROWTH_CALENDARS if n <= c[2]] or list(GROWTH_CALENDARS[3:])
    period, freq, _ = fitting[rng.integers(0, len(fitting))]
    steps_per_year = {"A": 1, "Q": 4, "M": 12, "W": 52}[freq]
    # Growth per step: a few percent a year, drifting; sometimes damped or reversed once.
    yearly_rate = rng.normal(0.04, 0.08)
    rate = yearly_rate / steps_per_year + np.cumsum(rng.normal(0, 0.01 / steps_per_year, size=n))
    if rng.random() < 0.3:
        rate = rate * np.exp(-np.arange(n) / (n * rng.uniform(0.2, 1.0)))  # damped growth
    if rng.random() < 0.2:
        turn = rng.integers(n // 4, max(n // 4 + 1, 3 * n // 4))
        rate[turn:] = rate[turn:] - rng.normal(0, 0.1) / steps_per_year
    shocks = rng.normal(0, rng.uniform(0.005, 0.06) / np.sqrt(steps_per_year), size=n)
    log_level = np.cumsum(rate + shocks)
    span = np.ptp(log_level)
    if span > 3.0:  # at most a 20-fold change over the series
        log_level = log_level * (3.0 / span)
    x = np.exp(log_level)
    if period > 1 and rng.random() < 0.7:
        shape = _profile_shape(rng, period)
        x = x * (1 + rng.uniform(0.02, 0.3 if period < 52 else 0.12) * shape[(np.arange(n) + rng.integers(0, period)) % period])
    x = x * (1 + rng.uniform(0, 0.05) * rng.standard_normal(n))
    if rng.random() < 0.2:  # additive form: a level far from zero with a linear trend
        x = np.log(x) * rng.uniform(5, 50) + rng.uniform(50, 500)
    return x, freq


def trend(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / n
    kind = rng.choice(["linear", "exponential", "damped", "logistic", "piecewise"])
    if kind == "linear":
        x = rng.normal(0, 3) * t
    elif kind == "exponential":
        x = np.exp(rng.uniform(-2, 3) * t)
    elif kind == "damped":
        x = rng.normal(0, 3) * (1 - np.exp(-t * rng.uniform(2, 10)))
    elif kind == "logistic":
        x = rng.uniform(1, 5) / (1 + np.exp(-rng.uniform(5, 20) * (t - rng.uniform(0.2, 0.8))))
    else:
        knots = np.sort(rng.uniform(0, 1, size=rng.integers(1, 5)))
        slopes = rng.normal(0, 3, size=len(knots) + 1)
        x = slopes[0] * t
        for knot, slope_change in zip(knots, np.diff(slopes)):
            x += slope_change * np.maximum(t - knot, 0)
    return x + _ar1_noise(rng, n, rng.uniform(0.01, 0.3) * (np.abs(x).std() + 0.1))


def intermittent(rng: np.random.Generator, n: int) -> np.ndarray:
    prob = rng.uniform(0.03, 0.5)
    if rng.random() < 0.4:  # demand more likely on some days of the week
        t = np.arange(n)
        prob = np.clip(prob * (1 + 0.8 * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 6.3))), 0, 1)
    occurs = rng.random(n) < prob
    if rng.random() < 0.5:
        sizes = rng.poisson(rng.uniform(1, 10), size=n) + 1
    else:
        sizes = np.round(rng.gamma(rng.uniform(0.5, 3), rng.uniform(1, 20), size=n)) + 1
    return (occurs * sizes).astype(np.float64)


def random_walk(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.choice(["rw", "drift", "geometric", "ou"])
    steps = rng.standard_normal(n)
    if kind == "rw":
        return np.cumsum(steps)
    if kind == "drift":
        return np.cumsum(steps + rng.normal(0, 0.2))
    if kind == "geometric":
        return 100 * np.exp(np.cumsum(rng.uniform(0.002, 0.03) * steps + rng.normal(0, 0.001)))
    theta = rng.uniform(0.01, 0.3)
    return rng.normal(0, 5) + lfilter([1.0], [1.0, -(1 - theta)], steps)


def arma(rng: np.random.Generator, n: int) -> np.ndarray:
    order = int(rng.integers(1, 4))
    # Roots inside the unit circle make the AR filter stable.
    roots = rng.uniform(0.2, 0.95, size=order) * np.exp(1j * rng.uniform(0, np.pi, size=order))
    ar = np.real(np.poly(np.concatenate([roots, roots.conj()]) if rng.random() < 0.5 else np.abs(roots)))
    ma = np.concatenate([[1.0], rng.uniform(-0.8, 0.8, size=rng.integers(0, 3))])
    shocks = rng.standard_normal(n + 200)
    if rng.random() < 0.3:  # volatility clustering (GARCH(1,1)-like)
        a = rng.uniform(0.05, 0.2)
        b = rng.uniform(0.5, 0.95 - a)  # a + b < 1 keeps the variance process stationary
        var = np.empty(n + 200)
        var[0], prev = 1.0, 0.0
        for i in range(1, n + 200):  # short recursion; series are a few thousand points
            var[i] = (1 - a - b) + a * prev**2 + b * var[i - 1]
            prev = shocks[i] * np.sqrt(var[i])
            shocks[i] = prev
    x = lfilter(ma, ar, shocks)[200:]
    return x + rng.normal(0, 3)


def generate(family: str, seed: int, index: int, n_points: int) -> tuple[np.ndarray, str]:
    """One synthetic series of the family as (float32 values, freq)."""
    rng = family_rng(seed, family, index)
    freq = ""
    if family == "kernelsynth":
        x = kernelsynth(rng, n_points)
    elif family == "canonical":
        x = canonical(rng, n_points)
    elif family == "hourly":
        x, freq = hourly(rng, n_points), "H"
    elif family == "seasonal":
        x, freq = seasonal(rng, n_points)
    elif family == "profile":
        x, freq = profile(rng, n_points)
    elif family == "growth":
        x, freq = growth(rng, n_points)
    elif family == "trend":
        x = trend(rng, n_points)
    elif family == "intermittent":
        x, freq = intermittent(rng, n_points), "D"
    elif family == "random_walk":
        x = random_walk(rng, n_points)
    elif family == "arma":
        x = arma(rng, n_points)
    else:
        raise ValueError(f"unknown synthetic family {family!r}; known: {', '.join(FAMILIES)}")
    # Random scale and offset so the model's normalisation, not the data, fixes the range.
    x = np.asarray(x, dtype=np.float64)
    counts = family == "intermittent" or (family == "profile" and np.all(x == np.round(x)))
    scale = 1.0 if counts else 10 ** rng.uniform(-1, 3)
    x = x * scale
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x.astype(np.float32), freq
