"""`timers1 bench checkpoint`: DCP save/load GB/s against this disk, and the cost of async saves.

Baselines measured in the same run, in the same directory:
  * raw write: one file of the checkpoint's size written with large writes and fsync'ed (DCP's
    file writer fsyncs too), raw read: the same file read back. Reads of both come from the
    page cache when the file fits in memory; they are compared like for like.
  * async overhead: mean training-step time while an async save runs every few steps, against
    the same steps with no saving.
Targets (issue): DCP at >= 0.5 of raw bandwidth; async saving costs <= 5% of step time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/small_cpu.yaml", help="model for the async-overhead part")
    p.add_argument("--state-mib", type=int, default=512, help="size of the state saved in the bandwidth part")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir on the run disk)")
    p.add_argument("--steps", type=int, default=24, help="training steps per arm of the overhead part")
    p.add_argument("--save-every", type=int, default=6, help="async save interval in the overhead part")


def _raw_write_read(path: Path, nbytes: int) -> tuple[float, float]:
    block = os.urandom(1 << 20) * 16  # 16 MiB
    started = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    read_s = time.perf_counter() - started
    return written / write_s / 1e9, written / read_s / 1e9


def state_bytes(state) -> int:
    """Bytes of every tensor in a nested dict of tensors."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    return state.numel() * state.element_size() if hasattr(state, "numel") else 0


def dcp_vs_raw(state: dict, root: Path) -> dict:
    """DCP save and load of ``state`` (tensors on any device) under ``root``, against a raw
    write and read of a file of the same size on the same disk; the loaded copy must equal the
    saved one. Returns the GB/s figures and the two ratios (target >= 0.5)."""
    import torch
    import torch.distributed.checkpoint as dcp

    nbytes = state_bytes(state)
    raw_write, raw_read = _raw_write_read(root / "raw.bin", nbytes)
    (root / "raw.bin").unlink()

    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    started = time.perf_counter()
    dcp.save(state, checkpoint_id=str(root / "dcp"))
    save_gbs = nbytes / (time.perf_counter() - started) / 1e9
    target = _empty_like_tree(state)
    _sync()
    started = time.perf_counter()
    dcp.load(target, checkpoint_id=str(root / "dcp"))
    _sync()
    load_gbs = nbytes / (time.perf_counter() - started) / 1e9
    if not _equal_trees(target, state):
        raise AssertionError("DCP load did not return the saved tensors")
    shutil.rmtree(root / "dcp", ignore_errors=True)
    return {"bytes": nbytes, "dcp_save_gb_s": round(save_gbs, 3), "raw_write_gb_s": round(raw_write, 3),
            "save_ratio": round(save_gbs / raw_write, 3),
            "dcp_load_gb_s": round(load_gbs, 3), "raw_read_gb_s": round(raw_read, 3),
            "load_ratio": round(load_gbs / raw_read, 3), "target_ratio": 0.5}


def _empty_like_tree(state):
    import torch

    if isinstance(state, dict):
        return {k: _empty_like_tree(v) for k, v in state.items()}
    return torch.empty_like(state) if isinstance(state, torch.Tensor) else state


def _equal_trees(a, b) -> bool:
    import torch

    if isinstance(b, dict):
        return all(_equal_trees(a[k], v) for k, v in b.items())
    return torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b


def run(args) -> int:
    import torch

    from timers1.config import load_config
    from timers1.model import build_model
    from timers1.train.checkpoint import CheckpointManager
    from timers1.parallel.engine import build_engine
    from timers1.train.optim import build_optimizer

    root = Path(tempfile.mkdtemp(prefix="timers1-bench-ckpt-", dir=args.dir))
    try:
        # --- bandwidth: a state of many tensors, as a sharded model's is
        numel = args.state_mib * 2**20 // 4
        pieces = 64
        state = {"model": {f"w{i}": torch.randn(numel // pieces) for i in range(pieces)}}
        print(json.dumps({"bench": "checkpoint", "metric": "bandwidth", **dcp_vs_raw(state, root)}))
        del state

        # --- async overhead on real training steps
        cfg = load_config(args.config)
        model = build_model(cfg.model, cfg.moe)
        engine = build_engine(model, cfg, world_size=1)
        optimizer = build_optimizer([model], cfg.train)
        width = cfg.window_points
        values = torch.randn(cfg.train.batch_size, width).cumsum(-1)
        mask = torch.ones_like(values)

        def step():
            optimizer.zero_grad(set_to_none=True)
            engine.forward_backward(values, mask)
            optimizer.step()

        def arm(save: bool) -> float:
            manager = CheckpointManager(root / ("async" if save else "none"), keep_last=2, async_save=True)
            times = []
            for i in range(args.steps):
                started = time.perf_counter()
                step()
                if save and (i + 1) % args.save_every == 0:
                    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

                    manager.save(i + 1, {"model": get_model_state_dict(model),
                                         "optim": get_optimizer_state_dict(model, optimizer)})
                times.append(time.perf_counter() - started)
            manager.wait()
            return sum(times) / len(times)

        for _ in range(2):
            step()
        baseline = arm(save=False)
        with_async = arm(save=True)
        ckpt_bytes = sum(p.numel() * 4 * 3 for p in model.parameters())
        print(json.dumps({"bench": "checkpoint", "metric": "async_overhead", "config": args.config,
                          "checkpoint_bytes": ckpt_bytes, "save_every_steps": args.save_every,
                          "step_s_no_save": round(baseline, 4), "step_s_async_save": round(with_async, 4),
                          "overhead": round(with_async / baseline - 1, 4), "target_overhead": 0.05}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


NAME = "checkpoint"
HELP = "DCP save/load GB/s vs raw disk; async-save step overhead"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
