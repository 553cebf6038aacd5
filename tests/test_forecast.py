"""Forecast API behaviour: imputation, truncation, roll-out consistency, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from timers1.forecast import Forecaster, ForecastInputError, impute_last_value
from timers1.model import build_model


@pytest.fixture
def forecaster(tiny_config):
    model = build_model(tiny_config.model, tiny_config.moe, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Forecaster(model, max_context_points=64)


def test_impute_last_value():
    x = np.array([np.nan, np.nan, 2.0, np.nan, 5.0, np.nan])
    assert impute_last_value(x, 0).tolist() == [2.0, 2.0, 2.0, 2.0, 5.0, 5.0]


def test_nan_context_equals_imputed_context(forecaster):
    x = np.sin(np.arange(50) / 3.0)
    x[[0, 10, 11, 49]] = np.nan
    np.testing.assert_array_equal(forecaster.predict([x], 20), forecaster.predict([impute_last_value(x, 0)], 20))


def test_long_context_is_truncated_to_most_recent(forecaster):
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    np.testing.assert_array_equal(forecaster.predict([x], 10), forecaster.predict([x[-64:]], 10))


def test_output_shape_and_rollout_prefix(forecaster):
    x = np.cos(np.arange(70) / 5.0)
    one_pass = forecaster.model.points_per_pass  # (H + 1) * P = 48 for the tiny config
    long = forecaster.predict([x, x * 2], one_pass * 2 + 5)
    assert long.shape == (2, 9, one_pass * 2 + 5)
    # The first pass does not depend on how far the roll-out goes afterwards.
    np.testing.assert_allclose(forecaster.predict([x], one_pass)[0], long[0, :, :one_pass], atol=1e-6)


@pytest.mark.parametrize("series, message", [
    ([np.array([1.0, 2.0]), np.array([])], r"context\[1\] is empty"),
    ([np.array([np.nan, np.nan])], r"context\[0\] has no observed value"),
    ([np.ones((2, 3))], r"context\[0\] must be 1-D"),
    ([np.array([1.0, np.inf])], r"context\[0\] contains infinite"),
])
def test_bad_context_names_the_series(forecaster, series, message):
    with pytest.raises(ForecastInputError, match=message):
        forecaster.predict(series, 5)


@pytest.mark.parametrize("horizon", [0, -3, 2.5])
def test_bad_horizon(forecaster, horizon):
    with pytest.raises(ForecastInputError, match="horizon"):
        forecaster.predict([np.ones(20)], horizon)
