"""`timers1 bench <name>`: each benchmark module in BENCH_MODULES adds its own sub-subcommand.

A module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``; this file
registers it, and ``bench_main`` runs it on its own (``python -m timers1.bench.<name>``).
Modules load lazily here so a benchmark whose optional dependency is missing does not break
the others.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

# Benchmark modules; each defines NAME, HELP, add_arguments(parser) and run(args) -> int.
BENCH_MODULES = [
    "timers1.bench.kernels",
    "timers1.bench.moe",
    "timers1.bench.data",
    "timers1.bench.corpus",
    "timers1.bench.dispatch",
    "timers1.bench.train",
    "timers1.bench.checkpoint",
    "timers1.bench.optimizer",
    "timers1.bench.gpu",
    "timers1.bench.peak",
    "timers1.bench.plan",
]


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print JSON lines with measured ratios",
                                  description="Benchmarks: each prints JSON lines with ratios against a baseline "
                                              "measured in the same run.",
                                  epilog="examples:\n  timers1 bench peak\n  timers1 bench kernels --ops swiglu_experts")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK",
                               help="one of the benchmarks below")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a benchmark with a missing optional dependency
            print(f"timers1 bench: {name} unavailable: {exc}", file=sys.stderr)
            continue
        p = sub.add_parser(module.NAME, help=module.HELP, description=_description(module),
                           epilog=f"example:\n  {getattr(module, 'EXAMPLE', f'timers1 bench {module.NAME}')}")
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def _description(module) -> str:
    """The module's docstring, as help text (without reStructuredText's backquotes)."""
    return inspect.cleandoc(module.__doc__).replace("`", "")


def bench_main(module, argv: list[str] | None = None) -> int:
    """``python -m timers1.bench.<name>``: the same benchmark without the CLI around it."""
    p = argparse.ArgumentParser(prog=f"timers1 bench {module.NAME}", description=_description(module),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return module.run(p.parse_args(argv))
