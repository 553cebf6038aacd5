"""Training: loop, optimizer and schedules, DCP checkpoints, metrics, fault handling."""

from timers1.train.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]
