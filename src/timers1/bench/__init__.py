"""Benchmarks: `timers1 bench <name>`; each prints JSON lines with ratios measured in the same run."""
