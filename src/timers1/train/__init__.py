"""Training: loop, optimizer and schedules, DCP checkpoints, metrics, fault handling."""

# Lazy, so that ``timers1 train`` can install its signal handlers (train/faults.py, standard
# library only) before torch and the trainer are imported, which takes seconds.
__all__ = ["Trainer", "TrainResult"]


def __getattr__(name):
    if name in __all__:
        from timers1.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'timers1.train' has no attribute {name!r}")
