"""Fit a run's step count to a wall-clock budget (``train.time_budget_minutes``).

A recipe promised as "an hour on 2 cores" cannot name a step count: the same steps took 57 to
67 minutes on this project's CPU machines from one day to the next. With a budget the trainer
times the first ``train.time_budget_probe_steps`` steps and sets ``train.steps`` (at most the
configured count, the cap) so that the remaining steps, at the median step time plus the
validation passes still due, end within the budget counted from the trainer's construction
(model build, corpus open and compile warm-up included). The schedule reads ``train.steps``
live, so it follows: decided inside the warmup, the learning rate up to that point is the same
as with the final count from the start.

The machine's speed drifts (10-30% within minutes here, 0.36 to 0.50 s for the same step from
one hour to the next), so the estimate is repeated every ``RECHECK_STEPS`` steps from the recent
step times and moves the count down or back up (never above the cap; a small kink in the cosine
either way): a slow start no longer leaves the end of a faster hour unused. If the budget runs
out anyway, the run stops there, validated, checkpointed and exported as at its last step.
The count is recorded in ``<run_dir>/time_budget.json``; a resumed run keeps the recorded count
and does not re-time itself (its budget was the first invocation's).

Every rank takes the smallest count any rank computed, and stops when any rank is out of time
(gloo all-reduces: one per step while a budget is timing, one per decision), so all stop together.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from timers1 import rundir

BUDGET_FILE = "time_budget.json"
RECHECK_STEPS = 250
# Step times the estimate takes its median over (the recent ones: the machine drifts).
RECENT_STEPS = 200
# A forward without gradients costs about a third of a training step per window; only used for
# validation passes before the first one has been timed.
FORWARD_SHARE = 1.0 / 3.0


def planned_steps(step: int, elapsed_s: float, budget_s: float, step_time_s: float, val_time_s: float,
                  val_interval: int, cap: int) -> int:
    """The last step that ends within the budget: ``step`` steps done after ``elapsed_s``, each
    further one costing ``step_time_s`` and every ``val_interval``-th (and the last) one a
    validation pass of ``val_time_s`` besides. At least ``step`` (nothing undone), at most ``cap``."""
    remaining = budget_s - elapsed_s
    if val_interval > 0:
        remaining -= val_time_s  # the pass at the last step
        per_step = step_time_s + val_time_s / val_interval
    else:
        per_step = step_time_s
    if remaining <= 0 or per_step <= 0:
        return step if remaining <= 0 else cap
    return max(step, min(cap, step + math.floor(remaining / per_step)))


class TimeBudget:
    """Owns the budget decisions of one run; the trainer reports steps and validation times."""

    def __init__(self, cfg, run_dir: Path, rank: int, group=None, clock: Callable[[], float] = time.monotonic):
        t = cfg.train
        self.train_cfg = t
        self.budget_s = 60.0 * t.time_budget_minutes
        self.probe_steps = t.time_budget_probe_steps
        self.cap = t.steps
        self.val_interval = cfg.eval.val_interval_steps
        self.val_windows_per_train_batch = 0.0  # set by the trainer once the validation views exist
        self.path = Path(run_dir) / BUDGET_FILE
        self.rank = rank
        self.group = group
        self.clock = clock
        self.started = clock()
        self.last = None
        self.step_times: list[float] = []
        self.val_time_s: float | None = None
        self.timing = True  # False once a resumed run found a recorded count

    def restore(self) -> None:
        """Adopt a recorded count (a resumed run): no timing, no stop at this invocation's clock."""
        try:
            recorded = json.loads(self.path.read_text())
            steps = int(recorded["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        self.train_cfg.steps = min(self.cap, steps)
        self.timing = False

    def start(self) -> None:
        self.last = self.clock()

    def validation_timed(self, seconds: float) -> None:
        self.val_time_s = seconds

    def after_step(self, step: int) -> tuple[int, str | None]:
        """Report a finished step; returns the (maybe lowered) step count to stop at and, when it
        changed, a line saying why."""
        if not self.timing:
            return self.train_cfg.steps, None
        now = self.clock()
        self.step_times.append(now - self.last)
        self.last = now
        elapsed = now - self.started
        if self._any_rank(elapsed >= self.budget_s and step < self.train_cfg.steps):
            self.timing = False  # the count is final
            return self._decide(step, step, f"time budget of {self.budget_s / 60:g} min reached at step {step}: "
                                            "stopping here, validated and saved like a last step")
        due = step == self.probe_steps or (step > self.probe_steps and step % RECHECK_STEPS == 0)
        if not due or step >= self.train_cfg.steps:
            return self.train_cfg.steps, None
        step_time = statistics.median(self.step_times[-RECENT_STEPS:])
        val_time = self.val_time_s
        if val_time is None:
            val_time = FORWARD_SHARE * step_time * self.val_windows_per_train_batch
        wanted = planned_steps(step, elapsed, self.budget_s, step_time, val_time, self.val_interval, self.cap)
        return self._decide(step, wanted, f"time budget {self.budget_s / 60:g} min: {elapsed / 60:.1f} min spent "
                                          f"at step {step}, {step_time:.3f} s per step (median of the last "
                                          f"{min(len(self.step_times), RECENT_STEPS)}), validation "
                                          f"{val_time:.1f} s per pass")

    def _any_rank(self, flag: bool) -> bool:
        if dist.is_available() and dist.is_initialized():
            flags = torch.tensor([float(flag)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            return bool(flags.item())
        return flag

    def _decide(self, step: int, wanted: int, why: str) -> tuple[int, str | None]:
        if dist.is_available() and dist.is_initialized():
            agreed = torch.tensor([wanted], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
            wanted = int(agreed.item())
        if wanted == self.train_cfg.steps:
            return self.train_cfg.steps, None
        before = self.train_cfg.steps
        self.train_cfg.steps = wanted
        if self.rank == 0:
            rundir.write_json(self.path, {"budget_minutes": self.budget_s / 60, "configured_steps": self.cap,
                                          "steps": wanted, "decided_at_step": step})
        return wanted, f"{why} -> train.steps {before} -> {wanted}"
