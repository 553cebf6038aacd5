"""Forecasts of the training corpus' own held-out series, scored as forecasts.

The trainer's validation (``eval.val_*``) scores the training loss on the held-out windows;
this scores what a user gets from ``Forecaster.predict`` on the same windows and views: the
context's observed points in, the ``target_points`` after them out, de-normalized. Choices made
at inference (``mirror``, ``ensemble_contexts``, the context length) are chosen here, on series
never trained on, and never on an evaluation set.

Each window's score is scale-free, so series of every size count alike; it is the training
loss' ``series_scale`` form (``timers1.losses``) over the whole horizon:

  CRPS_w = mean_q 2 * sum_t pinball_q(y_t, yhat_q,t) / (T * s_w),
  MAE_w  = sum_t |y_t - median_t| / (T * s_w),
  s_w = max(s, SERIES_SCALE_FLOOR_FRACTION * rms_t(y_t - m))

with m and s the context's mean and std + 1e-5 (the forecast's own statistics): the floor keeps
a window with a flat context from dominating, as in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from timers1.config import Config
from timers1.eval.forecaster import Forecaster, predict_batched
from timers1.eval.metrics import QUANTILE_LEVELS
from timers1.losses import SERIES_SCALE_FLOOR_FRACTION


@dataclass
class ValidationReport:
    model: str
    corpus: str
    views: list[dict] = field(default_factory=list)  # {"context_points", "windows", "CRPS", "MAE", "CRPS_real", ...}

    def _mean(self, key: str) -> float:
        values = [v[key] for v in self.views if key in v]
        return float(np.mean(values)) if values else float("nan")

    @property
    def summary(self) -> dict[str, float]:
        """Means over the views (each view weighs the same, as in the trainer's val_loss)."""
        return {key: self._mean(key) for key in ("CRPS", "MAE", "CRPS_real", "MAE_real")}

    def format_table(self) -> str:
        lines = [f"validation split of {self.corpus}: {self.model}",
                 f"{'context':>8} {'windows':>8} {'CRPS':>8} {'MAE':>8} {'CRPS real':>10} {'MAE real':>9}"]
        for v in self.views:
            lines.append(f"{v['context_points']:>8} {v['windows']:>8} {v['CRPS']:>8.4f} {v['MAE']:>8.4f} "
                         f"{v.get('CRPS_real', float('nan')):>10.4f} {v.get('MAE_real', float('nan')):>9.4f}")
        s = self.summary
        lines.append(f"{'mean':>8} {'':>8} {s['CRPS']:>8.4f} {s['MAE']:>8.4f} {s['CRPS_real']:>10.4f} "
                     f"{s['MAE_real']:>9.4f}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": self.model, "corpus": self.corpus, "summary": self.summary,
                                    "views": self.views}, indent=2) + "\n")


def window_scores(quantiles_NQT: np.ndarray, targets_NT: np.ndarray,
                  contexts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(CRPS [N], MAE [N]) of each window, scaled as the module's docstring says."""
    levels = np.asarray(QUANTILE_LEVELS).reshape(1, -1, 1)
    error_NQT = targets_NT[:, None, :] - quantiles_NQT
    pinball_NQT = np.maximum(levels * error_NQT, (levels - 1.0) * error_NQT)
    T = targets_NT.shape[1]
    mean_N = np.array([c.mean() for c in contexts])
    scale_N = np.array([c.std() for c in contexts]) + 1e-5
    rms_N = np.sqrt(((targets_NT - mean_N[:, None]) ** 2).mean(axis=1))
    denom_N = T * np.maximum(scale_N, SERIES_SCALE_FLOOR_FRACTION * rms_N)
    crps_N = (2.0 * pinball_NQT).mean(axis=1).sum(axis=1) / denom_N
    median_NT = quantiles_NQT[:, len(QUANTILE_LEVELS) // 2]
    mae_N = np.abs(targets_NT - median_NT).sum(axis=1) / denom_N
    return crps_N, mae_N


def score_validation(forecaster: Forecaster, cfg: Config, model_name: str = "model",
                     batch_size: int = 64) -> ValidationReport:
    """Score ``forecaster`` on the held-out windows of ``cfg``'s corpus (``data.corpus_dir``, or
    the built-in one of ``data.seed``), in the trainer's views: the full context
    (``data.context_points``) and each ``eval.val_context_points`` cut, horizon one pass of the
    model (``model.points_per_pass``)."""
    from timers1.data import cut_context, observes_more_context, validation_real_windows, validation_windows
    from timers1.data.builder import ensure_default_corpus
    from timers1.data.compiled import open_compiled

    corpus_dir = cfg.data.corpus_dir or str(ensure_default_corpus(seed=cfg.data.seed))
    corpus = open_compiled(corpus_dir)
    target_points, window_points = cfg.model.points_per_pass, cfg.window_points
    values_NW, mask_NW = validation_windows(corpus, window_points, cfg.eval.val_windows)
    report = ValidationReport(model=model_name, corpus=str(corpus_dir))
    if len(values_NW) == 0:
        raise ValueError(f"{corpus_dir}: holds out no series for validation (built with validation_fraction 0?)")
    real_N = validation_real_windows(corpus, window_points, cfg.eval.val_windows)
    context_W = cfg.data.context_points
    views = [(context_W, values_NW, mask_NW, real_N)]
    for n in sorted(cfg.eval.val_context_points):
        longer_N = observes_more_context(mask_NW, n, target_points)
        views.append((n, *cut_context(values_NW, mask_NW, n, target_points), real_N[longer_N]))
    for context_points, values, mask, real in views:
        seen = observes_more_context(mask, 0, target_points)  # a series no longer than the horizon has no context
        values, mask, real = values[seen], mask[seen], real[seen]
        if len(values) == 0:
            continue
        contexts = [row[:context_W][keep[:context_W] > 0].astype(np.float64) for row, keep in zip(values, mask)]
        targets_NT = values[:, context_W:].astype(np.float64)
        quantiles_NQT = predict_batched(forecaster, contexts, target_points, batch_size=batch_size)
        crps_N, mae_N = window_scores(quantiles_NQT, targets_NT, contexts)
        view = {"context_points": int(context_points), "windows": int(len(values)),
                "CRPS": float(crps_N.mean()), "MAE": float(mae_N.mean())}
        if real.any():
            view.update(CRPS_real=float(crps_N[real].mean()), MAE_real=float(mae_N[real].mean()),
                        windows_real=int(real.sum()))
        report.views.append(view)
    return report
