"""`timers1 bench peak`: measure this machine's dense matmul peak and cache it for MFU.

The peak is the best of ``--trials`` runs of ``--seconds`` each (a busy moment lowers one run,
not the best of several). It is stored per machine, device, dtype and thread count in
``$TIMERS1_CACHE/peak_tflops.json`` (default ``~/.cache/timers1``); `timers1 train` then uses it
(``peak_source: cached`` in metrics.jsonl) unless ``train.peak_tflops`` is set.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLE = "timers1 bench peak --trials 10"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="default: what training uses there (bf16 on cuda, fp32 on cpu)")
    p.add_argument("--trials", type=int, default=10, help="measurements; the best one is the peak")
    p.add_argument("--seconds", type=float, default=0.3, help="length of each measurement")
    p.add_argument("--size", type=int, default=None, help="matrix size (default: 4096 on cuda, 1024 on cpu)")
    p.add_argument("--no-store", action="store_true", help="print the peak without caching it")


def run(args) -> int:
    import torch

    from timers1.train.metrics import machine_key, measure_peak_tflops, store_peak_tflops

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size = args.size or (4096 if device.type == "cuda" else 1024)
    tflops = measure_peak_tflops(device, dtype, size=size, seconds=args.seconds, trials=args.trials)
    record = {"bench": "peak", "device": device.type, "dtype": str(dtype), "shape": [size] * 3,
              "trials": args.trials, "seconds_each": args.seconds, "tflops": float(f"{tflops:.6g}"),
              "machine": machine_key(device, dtype)}
    if not args.no_store:
        record["cached_in"] = str(store_peak_tflops(device, dtype, tflops))
    print(json.dumps(record))
    return 0


NAME = "peak"
HELP = "measure and cache this machine's matmul peak, the denominator of MFU in training"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
