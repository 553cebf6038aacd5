"""timers1: the open training system for Timer-S1-class time-series foundation models."""

__version__ = "0.1.0"


def load_forecaster(path, device="cpu", max_context_points=None, batch_size=64, mirror=False, ensemble_contexts=()):
    """Load a checkpoint (ours or the released Hugging Face layout) for forecasting.

    Returns an object whose ``predict(context, horizon)`` gives ``[batch, Q, horizon]``;
    ``mirror`` and ``ensemble_contexts`` make it an ensemble at inference (``timers1.forecast``).
    """
    from timers1.forecast import load_forecaster as _load

    return _load(path, device=device, max_context_points=max_context_points, batch_size=batch_size,
                 mirror=mirror, ensemble_contexts=ensemble_contexts)


__all__ = ["load_forecaster", "__version__"]
