"""The host allocator tuning (timers1.host_memory): a step's freed memory is reused, not faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# A step's worth of 0.25-4 MiB temporaries (an MLP forward + backward), then the minor page faults
# per step once warm. Run in a fresh interpreter: the tuning is process-wide.
STEP_FAULTS = """
import resource, torch
from timers1.host_memory import keep_freed_host_memory
print(keep_freed_host_memory())
torch.manual_seed(0)
w1 = torch.randn(256, 1024, requires_grad=True)
w2 = torch.randn(1024, 256, requires_grad=True)
x = torch.randn(1024, 256)
def step():
    ((torch.nn.functional.silu(x @ w1) @ w2) ** 2).mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(keep: str) -> tuple[bool, float]:
    # The baseline is glibc's own behaviour: no malloc settings or preloaded allocator of this shell.
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    env["TIMERS1_KEEP_FREED_MEMORY"] = keep
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_tuned_allocator_stops_refaulting_a_steps_memory():
    applied_off, faults_off = _faults_per_step("0")
    applied_on, faults_on = _faults_per_step("1")
    assert (applied_off, applied_on) == (False, True)
    # Untuned, glibc gives freed blocks back and the next step faults them in again (~600 a step
    # here); tuned, the heap keeps them (~130: the gradients' first touch).
    assert faults_on < 0.5 * faults_off, (faults_on, faults_off)
