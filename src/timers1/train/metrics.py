"""Per-step metrics: one JSONL line per logged step, TensorBoard scalars, MFU and expert load."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch


# Peak measurements: best of PEAK_TRIALS runs of PEAK_TRIAL_SECONDS each. A single measurement
# taken while something else runs is low, and every MFU computed against it is then too high
# (above 1 is impossible); the best of several short ones is close to what the device can do.
PEAK_TRIALS = 5
PEAK_TRIAL_SECONDS = 0.1
PEAK_CACHE_FILE = "peak_tflops.json"


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = PEAK_TRIAL_SECONDS, trials: int = PEAK_TRIALS) -> float:
    """Dense matmul TFLOP/s on this device: the best of ``trials`` runs of ``seconds`` each."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(max(1, trials)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        iterations, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            iterations += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * iterations / (time.perf_counter() - start) / 1e12)
    return best


def peak_cache_path() -> Path:
    """``$TIMERS1_CACHE/peak_tflops.json`` (default ~/.cache/timers1), where ``timers1 bench peak`` writes."""
    root = os.environ.get("TIMERS1_CACHE") or Path.home() / ".cache" / "timers1"
    return Path(root) / PEAK_CACHE_FILE


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a cached peak belongs to: host, device model, threads (CPU), dtype, torch version.

    The host name is part of it because a home directory (and so the cache) is often shared by
    the nodes of a cluster.
    """
    import platform

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.machine()} {_cpu_model()} threads={torch.get_num_threads()}"
    return f"{platform.node()}|{device.type}|{what}|{str(dtype).removeprefix('torch.')}|torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def cached_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak ``timers1 bench peak`` stored for this machine, device and dtype, if any."""
    try:
        entries = json.loads(peak_cache_path().read_text())
        value = float(entries[machine_key(device, dtype)]["tflops"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or a cache another version wrote: measure instead
    return value if value > 0 else None


def store_peak_tflops(device: torch.device, dtype: torch.dtype, tflops: float) -> Path:
    """Record ``tflops`` as this machine's peak for ``device`` and ``dtype``; returns the cache file."""
    path = peak_cache_path()
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[machine_key(device, dtype)] = {"tflops": tflops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


class PeakFlops:
    """The denominator of MFU and where it came from (``source``, logged as ``peak_source``).

    In order: ``train.peak_tflops`` when set ("configured"), the peak ``timers1 bench peak``
    cached for this machine ("cached"), else a best-of-several measurement now ("measured").
    A step that does more than the peak proves the peak too low: the peak becomes that step's
    rate ("observed"), so MFU never exceeds 1.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0):
        if configured_tflops > 0:
            self.tflops, self.source = float(configured_tflops), "configured"
        elif (cached := cached_peak_tflops(device, dtype)) is not None:
            self.tflops, self.source = cached, "cached"
        else:
            self.tflops, self.source = measure_peak_tflops(device, dtype), "measured"

    def mfu(self, flops_per_s_per_device: float) -> float:
        """Model FLOP/s of one device over its peak: at most 1."""
        achieved_tflops = flops_per_s_per_device / 1e12
        if achieved_tflops > self.tflops:
            self.tflops, self.source = achieved_tflops, "observed"
        return achieved_tflops / self.tflops


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
