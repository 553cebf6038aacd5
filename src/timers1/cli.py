"""`timers1` command line: one subcommand per capability.

Each capability module exposes ``register(subparsers)``, which adds its subcommand(s) and sets
``func`` on the parsed namespace. Modules load lazily at parser-build time so that a broken or
heavy optional dependency of one subcommand never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from timers1.errors import InputError

# Modules that contribute subcommands; each has register(subparsers).
SUBCOMMAND_MODULES = [
    "timers1.commands",
    "timers1.train.cli",
    "timers1.eval.cli",
    "timers1.data.cli",
    "timers1.bench.cli",
    "timers1.parallel.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timers1", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as exc:
        # Bad input: a one-line message naming the culprit, no traceback.
        print(f"timers1 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
