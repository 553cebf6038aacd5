"""Multi-rank training (torchrun, gloo): exact resume with expert parallelism, and checkpoints
saved at one layout resuming at another (DCP resharding + the loader's global position)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from timers1.train.checkpoint import list_checkpoints
from tests.conftest import CONFIGS_DIR

# Fully observed windows (every corpus series is longer than the window) and no dropout, so
# the loss of a batch does not depend on how it is split over ranks.
COMMON = ["data.context_points=64", "train.batch_size=8", "train.warmup_steps=1", "train.peak_tflops=1.0",
          "checkpoint.async_save=false", "checkpoint.keep_last=5", "model.dropout=0.0",
          "data.flip_probability=0.5", "moe.aux_loss_coef=0.02"]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    from timers1.data import build_default_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    build_default_corpus(out, num_synthetic_series=30, include_real=False, progress=False)
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, corpus: Path, nproc: int, sets: list[str], stderr: list[str] | None = None) -> dict[int, float]:
    args = ["--config", str(CONFIGS_DIR / "tiny.yaml"), "--run-dir", str(run_dir), "--no-eval"]
    for item in COMMON + [f"data.corpus_dir={corpus}", *sets]:
        args += ["--set", item]
    if nproc == 1:
        cmd = [sys.executable, "-m", "timers1.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_port()}",
               "-m", "timers1.cli", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if stderr is not None:
        stderr.append(proc.stderr)
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def _interrupted_copy(origin: Path, run_dir: Path, step: int) -> None:
    """``run_dir`` as a run of ``origin``'s config stopped after ``step``: its checkpoint, config
    and metrics up to it (what the run had on disk then: every step is deterministic)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(origin / "checkpoints" / f"step_{step}", run_dir / "checkpoints" / f"step_{step}")
    shutil.copy(origin / "config.yaml", run_dir / "config.yaml")
    lines = [ln for ln in (origin / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))


def test_two_ranks_with_expert_parallel_resume_exactly(long_corpus, tmp_path):
    sets = ["parallel.ep=2", "train.steps=4", "checkpoint.save_interval_steps=2"]
    straight = train(tmp_path / "straight", long_corpus, 2, sets)
    _interrupted_copy(tmp_path / "straight", tmp_path / "resumed", step=2)
    resumed = train(tmp_path / "resumed", long_corpus, 2, sets)
    assert sorted(straight) == [1, 2, 3, 4]
    assert resumed == straight  # identical floats: same layout restores streams and RNG exactly


def test_checkpoint_reshards_to_other_layouts(long_corpus, tmp_path):
    """Saved at dp4 x ep2 (4 ranks); the next step's loss at 1 rank and at tp2 matches."""
    origin = tmp_path / "origin"
    uninterrupted = train(origin, long_corpus, 4, ["parallel.ep=2", "train.steps=3", "checkpoint.save_interval_steps=2"])
    step2 = origin / "checkpoints" / "step_2"
    assert step2.is_dir()
    for name, nproc, sets in (("single", 1, []), ("tp2", 2, ["parallel.tp=2"])):
        run_dir = tmp_path / name
        _interrupted_copy(origin, run_dir, step=2)
        resumed = train(run_dir, long_corpus, nproc, ["train.steps=3", "checkpoint.save_interval_steps=2", *sets])
        assert sorted(resumed) == [1, 2, 3]
        assert abs(resumed[3] - uninterrupted[3]) <= 1e-6, (name, resumed[3], uninterrupted[3])
        assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 3]


DP2 = "dp_replicate=1 dp_shard=2 tp=1 pp=1 ep=1"
TP2 = "dp_replicate=1 dp_shard=1 tp=2 pp=1 ep=1"


def test_same_world_size_other_layout_is_resharded(long_corpus, tmp_path):
    """Issue 14.7: 2 ranks at dp2 and 2 ranks at tp2 are different layouts (each rank's data
    stream differs): the resume says so, reshards, and continues the uninterrupted losses. Saved
    at tp2, resumed at dp2 from the tp2 run as it stood at step 2 (the data-parallel to
    tensor-parallel direction is test_checkpoint_reshards_to_other_layouts')."""
    common = ["train.steps=3", "checkpoint.save_interval_steps=2"]
    uninterrupted = train(tmp_path / "straight_tp2", long_corpus, 2, common + ["parallel.tp=2"])
    run_dir = tmp_path / "tp2_to_dp2"
    _interrupted_copy(tmp_path / "straight_tp2", run_dir, step=2)
    log: list[str] = []
    losses = train(run_dir, long_corpus, 2, common, stderr=log)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2; resharding from {TP2} " \
           f"to {DP2}" in log[0], log[0][-3000:]
    assert sorted(losses) == [1, 2, 3]  # each step once in metrics.jsonl
    assert abs(losses[3] - uninterrupted[3]) <= 1e-6, (losses[3], uninterrupted[3])
