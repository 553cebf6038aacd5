"""Per-step metrics: one JSONL line per logged step, TensorBoard scalars, MFU and expert load."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.3) -> float:
    """Dense matmul TFLOP/s this device sustains now: the denominator of MFU when none is configured."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iterations += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * iterations / (time.perf_counter() - start) / 1e12


def expert_load_stats(tokens_per_expert_LE: torch.Tensor) -> dict[str, Any]:
    """Per MoE block: max/mean load ratio and the number of experts that got no token."""
    counts = tokens_per_expert_LE.double()
    mean = counts.mean(dim=1).clamp_min(1e-9)
    max_over_mean = (counts.max(dim=1).values / mean).tolist()
    idle = (counts == 0).sum(dim=1).tolist()
    return {
        "expert_load_max_over_mean": [round(x, 3) for x in max_over_mean],
        "experts_idle": [int(x) for x in idle],
        "expert_load_max_over_mean_worst": round(max(max_over_mean), 3) if max_over_mean else 0.0,
    }


def memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        stats["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return stats


class MetricsLogger:
    """Writes ``metrics.jsonl`` (rank 0) and TensorBoard events under the run directory.

    ``after_step``: the step training continues from. Lines of later steps (written before a
    crash or kill, about to be redone) and a torn last line are dropped first, so the file
    holds each step once, however many times the run resumed.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 after_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        if enabled and after_step is not None:
            self._keep_steps_up_to(after_step)
        self._file = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                self._tb = None

    def _keep_steps_up_to(self, last_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the line a kill cut short
            if isinstance(record, dict) and record.get("step", 0) <= last_step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
