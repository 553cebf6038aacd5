"""Trainer: exact resume, crash safety (kill -9 while training and while saving), NaN guard,
signals, stage chaining. Single process here; multi-rank resume and resharding in test_train_dist.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from timers1.config import load_config
from timers1.train import Trainer
from timers1.train.checkpoint import list_checkpoints
from timers1.train.faults import REQUEUE_EXIT_CODE, NonFiniteError
from tests.conftest import CONFIGS_DIR, REPO_DIR

# A few small steps of the tiny model; synchronous saves keep the timeline deterministic.
BASE = ["data.context_points=64", "train.batch_size=4", "train.steps=6", "train.warmup_steps=2",
        "checkpoint.save_interval_steps=2", "checkpoint.async_save=false", "checkpoint.keep_last=2",
        "train.peak_tflops=1.0", "data.flip_probability=0.5", "data.resample_probability=0.5",
        "model.dropout=0.1"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from timers1.data import build_default_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    build_default_corpus(out, num_synthetic_series=40, include_real=False, progress=False)
    return out


def make_cfg(corpus_dir, run_dir, extra=()):
    return load_config(CONFIGS_DIR / "tiny.yaml",
                       BASE + [f"data.corpus_dir={corpus_dir}", f"train.run_dir={run_dir}", *extra])


def run(cfg, **kwargs):
    return Trainer(cfg, progress=False, **kwargs).fit()


def test_resume_gives_identical_loss_sequence(corpus_dir, tmp_path):
    straight = run(make_cfg(corpus_dir, tmp_path / "a"))
    assert straight.step == 6 and len(straight.losses) == 6
    # Stop after 3 steps (a checkpoint is written at the stop), then resume to the end.
    first = run(make_cfg(corpus_dir, tmp_path / "b"), max_steps_this_run=3)
    assert first.step == 3
    second = run(make_cfg(corpus_dir, tmp_path / "b"))
    assert second.step == 6 and len(second.losses) == 3
    resumed = first.losses + second.losses
    assert resumed == straight.losses  # bit-identical, fp32 on CPU
    # The run dir holds the resolved config, metrics per step and the last k checkpoints.
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [4, 6]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss_ntp", "loss_stp_1", "loss_stp_2", "loss_aux", "lr", "grad_norm", "tokens_per_s",
                "points_per_s", "mfu", "host_max_rss_gib", "expert_load_max_over_mean", "experts_idle"):
        assert key in records[-1], key
    assert len(records[-1]["expert_load_max_over_mean"]) == 4  # 2 main + 2 STP blocks
    assert any((tmp_path / "a" / "tensorboard").iterdir())


def test_async_save_matches_sync(corpus_dir, tmp_path):
    sync = run(make_cfg(corpus_dir, tmp_path / "s"))
    asynchronous = run(make_cfg(corpus_dir, tmp_path / "as", ["checkpoint.async_save=true"]))
    assert asynchronous.losses == sync.losses
    # Both produced loadable, identical final weights.
    import timers1

    a = timers1.load_forecaster(tmp_path / "s").predict([np.sin(np.arange(80.0))], 20)
    b = timers1.load_forecaster(tmp_path / "as").predict([np.sin(np.arange(80.0))], 20)
    np.testing.assert_array_equal(a, b)


def test_nonfinite_step_is_skipped_and_repeated_ones_abort(corpus_dir, tmp_path, monkeypatch):
    cfg = make_cfg(corpus_dir, tmp_path / "nan", ["train.max_nonfinite_steps_in_row=2"])
    trainer = Trainer(cfg, progress=False)
    original = trainer._next_batch
    poisoned_steps = {2}

    def next_batch():
        batch = original()
        if trainer.step in poisoned_steps:
            batch["values"][0, 5] = float("nan")
        return batch

    monkeypatch.setattr(trainer, "_next_batch", next_batch)
    before = {k: v.clone() for k, v in trainer.engine.model_parts[0].state_dict().items()}
    result = trainer.fit()
    assert result.step == 6 and math.isnan(result.losses[2]) and trainer.guard.skipped_total == 1
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert any(not torch.equal(before[k], v) for k, v in trainer.engine.model_parts[0].state_dict().items())
    lines = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [False, False, True, False, False, False]

    cfg = make_cfg(corpus_dir, tmp_path / "nan2", ["train.max_nonfinite_steps_in_row=2"])
    trainer = Trainer(cfg, progress=False)
    original2 = trainer._next_batch

    def always_nan():
        batch = original2()
        batch["values"][:, 3] = float("inf")
        return batch

    monkeypatch.setattr(trainer, "_next_batch", always_nan)
    with pytest.raises(NonFiniteError, match="step 2: .*2 consecutive skipped steps"):
        trainer.fit()


def test_nonfinite_weights_never_reach_checkpoint(corpus_dir, tmp_path, monkeypatch):
    """A skipped step leaves the weights untouched: they stay finite in every checkpoint."""
    cfg = make_cfg(corpus_dir, tmp_path / "fin", ["train.max_nonfinite_steps_in_row=3"])
    trainer = Trainer(cfg, progress=False)
    original = trainer._next_batch

    def next_batch():
        batch = original()
        if trainer.step == 1:
            batch["values"][:, 0] = float("nan")
        return batch

    monkeypatch.setattr(trainer, "_next_batch", next_batch)
    trainer.fit()
    for _, path in list_checkpoints(tmp_path / "fin" / "checkpoints"):
        import timers1

        model = timers1.forecast.load_model(path)[1]
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------- subprocesses

def _train_cmd(corpus_dir, run_dir, extra=()):
    sets = []
    for item in BASE + [f"data.corpus_dir={corpus_dir}", *extra]:
        sets += ["--set", item]
    return [sys.executable, "-m", "timers1.cli", "train", "--config", str(CONFIGS_DIR / "tiny.yaml"),
            "--run-dir", str(run_dir), "--no-eval", *sets]


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]  # a redone step overwrites: the resumed value
    return out


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_kill_9_during_training_resumes_from_last_checkpoint(corpus_dir, tmp_path):
    reference = tmp_path / "ref"
    subprocess.run(_train_cmd(corpus_dir, reference, ["train.steps=8"]), check=True, env=_env(),
                   capture_output=True)
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_train_cmd(corpus_dir, victim, ["train.steps=8"]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if list_checkpoints(victim / "checkpoints") and (victim / "metrics.jsonl").exists() and \
                len((victim / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(victim / "checkpoints"), "no checkpoint before the kill"
    subprocess.run(_train_cmd(corpus_dir, victim, ["train.steps=8"]), check=True, env=_env(), capture_output=True)
    assert _losses(victim) == _losses(reference)


CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint.filesystem as fs
    from timers1.train import checkpoint

    mode = os.environ["CRASH_MODE"]
    crash_at = int(os.environ["CRASH_AT_STEP"])
    if mode == "before_commit":
        original = checkpoint.CheckpointManager._commit
        def commit(self, step, tmp, final):
            if final.name == f"step_{crash_at}":
                os.kill(os.getpid(), signal.SIGKILL)  # shards written, not yet renamed
            return original(self, step, tmp, final)
        checkpoint.CheckpointManager._commit = commit
    else:
        original = fs._write_item
        def write_item(*args, **kwargs):
            if f"step_{crash_at}.tmp" in str(getattr(args[1], "name", "")) or os.environ.get("IN_SAVE"):
                os.kill(os.getpid(), signal.SIGKILL)  # in the middle of writing a shard file
            return original(*args, **kwargs)
        fs._write_item = write_item
        orig_save = checkpoint.CheckpointManager.save
        def save(self, step, state, blocking=False, hold=False):
            if step == crash_at:
                os.environ["IN_SAVE"] = "1"
            return orig_save(self, step, state, blocking, hold)
        checkpoint.CheckpointManager.save = save
    from timers1.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def uninterrupted_losses(corpus_dir, tmp_path_factory):
    """The losses of the BASE run without interruption (what every resumed run must reproduce)."""
    reference = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_train_cmd(corpus_dir, reference), check=True, env=_env(), capture_output=True)
    return _losses(reference)


@pytest.mark.parametrize("mode", ["before_commit", "mid_write"])
def test_kill_9_during_checkpoint_write_keeps_last_good(corpus_dir, uninterrupted_losses, tmp_path, mode):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_SAVE)
    run_dir = tmp_path / "run"
    cmd = _train_cmd(corpus_dir, run_dir)
    crash = subprocess.run([sys.executable, str(script), *cmd[3:]], env={**_env(), "CRASH_MODE": mode,
                           "CRASH_AT_STEP": "4"}, capture_output=True)
    assert crash.returncode == -signal.SIGKILL, crash.stderr.decode()[-2000:]
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in ckpts] == [2]  # step_4 never became visible
    assert (run_dir / "checkpoints" / "step_4.tmp").exists()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr and "step_2 at step 2" in done.stderr
    assert not (run_dir / "checkpoints" / "step_4.tmp").exists()
    assert _losses(run_dir) == uninterrupted_losses


def test_sigusr1_saves_and_exits_with_requeue_code(corpus_dir, tmp_path):
    run_dir = tmp_path / "sig"
    proc = subprocess.Popen(_train_cmd(corpus_dir, run_dir, ["train.steps=400", "checkpoint.save_interval_steps=0"]),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                          and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-2000:]
    (step, path), = list_checkpoints(run_dir / "checkpoints")
    assert 2 <= step < 400 and (run_dir / "REQUEUE").read_text() == str(step)
    assert max(_losses(run_dir)) == step  # it stopped right after the step it saved


def test_stop_file_requests_checkpoint_and_requeue(corpus_dir, tmp_path):
    run_dir = tmp_path / "stopfile"
    run_dir.mkdir()
    cfg = make_cfg(corpus_dir, run_dir, ["checkpoint.save_interval_steps=0"])
    trainer = Trainer(cfg, progress=False)
    original = trainer._next_batch

    def next_batch():
        if trainer.step == 3:
            (run_dir / "STOP").touch()
        return original()

    trainer._next_batch = next_batch
    result = trainer.fit()
    assert result.exit_code == REQUEUE_EXIT_CODE and result.step == 4
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4]
    assert not (run_dir / "STOP").exists() and (run_dir / "REQUEUE").read_text() == "4"


def test_stage_chaining_init_from_previous_run_and_hf(corpus_dir, tmp_path):
    import timers1
    from timers1 import hf

    pt = run(make_cfg(corpus_dir, tmp_path / "pt"))
    assert pt.step == 6
    # CPT: fresh run dir, weights from the PT run (its latest DCP checkpoint), 1/sqrt(j) STP.
    cfg = make_cfg(corpus_dir, tmp_path / "cpt", ["train.stp_weighting=inv_sqrt", "train.steps=2"])
    trainer = Trainer(cfg, progress=False, init_from=str(tmp_path / "pt"))
    _, pt_model = timers1.forecast.load_model(tmp_path / "pt")
    for key, value in pt_model.state_dict().items():
        assert torch.equal(trainer.engine.model_parts[0].state_dict()[key], value), key
    trainer.fit()
    # LCE from the released HF layout: export CPT, start a longer-context run from it.
    _, cpt_model = timers1.forecast.load_model(tmp_path / "cpt")
    hf.write_hf_dir(tmp_path / "cpt_hf", cfg.model, cfg.moe, cpt_model.state_dict())
    lce = make_cfg(corpus_dir, tmp_path / "lce", ["data.context_points=128", "train.steps=1"])
    trainer = Trainer(lce, progress=False, init_from=str(tmp_path / "cpt_hf"))
    for key, value in cpt_model.state_dict().items():
        assert torch.equal(trainer.engine.model_parts[0].state_dict()[key], value), key
    assert trainer.fit().step == 1


def test_stage_configs_describe_the_flagship():
    for name, context, weighting in (("timer_s1_8b.yaml", 2880, "uniform"), ("timer_s1_8b_cpt.yaml", 2880, "inv_sqrt"),
                                     ("timer_s1_8b_lce.yaml", 11520, "inv_sqrt")):
        cfg = load_config(CONFIGS_DIR / name)
        assert cfg.data.context_points == context and cfg.train.stp_weighting == weighting
        assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_stp_blocks) == (1024, 24, 16)


def test_profile_writes_trace(corpus_dir, tmp_path):
    cfg = make_cfg(corpus_dir, tmp_path / "prof")
    run(cfg, profile_dir=str(tmp_path / "trace"))
    traces = list((tmp_path / "trace").glob("*.json"))
    assert traces and traces[0].stat().st_size > 1000


def test_activation_checkpointing_gives_identical_gradients(tiny_config):
    from timers1.config import load_config
    from timers1.model import build_model
    from timers1.parallel import build_engine

    x = torch.randn(3, 64 + 48, generator=torch.Generator().manual_seed(0)).cumsum(-1)
    grads = []
    for ac in (False, True):
        cfg = load_config(CONFIGS_DIR / "tiny.yaml", ["data.context_points=64", f"parallel.activation_checkpointing={ac}"])
        model = build_model(cfg.model, cfg.moe, seed=0)
        build_engine(model, cfg).forward_backward(x, torch.ones_like(x))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_train_cli_exports_the_model_and_evaluates_it(corpus_dir, tmp_path):
    """The README main job's tail: after the last step, a model directory and a held-out score."""
    run_dir = tmp_path / "main"
    cmd = [c for c in _train_cmd(corpus_dir, run_dir, ["train.steps=2"]) if c != "--no-eval"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "model" / "config.yaml").is_file()
    report = json.loads((run_dir / "eval.json").read_text())
    names = [c["config"] for c in report["configs"]]
    assert "heldout_hourly/H" in names and len(names) >= 8
    gm = report["geometric_mean"]
    assert math.isfinite(gm["relative_MASE"]) and math.isfinite(gm["relative_CRPS"])
    assert "geometric mean" in done.stderr  # the table is printed


def test_deepspeed_cpu_adam_matches_torch_adamw(tiny_config):
    """The host-offload optimizer (optional extra) takes the same steps as torch AdamW."""
    pytest.importorskip("deepspeed")
    from timers1.model import build_model
    from timers1.parallel import build_engine
    from timers1.train.optim import build_optimizer

    x = torch.randn(2, tiny_config.data.context_points + 48, generator=torch.Generator().manual_seed(0)).cumsum(-1)
    finals = []
    for name in ("adamw", "deepspeed_cpu_adam"):
        tiny_config.train.optimizer = name
        model = build_model(tiny_config.model, tiny_config.moe, seed=0)
        engine, optimizer = build_engine(model, tiny_config), build_optimizer([model], tiny_config.train)
        for _ in range(3):
            optimizer.zero_grad()
            engine.forward_backward(x, torch.ones_like(x))
            optimizer.step()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for key, value in finals[0].items():
        assert torch.allclose(value, finals[1][key], atol=1e-5), key
