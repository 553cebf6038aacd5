"""Expected failures: bad input, and the ways a run can fail that are not a bug.

The CLI prints each as one line naming the culprit, plus a line with a hint when there is one,
and exits with the class's ``exit_code``; the traceback appears only with ``--debug`` or
``TIMERS1_DEBUG=1``. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class Timers1Error(Exception):
    """An expected failure; the message names the file, field, value or step concerned."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InputError(Timers1Error, ValueError):
    """Bad input; the message names the file, field or value."""

    exit_code = 2


class CheckpointError(Timers1Error):
    """A checkpoint that cannot be written or read back (corrupt, incomplete, unloadable)."""


class StorageError(Timers1Error):
    """The file system refused a write: no space left, permission denied, read-only."""


class TrainingDiverged(Timers1Error):
    """Training stopped because too many steps in a row had to be skipped."""


# errno values of a file system that refuses to store what we write, with what the user can do.
STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free space there (or lower checkpoint.keep_last) and run the "
                   "same command again; it resumes from the last complete checkpoint"),
    errno.EDQUOT: ("disk quota exceeded", "free space there (or lower checkpoint.keep_last) and run the same "
                   "command again; it resumes from the last complete checkpoint"),
    errno.EACCES: ("permission denied", "choose a run directory you can write (--run-dir) or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a run directory you can write (--run-dir) or fix its permissions"),
    errno.EROFS: ("read-only file system", "choose a run directory on a writable file system (--run-dir)"),
}


def storage_error(exc: BaseException, doing: str | None = None, where: str | None = None) -> StorageError | None:
    """A ``StorageError`` for ``exc`` if it (or an exception it wraps) is a refused write, else None.

    Looks through ``__cause__``/``__context__`` chains and through DCP's CheckpointException,
    which hides each rank's OSError behind its own message (for a full disk torch's writer says
    only "unexpected pos"; the OSError is its context). ``doing`` prefixes the message.
    """
    for inner in exception_chain(exc):
        if isinstance(inner, OSError) and inner.errno in STORAGE_ERRNOS:
            what, hint = STORAGE_ERRNOS[inner.errno]
            path = inner.filename or where
            message = f"{what}: {path}" if path else what
            return StorageError(f"{doing}: {message}" if doing else message, hint=hint)
    return None


def exception_chain(exc: BaseException):
    """``exc`` and every exception it wraps (causes, contexts, DCP's per-rank failures)."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():  # DCP: rank -> (exc, trace)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
