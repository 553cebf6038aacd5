"""Sharded, atomic, optionally asynchronous checkpoints with torch.distributed.checkpoint (DCP).

Layout (names defined in ``timers1.rundir``): ``<run>/checkpoints/step_<N>/`` holding DCP
shards (``__<rank>_<i>.distcp``), ``.metadata`` and the completion marker ``complete.json``.
Every save goes to ``step_<N>.tmp/`` first. Once DCP has finished (its coordinator writes
``.metadata`` after gathering every rank's write results, so rank 0's completion implies
everyone's), rank 0 commits: it writes the completion marker (the size of every file), prunes
the oldest checkpoints down to ``keep_last - 1``, and renames ``step_<N>.tmp`` to ``step_<N>``.
So at every moment at most ``keep_last`` complete checkpoints exist, and a crash at any moment
leaves the last complete one loadable: a ``.tmp`` whose marker checks out (the crash came
between pruning and the rename) is renamed at the next start, any other ``.tmp`` removed.

What is saved (a flat dict of DCP entries):
  ``model``, ``optim``: from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (fully
      qualified names, DTensor shards) so they load at another parallel layout (DCP reshards);
  ``train``: step, layout, scheduler state and guard state (identical on all ranks);
  ``ema``: the averaged weights (``train.ema_decay``; keys and layout as ``model``) and their
      update count;
  ``rank_<r>``: what is private to one rank — RNG states and the data-loader position.
      On a resharded resume the loader position is rebuilt from the step (see the trainer).

Async saves run DCP's collectives on a dedicated gloo group, so they never interleave with
the training collectives on the default group; one save is in flight at a time, and its
commit runs on one background thread whose completion ``wait()`` waits for.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from timers1.errors import CheckpointError, exception_chain, storage_error
# Discovery of complete checkpoints lives with the run-directory layout, so that inference and
# evaluation can find checkpoints without importing the trainer; re-exported here.
from timers1.rundir import (COMPLETE_MARKER, TMP_STEP_GLOB, TMP_SUFFIX, checkpoint_problem,  # noqa: F401
                            latest_checkpoint, list_checkpoints, step_dir_name, step_dirs, tmp_step_dir_name,
                            write_complete_marker)

# Single-process runs are a supported mode, not an accident worth a warning per save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# What a user can do when a save failed; the run itself keeps its last complete checkpoint.
SAVE_FAILED_HINT = ("the last complete checkpoint is kept: fix the cause and run the same command again "
                    "to resume from it")


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if not isinstance(exc, CheckpointException) else _innermost_message(exc)


def _innermost_message(exc: CheckpointException) -> str:
    """DCP's CheckpointException prints each rank's traceback; keep the first rank's own message."""
    for value in exc.failures.values():
        inner = value[0] if isinstance(value, tuple) else value
        return _first_line(inner)
    return "checkpoint operation failed"


def checkpoint_keys(path: str | Path) -> set[str]:
    """Top-level entries stored in a DCP checkpoint (``model``, ``optim``, ``rank_0``, ...)."""
    metadata = _FileNamingReader(str(path)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


class _FileNamingReader(dcp.FileSystemReader):
    """DCP's reader, except that a failed read names the file (DCP's own message names none)."""

    def read_metadata(self):
        try:
            return super().read_metadata()
        except Exception as exc:
            raise CheckpointError(f"{Path(self.path) / '.metadata'}: {_first_line(exc)}") from exc

    def read_data(self, plan, planner):
        opened: list[str] = []
        create_stream = self.fs.create_stream

        def create_named_stream(path, mode):
            opened.append(str(path))
            return create_stream(path, mode)

        self.fs.create_stream = create_named_stream
        try:
            return super().read_data(plan, planner)
        except Exception as exc:
            raise CheckpointError(f"{opened[-1] if opened else self.path}: {_first_line(exc)}") from exc
        finally:
            del self.fs.create_stream


@dataclass
class _Held:
    """A written checkpoint whose commit waits for a verdict on its weights (see ``save``)."""

    step: int
    tmp: Path
    final: Path
    decided: threading.Event = field(default_factory=threading.Event)
    keep: bool = True


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3, async_save: bool = True):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        # The save in flight: (future of its commit, its step); and a written checkpoint held back.
        self._pending: tuple[Future, int] | None = None
        self._held: _Held | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit") \
            if async_save else None
        self._group = None
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._recover_interrupted_saves()
        if _is_dist():
            dist.barrier()
            # Background DCP collectives and the agreement on a save's outcome get their own
            # gloo group (see the module docstring).
            self._group = dist.new_group(backend="gloo")

    def _recover_interrupted_saves(self) -> None:
        """A ``.tmp`` whose marker checks out was committed up to the rename: finish it. Others go."""
        for tmp in sorted(self.directory.glob(TMP_STEP_GLOB)):
            if tmp.is_dir() and checkpoint_problem(tmp) is None:
                final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------- saving
    def save(self, step: int, state: dict[str, Any], blocking: bool = False, hold: bool = False) -> None:
        """Save ``state`` as ``step_<step>``. Non-blocking saves return once tensors are staged.

        ``hold``: write it now but commit it only at ``resolve(keep=True)`` (``keep=False``
        drops it); the trainer holds a checkpoint until the next step shows that its weights
        train on. A failed save raises ``CheckpointError`` (or ``StorageError``) on every rank:
        a blocking one here, an asynchronous one from ``raise_failure`` / ``wait``.
        """
        self.wait()
        tmp = self.directory / tmp_step_dir_name(step)
        final = self.directory / step_dir_name(step)
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        if _is_dist():
            dist.barrier()
        held = _Held(step, tmp, final) if hold else None
        if self.async_save and not blocking:
            written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = (self._committer.submit(self._finish, written, held, step, tmp, final), step)
            self._held = held
            return
        error = None
        try:
            dcp.save(state, checkpoint_id=str(tmp))
            if held is None:
                self._commit(step, tmp, final)
        except (Exception, CheckpointException) as exc:
            error = exc
        self._raise_if_any_failed(error, step)
        self._held = held

    def _finish(self, written: Future, held: _Held | None, step: int, tmp: Path, final: Path) -> None:
        written.result()
        if held is not None:
            held.decided.wait()
            if not held.keep:
                self._drop(tmp)
                return
        self._commit(step, tmp, final)

    def resolve(self, keep: bool) -> None:
        """Commit (``keep``) or drop the held checkpoint, if there is one."""
        held, self._held = self._held, None
        if held is None:
            return
        held.keep = keep
        held.decided.set()
        if self._pending is not None and self._pending[1] == held.step:
            return  # an asynchronous save: its commit thread acts on the verdict
        error = None
        try:
            if keep:
                self._commit(held.step, held.tmp, held.final)
            else:
                self._drop(held.tmp)
        except Exception as exc:
            error = exc
        self._raise_if_any_failed(error, held.step)

    @staticmethod
    def _drop(tmp: Path) -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        if _rank() != 0:
            return
        write_complete_marker(tmp, step)
        self._prune(below=step)
        if final.exists():  # an incomplete step_<N> left by an earlier run
            shutil.rmtree(final)
        os.replace(tmp, final)
        # fsync the directory entry so that the rename is durable.
        try:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _prune(self, below: int) -> None:
        """Leave ``keep_last - 1`` complete checkpoints older than ``below``: the new one makes keep_last.

        Step directories older than the oldest kept go too (complete or not); the marker goes
        first, so a checkpoint half-way through removal is never taken for a complete one.
        """
        older = [(s, p) for s, p in list_checkpoints(self.directory) if s < below]
        kept = older[max(0, len(older) - (self.keep_last - 1)):] if self.keep_last > 1 else []
        oldest_kept = kept[0][0] if kept else below
        for step, path in step_dirs(self.directory):
            if step < oldest_kept:
                (path / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------- outcome
    def failed(self) -> bool:
        """Whether the save in flight has finished and failed (on this rank); does not block."""
        return self._pending is not None and self._pending[0].done() and self._pending[0].exception() is not None

    def raise_failure(self) -> None:
        """Raise the failure of the save in flight (call when ``failed()`` on some rank), once."""
        self._held = None  # a failed save holds nothing
        if self._pending is None:
            raise self._save_error(None, -1)
        (future, step), self._pending = self._pending, None
        raise self._save_error(future.exception() if future.done() else None, step)

    def wait(self) -> None:
        """Block until the save in flight is committed (renamed, pruned) on every rank.

        Its failure is raised once, here, unless ``raise_failure`` already did. A checkpoint
        still held is committed: nothing has shown its weights to be bad.
        """
        self.resolve(keep=True)
        if self._pending is None:
            if _is_dist():
                dist.barrier(group=self._group)
            return
        (future, step), self._pending = self._pending, None
        self._raise_if_any_failed(future.exception(), step)

    def _raise_if_any_failed(self, error: BaseException | None, step: int) -> None:
        """Every rank learns whether any rank's save failed (and raises); also a barrier."""
        failed = error is not None
        if _is_dist():
            flag = torch.tensor([1.0 if failed else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            failed = bool(flag.item())
        if failed:
            raise self._save_error(error, step)

    def _save_error(self, error: BaseException | None, step: int) -> CheckpointError:
        where = self.directory / step_dir_name(step) if step >= 0 else self.directory
        if error is None:
            return CheckpointError(f"saving {where} failed on another rank", hint=SAVE_FAILED_HINT)
        refused = storage_error(error, doing=f"saving {where}", where=str(self.directory))
        if refused is not None:
            return refused
        return CheckpointError(f"saving {where} failed: {_first_line(error)}", hint=SAVE_FAILED_HINT)

    # ------------------------------------------------------------------------------- loading
    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    @staticmethod
    def load(path: str | Path, state: dict[str, Any]) -> None:
        """Load in place the entries of ``state`` (DCP reshards tensors to their current layout).

        A checkpoint that cannot be read raises ``CheckpointError`` naming the file when known.
        """
        try:
            dcp.load(state, storage_reader=_FileNamingReader(str(path)))
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:
            named = next((e for e in exception_chain(exc) if isinstance(e, CheckpointError)), None)
            raise CheckpointError(str(named) if named else f"{path}: {_first_line(exc)}") from exc


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
