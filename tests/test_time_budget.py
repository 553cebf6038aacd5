"""The wall-clock budget (train.time_budget_minutes): hand-computed step counts, and the trainer
fitting a run to a scripted clock, stopping when the budget runs out, and resuming with the
recorded count (the loss sequence of an uninterrupted run)."""

from __future__ import annotations

import json

import pytest

from timers1.config import ConfigError, load_config
from timers1.train import Trainer, trainer as trainer_module
from timers1.train.budget import BUDGET_FILE, planned_steps
from timers1.train.checkpoint import list_checkpoints
from tests.test_train import corpus_dir, make_cfg  # noqa: F401  (the session corpus fixture)

BUDGET = ["train.steps=200", "train.time_budget_minutes=0.2", "train.time_budget_probe_steps=4",
          "checkpoint.save_interval_steps=5"]


def test_planned_steps_by_hand():
    # 3,600 s budget, 100 s spent at step 50; 0.5 s steps, a 6 s validation every 500 steps and
    # one at the end: (3600 - 100 - 6) / (0.5 + 6 / 500) = 6824.2 more steps.
    assert planned_steps(50, 100.0, 3600.0, 0.5, 6.0, 500, cap=10_000) == 50 + 6824
    assert planned_steps(50, 100.0, 3600.0, 0.5, 6.0, 500, cap=5_000) == 5_000  # never above the cap
    assert planned_steps(50, 100.0, 3600.0, 0.5, 0.0, 0, cap=10_000) == 50 + 7000  # no validation
    assert planned_steps(50, 3600.0, 3600.0, 0.5, 6.0, 500, cap=10_000) == 50  # spent: stop now


class ScriptedClock:
    """Returns 0, then advances by ``dt(call index)`` per call: the trainer reads it once at
    construction, once before the first step and once after every step."""

    def __init__(self, dt):
        self.dt, self.calls, self.now = dt, 0, 0.0

    def __call__(self) -> float:
        now = self.now
        self.now += self.dt(self.calls)
        self.calls += 1
        return now


def _fit(cfg, monkeypatch, dt, **kwargs):
    monkeypatch.setattr(trainer_module, "budget_clock", ScriptedClock(dt))
    return Trainer(cfg, progress=False, **kwargs).fit()


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_budget_fits_the_step_count_and_the_schedule_follows(corpus_dir, tmp_path, monkeypatch):
    cfg = make_cfg(corpus_dir, tmp_path / "a", BUDGET)
    # 1 s per step: at step 4, 5 s of 12 are spent -> 7 more steps.
    result = _fit(cfg, monkeypatch, lambda call: 1.0)
    assert result.step == 11 and cfg.train.steps == 11
    recorded = json.loads((tmp_path / "a" / BUDGET_FILE).read_text())
    assert recorded == {"budget_minutes": 0.2, "configured_steps": 200, "steps": 11, "decided_at_step": 4}
    assert load_config(tmp_path / "a" / "config.yaml").train.steps == 11
    # The cosine ran to its floor at step 11, not at the configured 200.
    last = _records(tmp_path / "a")[-1]
    assert last["step"] == 11 and last["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)


def test_budget_raises_the_count_again_when_steps_get_faster(corpus_dir, tmp_path, monkeypatch):
    from timers1.train import budget

    monkeypatch.setattr(budget, "RECHECK_STEPS", 4)
    monkeypatch.setattr(budget, "RECENT_STEPS", 4)
    cfg = make_cfg(corpus_dir, tmp_path / "a", BUDGET)
    # 1 s per step up to step 4 (5 s of 12 spent: 11 steps), then 0.25 s: at step 8, 6 s spent
    # and 6 s left for 24 more steps -> 32, which the clock then reaches exactly.
    result = _fit(cfg, monkeypatch, lambda call: 1.0 if call < 5 else 0.25)
    assert result.step == 32 and cfg.train.steps == 32
    assert [r.get("planned_steps") for r in _records(tmp_path / "a") if "planned_steps" in r] == [11, 32]
    assert json.loads((tmp_path / "a" / BUDGET_FILE).read_text())["decided_at_step"] == 8
    last = _records(tmp_path / "a")[-1]
    assert last["step"] == 32 and last["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)


def test_budget_stops_the_run_when_time_runs_out(corpus_dir, tmp_path, monkeypatch):
    cfg = make_cfg(corpus_dir, tmp_path / "a", BUDGET)
    # Steps take 1 s up to the decision (11 steps planned), then 3 s: the clock reads 12 s at
    # step 7, where the run stops, saved like a last step.
    result = _fit(cfg, monkeypatch, lambda call: 1.0 if call < 6 else 3.0)
    assert result.step == 7 and not result.stopped_for_requeue and result.exit_code == 0
    assert json.loads((tmp_path / "a" / BUDGET_FILE).read_text())["steps"] == 7
    assert max(step for step, _ in list_checkpoints(tmp_path / "a" / "checkpoints")) == 7


def test_resumed_run_keeps_the_recorded_count(corpus_dir, tmp_path, monkeypatch):
    straight = _fit(make_cfg(corpus_dir, tmp_path / "a", BUDGET), monkeypatch, lambda call: 1.0)
    _fit(make_cfg(corpus_dir, tmp_path / "b", BUDGET), monkeypatch, lambda call: 1.0, max_steps_this_run=6)
    # The second invocation's clock would allow far more steps (and its own would have run
    # out long ago): the recorded count decides, and the losses continue as if never stopped.
    cfg = make_cfg(corpus_dir, tmp_path / "b", BUDGET)
    resumed = _fit(cfg, monkeypatch, lambda call: 100.0)
    assert resumed.step == straight.step == 11 and cfg.train.steps == 11
    assert resumed.losses == straight.losses[6:]


def test_budget_config_errors(corpus_dir, tmp_path):
    for bad in ("train.time_budget_minutes=-1", "train.time_budget_probe_steps=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            make_cfg(corpus_dir, tmp_path, [bad])


def test_two_ranks_stop_together_within_the_budget(corpus_dir, tmp_path):
    """Real clocks, two processes: whichever way the budget ends the run (a lowered count, or
    out of time), both ranks agree on the step (a disagreement hangs a collective and fails
    the run), and the recorded count is the last step trained."""
    from tests.test_train_dist import train

    losses = train(tmp_path / "two", corpus_dir, 2,
                   ["parallel.dp_shard=2", "train.steps=100000", "train.time_budget_minutes=0.15",
                    "train.time_budget_probe_steps=5", "eval.val_interval_steps=20", "eval.val_windows=16",
                    "eval.val_batch_size=8", "checkpoint.save_interval_steps=0"])
    recorded = json.loads((tmp_path / "two" / BUDGET_FILE).read_text())
    assert max(losses) == recorded["steps"] < 100000
    assert load_config(tmp_path / "two" / "config.yaml").train.steps == recorded["steps"]
