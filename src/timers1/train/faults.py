"""Fault handling: non-finite guard, preemption signals, requeue exit code."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

# Exit status that asks the launcher to requeue the job (launch/*.sbatch checks it). 75 is
# EX_TEMPFAIL: "try again later", distinct from success (0) and real failures.
REQUEUE_EXIT_CODE = 75


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite; aborts after N in a row."""

    max_in_row: int
    in_row: int = 0
    skipped_total: int = 0

    def check(self, loss: float, grad_norm: float, step: int) -> bool:
        """True if the step may be applied; False to skip it. Raises after too many in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped_total += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"step {step}: loss={loss} grad_norm={grad_norm}; {self.in_row} consecutive non-finite steps "
                f"(train.max_nonfinite_steps_in_row={self.max_in_row}). Lower train.lr, check the data, or "
                "resume from the last checkpoint."
            )
        return False


class PreemptionSignals:
    """Turns SIGUSR1 (SLURM's warning before the time limit) and SIGTERM into a flag the loop polls.

    The loop saves a checkpoint at the next step boundary and exits with REQUEUE_EXIT_CODE;
    nothing is written from inside the handler, so a signal can never tear a checkpoint.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionSignals":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
