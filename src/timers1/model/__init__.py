"""Timer-S1 as plain nn.Modules (no process groups; parallelism is applied from outside)."""

from timers1.model.timer_s1 import TimerS1, TimerS1Output, build_model, init_weights, instance_normalize

__all__ = ["TimerS1", "TimerS1Output", "build_model", "init_weights", "instance_normalize"]
