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
import textwrap

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

DESCRIPTION = "Train, evaluate and run Timer-S1 time-series Mixture-of-Experts forecasters."
EPILOG = """first steps:
  timers1 train --config configs/small_cpu.yaml     train a small model on 2 CPU cores (about 5 minutes)
  timers1 forecast --checkpoint runs/small_cpu --input series.csv --horizon 48 --output forecast.csv
  timers1 COMMAND --help                            options and an example of each command"""

# Subcommands whose module another piece of work owns right now: the example lives here until
# that module gives its parser one (`epilog`) itself.
EXAMPLE_FALLBACK = {
    "plan": "example:\n  timers1 plan --config configs/timer_s1_8b.yaml --gpus 128 --gpu-mem-gib 80",
}


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs but keeps indented lines (examples) as written; adds "(default: X)"
    to an option's help when X says something (not None, False or empty) and the help does not
    name a default itself."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines[1:]) or len(lines) > 1 and lines[0].endswith(":"):
                paragraphs.append("\n".join(indent + line for line in lines))  # a heading and examples
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, "", []) or default is argparse.SUPPRESS
                or "default" in help_text):
            return help_text
        return f"{help_text} (default: %(default)s)"


def subparsers_of(parser: argparse.ArgumentParser):
    """(command path, parser, its one-line help) of every subcommand under ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            help_of = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, help_of.get(name)
                for path, deeper, help_text in subparsers_of(sub):
                    yield f"{name} {path}", deeper, help_text


def build_parser() -> argparse.ArgumentParser:
    from timers1 import __version__

    parser = argparse.ArgumentParser(prog="timers1", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"timers1 {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; timers1 COMMAND --help shows its options and an example")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for subparser in sub.choices.values():  # also after the subcommand: `timers1 train ... --debug`
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    for path, subparser, help_text in subparsers_of(parser):
        subparser.formatter_class = HelpFormatter
        if not subparser.description and help_text:  # the one line `timers1 --help` shows
            subparser.description = help_text[:1].upper() + help_text[1:] + "."
        subparser.epilog = subparser.epilog or EXAMPLE_FALLBACK.get(path)
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
    from timers1.host_memory import keep_freed_host_memory

    keep_freed_host_memory()
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
