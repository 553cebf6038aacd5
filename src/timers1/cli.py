"""`timers1` command line: one subcommand per capability.

Each capability module exposes ``register(subparsers)``, which adds its subcommand(s) and sets
``func`` on the parsed namespace. Modules load lazily at parser-build time so that a broken or
heavy optional dependency of one subcommand never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from timers1.errors import InputError, Timers1Error, storage_error

# Modules that contribute subcommands; each has register(subparsers).
SUBCOMMAND_MODULES = [
    "timers1.commands",
    "timers1.train.cli",
    "timers1.eval.cli",
    "timers1.data.cli",
    "timers1.bench.cli",
    "timers1.parallel.cli",
]


DEBUG_HELP = "show the traceback of an expected failure too (also TIMERS1_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timers1", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for subparser in sub.choices.values():  # also after the subcommand: `timers1 train ... --debug`
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def expected_failure(exc: BaseException) -> Timers1Error | None:
    """The one-line form of an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, Timers1Error):
        return exc
    if isinstance(exc, OSError):
        refused = storage_error(exc)
        if refused is not None:
            return refused
        if isinstance(exc, FileNotFoundError):
            return InputError(str(exc))
    return None


def _command(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    signals = None
    if _command(argv) == "train":
        # First thing: building the parser alone imports torch (seconds), and SLURM's warning
        # signal may come during any of it; see timers1.train.faults.PreemptionSignals.
        from timers1.train.faults import PreemptionSignals

        signals = PreemptionSignals().__enter__()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.signals = signals
    debug = args.debug or os.environ.get("TIMERS1_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        failure = expected_failure(exc)
        if failure is None or debug:
            raise
        # An expected failure: one line naming the culprit (and a hint), no traceback.
        print(f"timers1 {args.command}: error: {failure}", file=sys.stderr)
        if failure.hint:
            print(f"hint: {failure.hint}", file=sys.stderr)
        return failure.exit_code
    finally:
        if signals is not None:
            signals.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
