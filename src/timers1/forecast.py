"""Inference API: ``load_forecaster(path).predict(context, horizon) -> [batch, Q, horizon]``.

Follows the released ``generate(x, max_new_tokens=h, revin=True)`` exactly:
  * per-series mean / population std over the whole (imputed, truncated) context, scale
    std + 1e-5, once before any roll-out;
  * left zero-padding to a multiple of P with a mask of zeros over the padding;
  * one pass yields up to (H+1)*P points (main stack + the STP blocks the horizon needs);
  * longer horizons append the median of the Q quantiles (``torch.quantile`` at 0.5, i.e. of
    the *sorted* outputs, as released) in normalized units and run again;
  * de-normalize all quantiles at the end.
Series of different lengths are bucketed by patch count, so every series is computed exactly
as if it were alone (no extra padding patches enter its attention).

An ensemble at inference (off by default; the released code has none): ``mirror`` also
forecasts every series negated and maps the result back (the quantile at level q of -x is minus
the quantile at 1 - q of x), and ``ensemble_contexts`` also forecasts from each of those shorter
(or longer) context lengths. The members' quantiles, each sorted, are averaged level by level
(quantile averaging keeps the average a distribution). Members see the same series from other
sides: training samples windows negated (``data.flip_probability``) and truncated, so each
member is a forecast the model was trained to make, and their errors are partly independent.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from timers1.config import Config
from timers1.errors import InputError
from timers1.model import TimerS1, build_model
from timers1.rundir import (CHECKPOINTS_DIR, RUN_CONFIG, checkpoints_dir, config_file, has_dcp_metadata,
                            latest_checkpoint, model_dir, run_dir_of_checkpoint)


class ForecastInputError(InputError):
    """A context series cannot be forecast (empty, all-NaN, not 1-D, bad horizon)."""


def impute_last_value(series: np.ndarray, index: int) -> np.ndarray:
    """Forward-fill NaNs; leading NaNs take the first valid value (GIFT-Eval's imputation)."""
    values = np.asarray(series, dtype=np.float64)
    if values.ndim != 1:
        raise ForecastInputError(f"context[{index}] must be 1-D, got shape {values.shape}")
    if values.size == 0:
        raise ForecastInputError(f"context[{index}] is empty")
    valid = ~np.isnan(values)
    if not valid.any():
        raise ForecastInputError(f"context[{index}] has no observed value (all NaN)")
    if np.isinf(values).any():
        raise ForecastInputError(f"context[{index}] contains infinite values")
    return fill_forward(values, ~valid) if not valid.all() else values


def fill_forward(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each missing entry takes the last kept value before it; leading ones the first kept value.

    Needs at least one kept entry. Shared with the evaluation harness, which decides for itself
    what counts as missing and what to do with a series that has nothing kept.
    """
    positions = np.where(~missing, np.arange(values.size), 0)
    np.maximum.accumulate(positions, out=positions)
    filled = values[positions]
    first = int(np.argmax(~missing))
    filled[:first] = values[first]
    return filled


class Forecaster:
    """Batched quantile forecasts from a Timer-S1 model (eval mode, no grad)."""

    def __init__(self, model: TimerS1, max_context_points: int | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu", mirror: bool = False, ensemble_contexts: Sequence[int] = ()):
        self.model = model.eval()
        self.device = torch.device(device)
        self.patch_points = model.model_cfg.patch_points
        self.quantiles = list(model.model_cfg.quantiles)
        self.max_context_points = max_context_points or model.model_cfg.max_context_points
        self.batch_size = batch_size
        self.mirror = bool(mirror)
        bad = [n for n in ensemble_contexts if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1]
        if bad:
            raise ForecastInputError(f"ensemble_contexts: {bad[0]!r} is not a positive number of points")
        levels = np.asarray(self.quantiles)
        if self.mirror and not np.allclose(np.sort(levels), 1.0 - np.sort(levels)[::-1]):
            raise ForecastInputError(f"mirror needs quantile levels symmetric about 0.5, the model has {self.quantiles}")
        contexts = [self.max_context_points] + [int(n) for n in ensemble_contexts]
        # (context points, sign) of every member; the first is the plain forecast.
        self.members = [(n, sign) for n in dict.fromkeys(contexts) for sign in ((1.0, -1.0) if self.mirror else (1.0,))]

    @property
    def median_index(self) -> int:
        return min(range(len(self.quantiles)), key=lambda i: abs(self.quantiles[i] - 0.5))

    def predict(self, context: Sequence[np.ndarray], horizon: int) -> np.ndarray:
        """Quantile forecasts ``[len(context), Q, horizon]`` (float64) for 1-D series of any length."""
        if not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ForecastInputError(f"horizon must be a positive integer, got {horizon!r}")
        series = [impute_last_value(s, i) for i, s in enumerate(context)]
        if len(self.members) == 1:
            return self._predict_context(series, horizon, self.max_context_points)
        total = 0.0
        for context_points, sign in self.members:
            quantiles_NQH = self._predict_context([sign * s for s in series], horizon, context_points)
            if sign < 0:
                quantiles_NQH = -quantiles_NQH[:, ::-1]
            total = total + np.sort(quantiles_NQH, axis=1)
        return total / len(self.members)

    def _predict_context(self, series: list[np.ndarray], horizon: int, context_points: int) -> np.ndarray:
        """One member: every series cut to its last ``context_points``, bucketed by patch count."""
        series = [s[-context_points:] for s in series]
        out = np.empty((len(series), len(self.quantiles), horizon), dtype=np.float64)
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(series):
            buckets[math.ceil(len(s) / self.patch_points)].append(i)
        for num_patches, members in buckets.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                out[chunk] = self._predict_bucket([series[i] for i in chunk], num_patches, horizon, context_points)
        return out

    def _predict_bucket(self, series: list[np.ndarray], num_patches: int, horizon: int,
                        context_points: int) -> np.ndarray:
        p = self.patch_points
        width = num_patches * p
        values = torch.zeros(len(series), width, dtype=torch.float32)
        mask = torch.zeros(len(series), width, dtype=torch.float32)
        for row, s in enumerate(series):
            values[row, width - len(s):] = torch.from_numpy(s.astype(np.float32))
            mask[row, width - len(s):] = 1.0
        # Statistics over the real points, in fp32 like the released generate(). Not
        # instance_normalize (training's masked-sum form): the released code takes mean() and
        # std() of the unpadded row, and matching its reductions keeps parity margins widest.
        real = [values[row, width - len(s):] for row, s in enumerate(series)]
        mean = torch.stack([r.mean() for r in real]).view(-1, 1)
        scale = torch.stack([r.std(unbiased=False) for r in real]).view(-1, 1) + 1e-5
        normalized = (values - mean) / scale * mask
        normalized, mask = normalized.to(self.device), mask.to(self.device)
        pieces = []
        produced = 0
        max_points = max(p, (context_points // p) * p)
        while produced < horizon:
            step = min(horizon - produced, self.model.points_per_pass)
            quantiles_BQS = self.model.forecast_pass(normalized, mask, step)
            pieces.append(quantiles_BQS)
            produced += step
            if produced < horizon:
                median = torch.quantile(quantiles_BQS.float(), q=0.5, dim=1)
                normalized = torch.cat([normalized, median.to(normalized.dtype)], dim=-1)[:, -max_points:]
                mask = torch.cat([mask, torch.ones_like(median, dtype=mask.dtype)], dim=-1)[:, -max_points:]
        result = torch.cat(pieces, dim=-1).float().cpu()
        return (result * scale.unsqueeze(1) + mean.unsqueeze(1)).double().numpy()


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "model") -> tuple[Config, TimerS1]:
    """A model from a run directory, a training checkpoint, our model directory or the released
    Hugging Face layout. ``weights="ema"``: a training checkpoint's averaged weights
    (``train.ema_decay``) instead of the trained ones.

    A run directory whose newest checkpoint is incomplete or cannot be read falls back, with a
    warning, to the model exported beside it (``<run>/model``, written from the last checkpoint
    at the end of training).
    """
    from timers1 import hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    exported = model_dir(path)
    fallback = (exported / hf.OUR_WEIGHTS).is_file() and not has_dcp_metadata(path)
    try:
        dcp_dir = _training_checkpoint(path)
        if dcp_dir is not None:
            return _load_training_checkpoint(dcp_dir, device, weights)
    except (hf.CheckpointFormatError, FileNotFoundError) as exc:
        if not fallback or weights != "model":
            raise
        print(f"warning: {exc}; loading the exported model {exported} instead", file=sys.stderr, flush=True)
        path = exported
    if weights != "model":
        raise hf.CheckpointFormatError(f"{path}: only a training checkpoint (or a run directory) holds {weights!r} "
                                       f"weights; this is a model directory")
    if hf.is_hf_dir(path):
        model_cfg, moe_cfg, state = hf.read_hf_dir(path)
        cfg = Config(model=model_cfg, moe=moe_cfg)
    else:
        cfg, state = hf.read_model_dir(path)
    model = build_model(cfg.model, cfg.moe, device="meta")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return cfg, model.to(device)


def _training_checkpoint(path: Path) -> Path | None:
    """A DCP training checkpoint: ``checkpoints/step_N`` itself, or a run dir (its latest one)."""
    from timers1.hf import OUR_WEIGHTS

    if has_dcp_metadata(path):
        return path
    if checkpoints_dir(path).is_dir() and not (path / OUR_WEIGHTS).is_file():
        latest = latest_checkpoint(checkpoints_dir(path))
        if latest is None:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint under {CHECKPOINTS_DIR}/")
        return latest
    return None


def _load_training_checkpoint(step_dir: Path, device, weights: str = "model") -> tuple[Config, TimerS1]:
    """Weights of a sharded training checkpoint (its ``weights`` entry: ``model``, or ``ema``
    for the averaged ones), gathered into one plain model (any layout)."""
    import torch.distributed.checkpoint as dcp

    from timers1.hf import CheckpointFormatError, read_config_file

    run_dir = run_dir_of_checkpoint(step_dir)
    run_config = config_file(run_dir)
    if not run_config.is_file():
        raise CheckpointFormatError(f"{step_dir}: no {RUN_CONFIG} in the run directory {run_dir}")
    cfg = read_config_file(run_config)
    # Allocated but not initialised: every value comes from the checkpoint (random init of an
    # 8.3B model would cost minutes for nothing).
    model = build_model(cfg.model, cfg.moe, device="meta").to_empty(device="cpu")
    if weights == "model":
        state = {"model": model.state_dict()}
    else:
        stored = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
        if not any(key.startswith(f"{weights}.") for key in stored):
            raise CheckpointFormatError(f"{step_dir}: holds no {weights!r} weights (the run trained with "
                                        f"train.ema_decay 0)")
        state = {weights: {"weights": model.state_dict()}}
    # no_dist: one process reads every shard, also when called inside a multi-rank job.
    try:
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    except (Exception, dcp.api.CheckpointException) as exc:  # DCP's exception is a BaseException
        reason = str(exc).strip().splitlines()
        raise CheckpointFormatError(f"{step_dir}: checkpoint cannot be read ({reason[-1] if reason else exc!r})",
                                    hint="load an older checkpoints/step_<N> directory of the run") from exc
    model.load_state_dict(state["model"] if weights == "model" else state[weights]["weights"])
    return cfg, model.to(device)


def load_forecaster(path: str | Path, device: str | torch.device = "cpu", max_context_points: int | None = None,
                    batch_size: int = 64, mirror: bool = False, ensemble_contexts: Sequence[int] = ()) -> Forecaster:
    """Load a checkpoint (ours or the released HF format) for forecasting (``mirror`` and
    ``ensemble_contexts``: the ensemble at inference, see the module's docstring)."""
    _, model = load_model(path, device)
    return Forecaster(model, max_context_points=max_context_points, batch_size=batch_size, device=device,
                      mirror=mirror, ensemble_contexts=ensemble_contexts)
