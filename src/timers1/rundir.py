"""Layout of a run directory, and which of its training checkpoints are complete.

A run directory (``train.run_dir``) holds::

    config.yaml              the full run config, written at the start of training
    checkpoints/step_<N>/    sharded DCP checkpoints; complete once ``.metadata`` is in place
    checkpoints/step_<N>.tmp/  a save in progress (renamed to ``step_<N>`` when done)
    model/                   the exported model directory (config.yaml + model.safetensors)

This module is the one place those names are defined. It is low-level on purpose: it imports
only the standard library, so the trainer (which writes checkpoints) and the inference and
evaluation code (which read them) can both depend on it without depending on each other.
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_CONFIG = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
# DCP's coordinator writes this file last, after every rank's shards: its presence marks a
# checkpoint directory as readable.
DCP_METADATA = ".metadata"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_SUFFIX = ".tmp"
TMP_STEP_GLOB = f"step_*{TMP_SUFFIX}"


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


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from .tmp and carrying DCP metadata), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and has_dcp_metadata(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (a ``checkpoints/`` folder), or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


__all__ = [
    "CHECKPOINTS_DIR", "DCP_METADATA", "MODEL_DIR", "RUN_CONFIG", "STEP_DIR", "TMP_STEP_GLOB", "TMP_SUFFIX",
    "checkpoints_dir", "config_file", "has_dcp_metadata", "latest_checkpoint", "list_checkpoints",
    "model_dir", "run_dir_of_checkpoint", "step_dir_name", "tmp_step_dir_name",
]
