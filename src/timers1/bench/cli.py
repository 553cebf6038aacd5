"""`timers1 bench <name>`: each benchmark module in BENCH_MODULES adds its own sub-subcommand.

A module exposes ``register_bench(subparsers)`` (adds its parser and sets ``func``) and
``main(argv)`` for running it on its own. Modules load lazily here so a benchmark whose
optional dependency is missing does not break the others.
"""

from __future__ import annotations

import importlib
import sys

# Benchmark modules; each has register_bench(subparsers).
BENCH_MODULES = [
    "timers1.bench.kernels",
    "timers1.bench.moe",
    "timers1.bench.data",
    "timers1.bench.train",
    "timers1.bench.checkpoint",
    "timers1.bench.dispatch",
]


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print JSON lines with measured ratios")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a benchmark with a missing optional dependency
            print(f"timers1 bench: {name} unavailable: {exc}", file=sys.stderr)
            continue
        module.register_bench(sub)
