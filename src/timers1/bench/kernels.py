"""`timers1 bench kernels`: each MoE kernel op against its PyTorch reference and this machine's peak.

One JSON line per op (plus one per peak measurement), e.g.
  {"bench": "kernels", "op": "swiglu_experts", "pass": "fwd+bwd", "ms": ..., "tflops": ...,
   "ref_ms": ..., "speedup_vs_ref": ..., "frac_of_peak": ...}
The op runs through its dispatcher with backend='auto' (Triton on CUDA, the hand-written
PyTorch path on CPU); the reference is the autograd oracle (``*_reference``). GEMM ops are
scored in TFLOP/s against a dense ``torch.mm`` of the same FLOPs measured in this run; routing and
permutation in GB/s (bytes that must move at least once) against a 64 MiB ``copy_``. Both peaks
are the best of several runs. A memory-bound op whose working set fits in the CPU's caches can
still move bytes faster than the 64 MiB copy (which goes to DRAM): its frac_of_peak may exceed 1,
which says "cache-resident", not "faster than the machine". Timings of op and reference are
interleaved, repeat by repeat, and the median is reported, so a noisy neighbour on a shared
machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from timers1.kernels import permute, route, swiglu_experts, unpermute
from timers1.kernels.grouped_gemm import swiglu_experts_reference
from timers1.kernels.permute import permute_reference, unpermute_reference
from timers1.kernels.routing import route_reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 1, inner: int = 1,
                     summary=statistics.median) -> dict:
    """Median (or ``summary``) seconds per call of each fn, running them round-robin ``repeats`` times.

    Each sample times ``inner`` back-to-back calls between two device syncs, so that ops of a
    few microseconds on a GPU are not measured as the cost of the sync itself.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: summary(v) for name, v in samples.items()}


@contextlib.contextmanager
def maybe_profile(directory: str | None, name: str, device: torch.device):
    """torch.profiler around the block when ``directory`` is set; writes DIR/<name>.json."""
    if not directory:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        yield
    prof.export_chrome_trace(str(Path(directory) / f"{name}.json"))


def emit(record: dict) -> str:
    """Print ``record`` as one JSON line (floats to 6 significant digits); returns the line."""
    line = json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in record.items()})
    print(line, flush=True)
    return line


def measure_peaks(device: torch.device, dtype: torch.dtype, repeats: int, size: int | None = None
                  ) -> tuple[float, float]:
    """(dense matmul TFLOP/s on size^3, memcpy GB/s counting bytes read + written) measured here and now.

    Each is the best of ``repeats`` runs, not the median: a peak is what the device can do, and
    a median taken while a neighbour runs puts ops above it (frac_of_peak > 1).
    """
    n = size or (4096 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(64 * 2**20 // 4, device=device, dtype=torch.float32)  # 64 MiB
    dst = torch.empty_like(src)
    t = time_interleaved({"mm": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)}, device, max(repeats, 5),
                         summary=min)
    return 2 * n**3 / t["mm"] / 1e12, 2 * src.numel() * 4 / t["copy"] / 1e9


def _fwd_bwd(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad_out)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    T, D, E, K, Fw = args.tokens, args.hidden, args.experts, args.top_k, args.expert_width
    S = T * K
    peak_n = 4096 if device.type == "cuda" else 2048
    peak_tflops, peak_gbs = measure_peaks(device, dtype, args.repeats, peak_n)
    emit({"bench": "kernels", "op": "peak_matmul", "shape": [peak_n] * 3, "dtype": str(dtype), "tflops": peak_tflops})
    emit({"bench": "kernels", "op": "peak_memcpy", "bytes": 64 * 2**20, "gbs": peak_gbs})
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_TD = torch.randn(T, D, generator=gen).to(device, dtype).requires_grad_()
    logits_TE = torch.randn(T, E, generator=gen).to(device, dtype).requires_grad_()
    ws = [(torch.randn(*s, generator=gen) * 0.02).to(device, dtype).requires_grad_()
          for s in ((E, Fw, D), (E, Fw, D), (E, D, Fw))]
    r = route_reference(logits_TE.detach(), K)
    slots, counts, w_TK = r.sorted_slots_S, r.tokens_per_expert_E, r.weights_TK.detach().requires_grad_()
    x_SD = permute_reference(x_TD.detach(), slots, K).requires_grad_()
    esize = torch.finfo(dtype).bits // 8
    g_TD = torch.randn(T, D, device=device, dtype=dtype)
    g_SD = torch.randn(S, D, device=device, dtype=dtype)
    base = {"bench": "kernels", "device": device.type, "dtype": str(dtype), "T": T, "D": D, "E": E, "K": K, "F": Fw}

    def loss_route(rt):
        return (rt.weights_TK.sum() + rt.probs_TE.sum())

    ops = {
        # name: (op, reference, min bytes moved or flops, kind)
        "route": (
            lambda: loss_route(route(logits_TE, K, backend=args.backend)).backward(),
            lambda: loss_route(route_reference(logits_TE, K)).backward(),
            # logits in, probs out, grads both ways; slots/ids/weights out
            T * E * (esize + 4) * 2 + S * (8 + 8 + 4), "bytes",
        ),
        "permute": (
            lambda: _fwd_bwd(lambda: permute(x_TD, slots, K, backend=args.backend), [x_TD], g_SD),
            lambda: _fwd_bwd(lambda: permute_reference(x_TD, slots, K), [x_TD], g_SD),
            2 * (T * D + S * D) * esize, "bytes",
        ),
        "unpermute": (
            lambda: _fwd_bwd(lambda: unpermute(x_SD, slots, w_TK, backend=args.backend), [x_SD, w_TK], g_TD),
            lambda: _fwd_bwd(lambda: unpermute_reference(x_SD, slots, w_TK), [x_SD, w_TK], g_TD),
            # fwd: read S*D, write T*D; bwd: read T*D (+S*D for dw), write S*D
            (3 * S * D + 2 * T * D) * esize, "bytes",
        ),
        "swiglu_experts": (
            lambda: _fwd_bwd(lambda: swiglu_experts(x_SD, counts, *ws, backend=args.backend), [x_SD, *ws], g_SD),
            lambda: _fwd_bwd(lambda: swiglu_experts_reference(x_SD, counts, *ws), [x_SD, *ws], g_SD),
            18 * S * D * Fw, "flops",  # 3 GEMMs of 2*S*D*F forward, twice that backward
        ),
    }
    for name, (op, ref, amount, kind) in ops.items():
        if args.ops and name not in args.ops:
            continue
        t = time_interleaved({"op": op, "ref": ref}, device, args.repeats)
        rec = dict(base, op=name, **{"pass": "fwd+bwd"}, ms=t["op"] * 1e3, ref_ms=t["ref"] * 1e3,
                   speedup_vs_ref=t["ref"] / t["op"])
        if kind == "flops":
            rec.update(tflops=amount / t["op"] / 1e12, frac_of_peak=amount / t["op"] / 1e12 / peak_tflops)
        else:
            rec.update(gbs=amount / t["op"] / 1e9, frac_of_peak=amount / t["op"] / 1e9 / peak_gbs)
        emit(rec)
        with maybe_profile(args.profile, f"kernels_{name}", device):
            op()
            ref()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernel implementation (auto: Triton on CUDA, the PyTorch fast path on CPU)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens T routed through the layer")
    p.add_argument("--hidden", type=int, default=256, help="model width D")
    p.add_argument("--experts", type=int, default=32, help="experts E")
    p.add_argument("--top-k", type=int, default=2, help="experts per token K")
    p.add_argument("--expert-width", type=int, default=512, help="expert hidden width F")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per op; the median is reported")
    p.add_argument("--ops", nargs="*", default=None, help="subset of route permute unpermute swiglu_experts")
    p.add_argument("--profile", default=None, metavar="DIR", help="write torch.profiler traces to DIR")


NAME = "kernels"
HELP = "MoE kernel ops vs PyTorch reference and machine peak (JSON lines)"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
