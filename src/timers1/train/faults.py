"""Fault handling: the step guard (non-finite and spiking steps), preemption signals, requeue exit code."""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from timers1.errors import TrainingDiverged

# Exit status that asks the launcher to requeue the job (launch/*.sbatch checks it). 75 is
# EX_TEMPFAIL: "try again later", distinct from success (0) and real failures.
REQUEUE_EXIT_CODE = 75

DIVERGED_HINT = ("lower train.lr or raise train.warmup_steps, check the data, then resume: the last "
                 "checkpoint holds weights from before the skipped steps")


class NonFiniteError(TrainingDiverged):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class LossSpikeError(TrainingDiverged):
    """Too many consecutive steps had a loss or gradient norm far above its running median."""


@dataclass
class StepGuard:
    """Decides whether a step's update may be applied, from its loss and gradient norm.

    A step is skipped when its loss or gradient norm is not finite, or (``spike_factor`` > 0)
    when either exceeds ``spike_factor`` times its median over the last ``spike_window``
    applied steps (judged once that many are known). Skips are counted; too many in a row
    raise. Steps are numbered from 1, as in the metrics.
    """

    max_nonfinite_in_row: int
    spike_factor: float = 0.0
    spike_window: int = 20
    max_spikes_in_row: int = 5
    in_row: int = 0
    nonfinite_skipped: int = 0
    spikes_skipped: int = 0
    history: deque = field(default_factory=deque)
    """(loss, grad_norm) of the last ``spike_window`` applied steps."""

    @property
    def skipped_total(self) -> int:
        return self.nonfinite_skipped + self.spikes_skipped

    def check(self, loss: float, grad_norm: float, step: int) -> str | None:
        """None if step ``step`` may be applied, else why it is skipped. Raises after too many in a row."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.nonfinite_skipped += 1
            self.in_row += 1
            if self.in_row >= self.max_nonfinite_in_row:
                raise NonFiniteError(
                    f"step {step}: loss={loss} grad_norm={grad_norm}; {self.in_row} consecutive skipped steps, "
                    f"the last non-finite (train.max_nonfinite_steps_in_row={self.max_nonfinite_in_row})",
                    hint=DIVERGED_HINT)
            return f"non-finite loss={loss} grad_norm={grad_norm}"
        spike = self._spike(loss, grad_norm)
        if spike is not None:
            self.spikes_skipped += 1
            self.in_row += 1
            if self.in_row >= self.max_spikes_in_row:
                raise LossSpikeError(
                    f"step {step}: {spike}; {self.in_row} consecutive skipped steps "
                    f"(train.max_spike_steps_in_row={self.max_spikes_in_row}, train.spike_factor={self.spike_factor})",
                    hint=DIVERGED_HINT)
            return spike
        self.in_row = 0
        self.history.append((loss, grad_norm))
        while len(self.history) > self.spike_window:
            self.history.popleft()
        return None

    def _spike(self, loss: float, grad_norm: float) -> str | None:
        if self.spike_factor <= 0 or len(self.history) < self.spike_window:
            return None
        for name, value, column in (("loss", loss, 0), ("grad_norm", grad_norm, 1)):
            median = statistics.median(h[column] for h in self.history)
            if value > self.spike_factor * median:
                return (f"{name}={value:.6g} is {value / median:.3g}x its median {median:.6g} over the last "
                        f"{len(self.history)} applied steps (train.spike_factor={self.spike_factor})")
        return None

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "nonfinite_skipped": self.nonfinite_skipped,
                "spikes_skipped": self.spikes_skipped, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.in_row = int(state["in_row"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.spikes_skipped = int(state["spikes_skipped"])
        self.history = deque(tuple(h) for h in state["history"][-self.spike_window:])


class PreemptionSignals:
    """Turns SIGUSR1 (SLURM's warning before the time limit) and SIGTERM into a flag the loop polls.

    Installed first thing in the process (``timers1 train`` does so before reading the config),
    so a signal during start-up is not lost: the trainer sees the flag before its first step
    and exits for requeue without writing anything. The loop saves a checkpoint at the next
    step boundary and exits with REQUEUE_EXIT_CODE; nothing is written from inside the handler,
    so a signal can never tear a checkpoint.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        # When the handlers went in: a STOP file older than this was left by an earlier process.
        self.installed_at = time.time()
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionSignals":
        if self._previous:  # already installed (by the CLI, before the trainer asks again)
            return self
        self.installed_at = time.time()
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def __exit__(self, *exc) -> None:
        """Restore the previous handlers; a second call does nothing."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
