"""Layout of a run directory, and which of its training checkpoints are complete.

A run directory (``train.run_dir``) holds::

    config.yaml              the full run config, written at the start of training
    checkpoints/step_<N>/    sharded DCP checkpoints; complete once its ``complete.json`` checks out
    checkpoints/step_<N>.tmp/  a save in progress (renamed to ``step_<N>`` when done)
    model/                   the exported model directory (config.yaml + model.safetensors)

This module is the one place those names are defined. It is low-level on purpose: it imports
only the standard library, so the trainer (which writes checkpoints) and the inference and
evaluation code (which read them) can both depend on it without depending on each other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

RUN_CONFIG = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
# DCP's coordinator writes this file last, after every rank's shards: a DCP checkpoint has it.
DCP_METADATA = ".metadata"
# The completion marker: written into a checkpoint after DCP has finished (so after every rank's
# files and .metadata), recording the size of each of its files. A checkpoint is complete only
# when the marker is there and every file it lists has that size: a truncated or missing shard,
# or a checkpoint whose writing stopped half-way, shows up before DCP is asked to read it.
COMPLETE_MARKER = "complete.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_SUFFIX = ".tmp"
TMP_STEP_GLOB = f"step_*{TMP_SUFFIX}"


def write_json(path: Path, obj) -> None:
    """Replace a run directory's small JSON file (val_best.json, time_budget.json) atomically: a
    crash mid-write leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    """``step_<N>``: the directory name of the checkpoint taken after step ``step``."""
    return f"step_{int(step)}"


def tmp_step_dir_name(step: int) -> str:
    """``step_<N>.tmp``: where the checkpoint of step ``step`` is written before the rename."""
    return step_dir_name(step) + TMP_SUFFIX


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_CONFIG


def model_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / MODEL_DIR


def run_dir_of_checkpoint(step_dir: str | Path) -> Path:
    """The run directory that holds ``<run>/checkpoints/step_<N>``."""
    return Path(step_dir).parent.parent


def has_dcp_metadata(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a finished DCP checkpoint (any name)."""
    return (Path(path) / DCP_METADATA).is_file()


def write_complete_marker(path: str | Path, step: int) -> None:
    """Record the size of every file of the finished checkpoint ``path``; written last, atomically."""
    path = Path(path)
    files = {child.name: child.stat().st_size for child in sorted(path.iterdir())
             if child.is_file() and child.name != COMPLETE_MARKER and not child.name.endswith(TMP_SUFFIX)}
    if DCP_METADATA not in files:
        raise FileNotFoundError(f"{path / DCP_METADATA}: DCP did not write its metadata")
    tmp = path / (COMPLETE_MARKER + TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump({"step": int(step), "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint ``path`` is not complete (naming the file), or None when it is."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
    except FileNotFoundError:
        return f"{marker} is missing (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{marker} is unreadable ({exc})"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{path / name} is missing"
        if actual != size:
            return f"{path / name} has {actual} bytes, {COMPLETE_MARKER} recorded {size}"
    return None


def step_dirs(directory: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_<N>`` directory under ``directory``, complete or not, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from .tmp, completion marker checks out), oldest first."""
    return [(step, path) for step, path in step_dirs(directory) if checkpoint_problem(path) is None]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (a ``checkpoints/`` folder), or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


__all__ = [
    "CHECKPOINTS_DIR", "COMPLETE_MARKER", "DCP_METADATA", "MODEL_DIR", "RUN_CONFIG", "STEP_DIR", "TMP_STEP_GLOB",
    "TMP_SUFFIX", "checkpoint_problem", "checkpoints_dir", "config_file", "has_dcp_metadata", "latest_checkpoint",
    "list_checkpoints", "model_dir", "run_dir_of_checkpoint", "step_dir_name", "step_dirs", "tmp_step_dir_name",
    "write_complete_marker",
]
