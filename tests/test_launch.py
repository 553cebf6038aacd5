"""SLURM scripts, run for real against fake sbatch/srun/scontrol (tests/fake_slurm) and real torchrun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from timers1.train.checkpoint import list_checkpoints
from tests.conftest import REPO_DIR
from tests.test_train import BASE, corpus_dir  # noqa: F401  (session fixture)

FAKE_SLURM = REPO_DIR / "tests" / "fake_slurm"


def _sbatch(script: str, args: list[str], env_extra: dict, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
           "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1", **env_extra}
    proc = subprocess.run(["sbatch", f"launch/{script}", *args], cwd=REPO_DIR, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, log.read_text() if log.exists() else ""


def _sets(items):
    out = []
    for item in items:
        out += ["--set", item]
    return out


def test_pretrain_sbatch_preempt_requeue_resume(corpus_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    args = _sets([*BASE, f"data.corpus_dir={corpus_dir}", "train.steps=30", "checkpoint.save_interval_steps=0"]) + ["--no-eval"]
    env = {"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(run_dir),
           "FAKE_SLURM_SIGNAL_FILE": str(run_dir / "metrics.jsonl"), "FAKE_SLURM_SIGNAL_LINES": "3"}
    proc, log = _sbatch("pretrain.sbatch", args, env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The script asked for what a preemptible multi-node job needs.
    for line in ("#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --nodes=16"):
        assert line in log
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash launch/torchrun.sh train --config configs/tiny.yaml" in log
    assert "signal USR1 -> batch shell" in log
    assert "scontrol requeue 4242" in log
    (step, _), = list_checkpoints(run_dir / "checkpoints")
    assert 3 <= step < 30 and (run_dir / "REQUEUE").read_text() == str(step)

    # The requeued job starts the same script again: it resumes and finishes.
    env.pop("FAKE_SLURM_SIGNAL_FILE")
    proc, log = _sbatch("pretrain.sbatch", args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{step} at step {step}" in proc.stderr
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == 30
    assert not (run_dir / "REQUEUE").exists() and log.count("scontrol requeue") == 1


def test_cpt_sbatch_initialises_from_previous_stage(corpus_dir, tmp_path):  # noqa: F811
    pt_dir, cpt_dir = tmp_path / "pt", tmp_path / "cpt"
    common = _sets([*BASE, f"data.corpus_dir={corpus_dir}", "train.steps=2"]) + ["--no-eval"]
    proc, _ = _sbatch("pretrain.sbatch", common, {"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(pt_dir)}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, log = _sbatch("cpt.sbatch", common + ["--set", "train.stp_weighting=inv_sqrt"],
                        {"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(cpt_dir), "INIT_FROM": str(pt_dir)}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--init-from {pt_dir}" in log
    assert [s for s, _ in list_checkpoints(cpt_dir / "checkpoints")] == [2]


def test_eval_sbatch_scores_a_checkpoint(corpus_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "pt"
    proc, _ = _sbatch("pretrain.sbatch", _sets([*BASE, f"data.corpus_dir={corpus_dir}", "train.steps=2"]) + ["--no-eval"],
                      {"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(run_dir)}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rng = np.random.default_rng(0)
    frames = [pd.DataFrame({"item_id": f"s{i}", "timestamp": pd.date_range("2020-01-01", periods=120, freq="D"),
                            "target": rng.normal(size=120).cumsum() + 50}) for i in range(3)]
    pd.concat(frames).to_csv(tmp_path / "daily.csv", index=False)
    (tmp_path / "data.yaml").write_text("datasets:\n  - {file: daily.csv, freq: D, horizon: 14}\n")
    out = tmp_path / "scores.json"
    proc, log = _sbatch("eval.sbatch", [], {"CHECKPOINT": str(run_dir), "DATA": str(tmp_path / "data.yaml"),
                                            "OUTPUT": str(out)}, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"timers1 eval --checkpoint {run_dir}" in log and out.is_file()
