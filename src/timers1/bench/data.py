"""`timers1 bench data`: window-sampling throughput per core vs what one H100 consumes.

Measures, in this process on one core, points per second for the loader's whole per-batch
work (slot -> series lookup, window gather, masking, flip and Fourier resampling) on a built
corpus, and compares it with the points per second the flagship Timer-S1 trains on at 30% MFU
on one H100 (bf16 dense peak 989 TFLOP/s):

    gpu_points_per_s = 0.30 * 989e12 / train_flops_per_patch(model, moe, context_patches) * P

The ratio is how many GPUs one loader core can feed (> 1 means the loader is not the
bottleneck). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

H100_BF16_DENSE_PEAK_FLOPS = 989e12
TARGET_POINTS_PER_S_PER_CORE = 20e6


def _flagship_train_flops_per_patch(context_patches: int) -> float:
    """Training FLOPs per patch token of the flagship (benchmarks may import the model)."""
    from timers1.config import ModelConfig, MoEConfig
    from timers1.model.flops import train_flops_per_patch

    return float(train_flops_per_patch(ModelConfig(), MoEConfig(), context_patches))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None, help="compiled corpus dir; default: build a default corpus in a temp dir")
    p.add_argument("--num-synthetic-series", type=int, default=800, help="size of the corpus built when --corpus is not given")
    p.add_argument("--window-points", type=int, default=2880, help="points per window (flagship context: 2880)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per batch")
    p.add_argument("--flip-probability", type=float, default=0.5, help="augmentation: chance a window is flipped")
    p.add_argument("--resample-probability", type=float, default=0.2, help="augmentation: chance a window is resampled")
    p.add_argument("--seconds", type=float, default=3.0, help="time spent measuring each configuration")
    p.add_argument("--mfu", type=float, default=0.30, help="MFU of the H100 whose consumption the loader is compared with")


def _measure(sampler, batch_size: int, seconds: float, warm: bool = True) -> float:
    if warm:
        sampler.sample(0, batch_size)  # warm-up: page in the corpus, build FFT plans
    batches, slot = 0, 0
    started = time.perf_counter()
    while True:
        sampler.sample(slot, batch_size)
        slot += batch_size
        batches += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and batches >= 3:
            return batches * batch_size * sampler.window_points / elapsed


def run(args) -> int:
    from timers1.config import ModelConfig
    from timers1.data.builder import build_default_corpus
    from timers1.data.compiled import open_compiled
    from timers1.data.loader import WindowSampler

    tmp = None
    corpus_dir = args.corpus
    if corpus_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="timers1-bench-data-")
        corpus_dir = tmp.name
        build_default_corpus(corpus_dir, num_synthetic_series=args.num_synthetic_series, progress=False)
    corpus = open_compiled(corpus_dir)  # what training reads
    results = {}
    for name, flip, resample in (("sample_mask", 0.0, 0.0),
                                 ("sample_mask_augment", args.flip_probability, args.resample_probability)):
        sampler = WindowSampler(corpus, args.window_points, seed=0, flip_probability=flip,
                                resample_probability=resample)
        pps = _measure(sampler, args.batch_size, args.seconds)
        results[name] = pps
        observed = float(sampler.sample(10**6, args.batch_size).mask.mean())
        print(json.dumps({"bench": "data", "metric": "loader_points_per_s_per_core", "config": name,
                          "value": round(pps), "window_points": args.window_points,
                          "batch_size": args.batch_size, "flip_probability": flip,
                          "resample_probability": resample, "corpus_series": corpus.num_series,
                          "corpus_points": corpus.num_points,
                          "observed_fraction": round(observed, 3),
                          "target": TARGET_POINTS_PER_S_PER_CORE,
                          "meets_target": bool(pps >= TARGET_POINTS_PER_S_PER_CORE)}))
    patch = ModelConfig().patch_points
    context_patches = args.window_points // patch
    flops_per_patch = _flagship_train_flops_per_patch(context_patches)
    gpu_pps = args.mfu * H100_BF16_DENSE_PEAK_FLOPS / flops_per_patch * patch
    print(json.dumps({"bench": "data", "metric": "h100_flagship_points_per_s", "value": round(gpu_pps),
                      "mfu": args.mfu, "peak_flops": H100_BF16_DENSE_PEAK_FLOPS,
                      "train_flops_per_patch": flops_per_patch, "context_patches": context_patches}))
    ratio = results["sample_mask_augment"] / gpu_pps
    print(json.dumps({"bench": "data", "metric": "loader_core_to_h100_ratio", "value": round(ratio, 2),
                      "meaning": "H100s (flagship, 30% MFU) one loader core can feed, with augmentation",
                      "plain_ratio": round(results["sample_mask"] / gpu_pps, 2)}))
    if tmp is not None:
        tmp.cleanup()
    return 0


NAME = "data"
HELP = "loader points/s per core vs flagship H100 consumption (JSON lines)"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
