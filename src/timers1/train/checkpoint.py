"""Sharded, atomic, optionally asynchronous checkpoints with torch.distributed.checkpoint (DCP).

Layout (names defined in ``timers1.rundir``): ``<run>/checkpoints/step_<N>/`` holding DCP
shards (``__<rank>_<i>.distcp``) and ``.metadata``. Every save goes to ``step_<N>.tmp/``
first; rank 0 renames it to ``step_<N>/`` only after DCP has finished (DCP's coordinator
writes ``.metadata`` after gathering every rank's write results, so rank 0's completion
implies everyone's). A crash at any moment therefore leaves either the old set of complete
checkpoints or the old set plus the new one, never a damaged ``step_<N>``; stale ``.tmp``
directories are removed at the next start.

What is saved (a flat dict of DCP entries):
  ``model``, ``optim``: from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (fully
      qualified names, DTensor shards) so they load at another parallel layout (DCP reshards);
  ``train``: step, scheduler state and counters (identical on all ranks);
  ``rank_<r>``: what is private to one rank — RNG states and the data-loader position.
      On a resharded resume the loader position is rebuilt from the step (see the trainer).

Async saves run DCP's collectives on a dedicated gloo group, so they never interleave with
the training collectives on the default group; one save is in flight at a time.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# Discovery of complete checkpoints lives with the run-directory layout, so that inference and
# evaluation can find checkpoints without importing the trainer; re-exported here.
from timers1.rundir import (TMP_STEP_GLOB, latest_checkpoint, list_checkpoints,  # noqa: F401
                            step_dir_name, tmp_step_dir_name)

# Single-process runs are a supported mode, not an accident worth a warning per save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def checkpoint_keys(path: str | Path) -> set[str]:
    """Top-level entries stored in a DCP checkpoint (``model``, ``optim``, ``rank_0``, ...)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3, async_save: bool = True):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: Future | None = None
        self._pending_error: BaseException | None = None
        self._lock = threading.Lock()
        self._group = None
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for child in self.directory.glob(TMP_STEP_GLOB):
                shutil.rmtree(child, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            if async_save:
                # Background DCP collectives get their own group (see the module docstring).
                self._group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------------------- saving
    def save(self, step: int, state: dict[str, Any], blocking: bool = False) -> None:
        """Save ``state`` as ``step_<step>``. Non-blocking saves return once tensors are staged."""
        self.wait()
        tmp = self.directory / tmp_step_dir_name(step)
        final = self.directory / step_dir_name(step)
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self.async_save and not blocking:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            future.add_done_callback(lambda f: self._finish(f, tmp, final))
            self._pending = future
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, final)

    def _finish(self, future: Future, tmp: Path, final: Path) -> None:
        try:
            future.result()
            self._commit(tmp, final)
        except BaseException as exc:  # surfaced by the next wait()
            with self._lock:
                self._pending_error = exc

    def _commit(self, tmp: Path, final: Path) -> None:
        if _rank() != 0:
            return
        # fsync the directory entries so the rename is durable before we prune older ones.
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:
            fd = os.open(self.directory, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
        self._prune()

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.directory)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete; re-raise its error."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        with self._lock:
            error, self._pending_error = self._pending_error, None
        if error is not None:
            raise RuntimeError(f"asynchronous checkpoint save failed: {error}") from error
        if dist.is_available() and dist.is_initialized():
            # The rename happens on rank 0; make it visible before anyone lists checkpoints.
            dist.barrier()

    # ------------------------------------------------------------------------------- loading
    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    @staticmethod
    def load(path: str | Path, state: dict[str, Any]) -> None:
        """Load in place the entries of ``state`` (DCP reshards tensors to their current layout)."""
        dcp.load(state, checkpoint_id=str(path))


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
