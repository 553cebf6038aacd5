"""Fault handling, round two (issue 14): each failure found by fault injection, as a test.

Corrupt newest checkpoint, async-save failures, signals during start-up, a full disk, a
diverging learning rate, loss spikes, duplicate metric lines after resumes, leftover control
files, and what the command line prints for each expected failure. Single process here; the
layout message of a multi-rank resume is in test_train_dist.py.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from timers1 import rundir
from timers1.cli import main
from timers1.errors import CheckpointError
from timers1.forecast import load_model
from timers1.train import Trainer
from timers1.train.checkpoint import list_checkpoints
from timers1.train.faults import REQUEUE_EXIT_CODE, LossSpikeError
from tests.conftest import CONFIGS_DIR
from tests.test_train import _env, _losses, _train_cmd, corpus_dir, make_cfg, run  # noqa: F401 (fixture)


def _metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _shard(step_dir: Path) -> Path:
    return sorted(step_dir.glob("*.distcp"))[0]


# ----------------------------------------------------------------------------- corrupt checkpoints

@pytest.mark.parametrize("damage", ["truncated", "unreadable"])
def test_corrupt_newest_checkpoint_falls_back_and_reproduces_the_losses(corpus_dir, tmp_path, capsys, damage):
    """Issue 14.1: a damaged newest checkpoint is named and skipped; the previous one resumes exactly."""
    reference = run(make_cfg(corpus_dir, tmp_path / "ref")).losses
    run_dir = tmp_path / "run"
    run(make_cfg(corpus_dir, run_dir), max_steps_this_run=5)
    ckpts = run_dir / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [4, 5]
    shard = _shard(ckpts / "step_5")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    if damage == "unreadable":
        # Sizes that agree with the damage: only reading the shard can tell.
        rundir.write_complete_marker(ckpts / "step_5", 5)
    capsys.readouterr()
    resumed = run(make_cfg(corpus_dir, run_dir))
    err = capsys.readouterr().err
    assert f"skipping checkpoint {ckpts / 'step_5'}: {shard}" in err, err
    if damage == "truncated":
        assert f"has {size // 2} bytes, complete.json recorded {size}" in err
    assert f"resumed from {ckpts / 'step_4'} at step 4" in err
    assert resumed.losses == reference[4:]
    assert _losses(run_dir) == dict(enumerate(reference, start=1))
    assert _metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    run(make_cfg(corpus_dir, run_dir, ["train.steps=2"]))
    (run_dir / "checkpoints" / "step_2" / rundir.COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* loads \(step_2: .*complete.json is missing"):
        run(make_cfg(corpus_dir, run_dir, ["train.steps=4"]))


# ----------------------------------------------------------------------------- asynchronous saves

def test_failed_async_rename_is_reported_at_the_next_step_once(corpus_dir, tmp_path, monkeypatch):
    """Issue 14.2: the failure of step_2's rename stops the run before step 4 (not one save later);
    wait() then has nothing more to report; the written checkpoint is recovered at the next start."""
    reference = run(make_cfg(corpus_dir, tmp_path / "ref")).losses
    run_dir = tmp_path / "run"
    trainer = Trainer(make_cfg(corpus_dir, run_dir, ["checkpoint.async_save=true"]), progress=False)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "step_2":
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    resolve = trainer.checkpoints.resolve

    def resolve_and_let_the_commit_finish(keep):
        # A fast disk: the commit thread is done before the next step boundary.
        resolve(keep)
        if trainer.checkpoints._pending is not None:
            concurrent.futures.wait([trainer.checkpoints._pending[0]])

    monkeypatch.setattr(trainer.checkpoints, "resolve", resolve_and_let_the_commit_finish)
    with pytest.raises(CheckpointError, match=r"saving .*step_2 failed: .*Input/output error \(injected\)"):
        trainer.fit()
    assert trainer.step == 3 and _metric_steps(run_dir) == [1, 2, 3]
    trainer.checkpoints.wait()  # reported once: nothing left to raise
    assert list_checkpoints(run_dir / "checkpoints") == []
    monkeypatch.setattr(os, "replace", real_replace)
    # The marker was written before the rename: the next start finishes the commit and resumes there.
    resumed = run(make_cfg(corpus_dir, run_dir, ["checkpoint.async_save=true"]))
    assert resumed.losses == reference[2:]


def test_async_wait_returns_after_rename_and_pruning(corpus_dir, tmp_path, monkeypatch):
    """Issue 14.2: after wait(), the newest save is renamed and keep_last holds; never more than
    keep_last complete checkpoints at any rename."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(corpus_dir, run_dir, ["checkpoint.async_save=true", "checkpoint.save_interval_steps=1",
                                         "train.steps=8"])
    trainer = Trainer(cfg, progress=False)
    ckpts = run_dir / "checkpoints"
    real_replace = os.replace
    seen_at_rename = []

    def replace(src, dst):
        result = real_replace(src, dst)
        if rundir.STEP_DIR.match(Path(dst).name) and Path(dst).parent == ckpts:
            seen_at_rename.append(len(list_checkpoints(ckpts)))
        return result

    monkeypatch.setattr(os, "replace", replace)
    save = trainer.checkpoints.save
    after_wait = []

    def save_then_check_the_previous(step, state, blocking=False, hold=False):
        trainer.checkpoints.wait()
        after_wait.append([s for s, _ in list_checkpoints(ckpts)])
        save(step, state, blocking, hold)

    monkeypatch.setattr(trainer.checkpoints, "save", save_then_check_the_previous)
    trainer.fit()
    # Before step N's save, wait() has committed step N-1 (held saves commit one step later).
    assert after_wait[1:] == [[1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]]
    assert max(seen_at_rename) == 2 and [s for s, _ in list_checkpoints(ckpts)] == [7, 8]


@pytest.mark.parametrize("keep_last", [1, 2, 3, 5])
def test_pruning_keeps_the_newest_keep_last_checkpoints(tmp_path, keep_last):
    """With fewer older checkpoints than keep_last - 1 all stay (keep_last 5 once kept 2 of 4)."""
    import torch

    from timers1.train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=keep_last, async_save=False)
    for step in range(1, 8):
        manager.save(step, {"model": {"w": torch.full((2,), float(step))}})
        assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == list(range(max(1, step - keep_last + 1), step + 1))


# ----------------------------------------------------------------------------- signals and control files

SIGNAL_DURING_STARTUP = textwrap.dedent("""
    import os, signal, sys
    from timers1.train import trainer

    build_model = trainer.build_model
    def build_model_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning arrives while the model is built
        return build_model(*args, **kwargs)
    trainer.build_model = build_model_after_a_signal
    from timers1.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_sigusr1_during_startup_exits_for_requeue_writing_nothing(corpus_dir, tmp_path, with_checkpoint):
    """Issue 14.3: handlers are in before the model is built; the run exits 75 before its first
    step, leaving the checkpoints as they were and REQUEUE naming the step to resume from."""
    run_dir = tmp_path / "run"
    if with_checkpoint:
        subprocess.run(_train_cmd(corpus_dir, run_dir) + ["--max-steps", "2"], check=True, env=_env(),
                       capture_output=True)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if with_checkpoint else []
    script = tmp_path / "signal_during_startup.py"
    script.write_text(SIGNAL_DURING_STARTUP)
    done = subprocess.run([sys.executable, str(script), *_train_cmd(corpus_dir, run_dir)[3:]], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == REQUEUE_EXIT_CODE, done.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "REQUEUE").read_text() == ("2" if with_checkpoint else "0")
    assert _metric_steps(run_dir) == ([1, 2] if with_checkpoint else [])


def test_stale_stop_and_requeue_files_are_cleared_at_start(corpus_dir, tmp_path):
    """Issue 14.7: files left by an earlier process neither cost a step nor ask for a requeue."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("STOP", "REQUEUE"):
        (run_dir / name).write_text("3")
        os.utime(run_dir / name, (time.time() - 60, time.time() - 60))
    result = run(make_cfg(corpus_dir, run_dir, ["train.steps=2"]))
    assert not result.stopped_for_requeue and result.step == 2
    assert not (run_dir / "STOP").exists() and not (run_dir / "REQUEUE").exists()


# ----------------------------------------------------------------------------- full disk, permissions

FULL_DISK = textwrap.dedent("""
    import errno, os, sys
    import torch.distributed.checkpoint.filesystem as fs

    class FullDisk:
        def __init__(self, stream):
            self._stream = stream
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def __getattr__(self, name):
            return getattr(self._stream, name)

    write_item = fs._write_item
    def write_item_to_a_full_disk(*args, **kwargs):
        if "step_4.tmp" in str(getattr(args[1], "name", "")):
            args = (args[0], FullDisk(args[1]), *args[2:])
        return write_item(*args, **kwargs)
    fs._write_item = write_item_to_a_full_disk
    from timers1.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(corpus_dir, tmp_path, async_save):
    """Issue 14.4: ENOSPC under DCP's "unexpected pos" message is recognised and named."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    run_dir = tmp_path / "run"
    cmd = _train_cmd(corpus_dir, run_dir, [f"checkpoint.async_save={str(async_save).lower()}"])
    done = subprocess.run([sys.executable, str(script), *cmd[3:]], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "unexpected pos" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("timers1 train: error:")]
    assert errors == [f"timers1 train: error: saving {run_dir / 'checkpoints' / 'step_4'}: no space left on device: "
                      f"{run_dir / 'checkpoints'}"], done.stderr[-3000:]
    assert "hint: free space there" in done.stderr
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2]


def test_permission_denied_is_one_line(corpus_dir, tmp_path, monkeypatch, capsys):
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == tmp_path / "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(_train_cmd(corpus_dir, tmp_path / "locked")[3:]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"timers1 train: error: permission denied: {tmp_path / 'locked'}"
    assert err.splitlines()[1].startswith("hint: choose a run directory you can write")
    monkeypatch.setenv("TIMERS1_DEBUG", "1")
    with pytest.raises(PermissionError):
        main(_train_cmd(corpus_dir, tmp_path / "locked")[3:])


# ----------------------------------------------------------------------------- divergence

def test_diverging_lr_aborts_in_one_line_and_saves_no_bad_weights(corpus_dir, tmp_path):
    """Issue 14.4 and 14.6: train.lr=1e30 applies step 1, then every step is non-finite; the abort
    names the step the metrics would give it, and no checkpoint holds the blown-up weights."""
    run_dir = tmp_path / "run"
    done = subprocess.run(_train_cmd(corpus_dir, run_dir, ["train.lr=1e30", "train.max_nonfinite_steps_in_row=3",
                                                           "checkpoint.save_interval_steps=1"]),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("timers1 train: error:")]
    steps = _metric_steps(run_dir)
    assert len(error) == 1 and error[0].startswith(f"timers1 train: error: step {steps[-1] + 1}: loss=nan"), error
    assert "hint: lower train.lr" in done.stderr
    assert list_checkpoints(run_dir / "checkpoints") == []  # step 1's weights produced the skipped steps


def _spiking_next_batch(trainer, spike_steps):
    """Batches whose target jumps far beyond a flat context at the given (1-based) steps."""
    original = trainer._next_batch

    def next_batch():
        batch = original()
        if trainer.step + 1 in spike_steps:
            context = trainer.context_points
            batch["values"][:, :context] = 0.0
            batch["values"][:, context:] = 1e4
            batch["mask"][:] = 1.0
        return batch

    return next_batch


SPIKE = ["train.spike_factor=5", "train.spike_window=2", "train.max_spike_steps_in_row=2",
         "checkpoint.save_interval_steps=1", "checkpoint.keep_last=10"]


def test_loss_spike_is_skipped_and_its_weights_never_saved(corpus_dir, tmp_path, monkeypatch, capsys):
    """Issue 14 must-have: a spike is skipped, counted and logged; the checkpoint of the weights
    that produced it (step 3's) is dropped; training goes on."""
    trainer = Trainer(make_cfg(corpus_dir, tmp_path / "run", SPIKE), progress=False)
    monkeypatch.setattr(trainer, "_next_batch", _spiking_next_batch(trainer, {4}))
    result = trainer.fit()
    assert result.step == 6 and trainer.guard.spikes_skipped == 1 and trainer.guard.nonfinite_skipped == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, False, False, True, False, False]
    # wQL is scale-free, so the jump shows in the gradient norm, not in the loss.
    assert records[3]["skip_reason"].startswith("grad_norm=") and "its median" in records[3]["skip_reason"]
    assert records[3]["grad_norm"] > 5 * max(r["grad_norm"] for r in records[1:3])
    assert "step 4: skipped, grad_norm=" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1, 2, 5, 6]


def test_spikes_in_a_row_abort_and_leave_the_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(corpus_dir, tmp_path / "run", SPIKE), progress=False)
    monkeypatch.setattr(trainer, "_next_batch", _spiking_next_batch(trainer, {4, 5}))
    with pytest.raises(LossSpikeError, match=r"step 5: grad_norm=.*2 consecutive skipped steps"):
        trainer.fit()
    assert _metric_steps(tmp_path / "run") == [1, 2, 3, 4]
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in ckpts] == [1, 2]
    model = load_model(ckpts[-1][1])[1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- metrics

def test_metrics_hold_each_step_once_after_three_resumes(corpus_dir, tmp_path, monkeypatch):
    """Issue 14.7: steps redone after a crash replace their lines instead of repeating them."""
    reference = run(make_cfg(corpus_dir, tmp_path / "ref")).losses
    run_dir = tmp_path / "run"
    for crash_during_step in (4, 5, 6):
        trainer = Trainer(make_cfg(corpus_dir, run_dir), progress=False)
        original = trainer._next_batch

        def next_batch(trainer=trainer, original=original, crash_during_step=crash_during_step):
            if trainer.step + 1 == crash_during_step:
                raise RuntimeError("simulated crash")
            return original()

        monkeypatch.setattr(trainer, "_next_batch", next_batch)
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit()
    run(make_cfg(corpus_dir, run_dir))
    assert _metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert _losses(run_dir) == dict(enumerate(reference, start=1))
