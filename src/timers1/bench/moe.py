"""`timers1 bench moe`: MoE layer forward+backward vs the released per-expert loop and vs dense.

For each shape (T tokens, D model dim, E experts, K top-k, F expert width) three layers run the
same tokens, forward + backward, fp32, timed round-robin (median of ``--repeats``):
  * ``moe``:   ``timers1.model.moe.MoE`` (route -> permute -> grouped SwiGLU -> unpermute);
  * ``loop``:  the released ``TimerS1ExpertsLayer`` (sktime 1.2.0), per-expert Python loop with
               index_add, built with ``intermediate_size = F*K`` and carrying the same weights;
  * ``dense``: one SwiGLU of width K*F over all T tokens: the same active FLOPs with no routing,
               the physical ideal (ratio 1.0).
One JSON line per shape with times, achieved TFLOP/s (active expert FLOPs = 18*T*K*D*F for
forward+backward; router FLOPs not counted) and the ratios ``vs_dense`` = t_dense / t_moe and
``vs_loop`` = t_loop / t_moe (higher is better for both). Threads: torch's default.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from timers1.bench.kernels import emit, maybe_profile, time_interleaved

SHAPES = {
    # name: (T, D, E, K, F)
    "e32k2": (8192, 256, 32, 2, 512),
    "e64k4": (4096, 256, 64, 4, 128),
}


class DenseSwiGLU(nn.Module):
    """down(silu(gate x) * up x) of width K*F: the FLOP-matched dense baseline."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _build_moe(D, Fw, E, K, backend):
    try:
        from timers1.model.moe import MoE
    except ImportError:  # model not importable: the same computation through the kernels API
        MoE = None
    if MoE is not None:
        return MoE(D, Fw, E, K, renormalize=False, backend=backend), "timers1.model.moe.MoE"
    from timers1.kernels import permute, route, swiglu_experts, unpermute

    class KernelMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(D, E, bias=False)
            self.experts = nn.Module()
            self.experts.w_gate_EFD = nn.Parameter(torch.empty(E, Fw, D))
            self.experts.w_up_EFD = nn.Parameter(torch.empty(E, Fw, D))
            self.experts.w_down_EDF = nn.Parameter(torch.empty(E, D, Fw))

        def forward(self, x):
            x_TD = x.reshape(-1, D)
            r = route(self.router(x_TD), K, backend=backend)
            ex = self.experts
            y = swiglu_experts(permute(x_TD, r.sorted_slots_S, K, backend=backend), r.tokens_per_expert_E,
                               ex.w_gate_EFD, ex.w_up_EFD, ex.w_down_EDF, backend=backend)
            return unpermute(y, r.sorted_slots_S, r.weights_TK, backend=backend).view_as(x), r

    return KernelMoE(), "kernels API"


def _build_loop(D, Fw, E, K, moe):
    from sktime.libs.timer_s1.modeling_TimerS1 import TimerS1Config, TimerS1ExpertsLayer

    cfg = TimerS1Config(hidden_size=D, intermediate_size=Fw * K, num_experts=E, num_experts_per_token=K)
    loop = TimerS1ExpertsLayer(cfg)
    with torch.no_grad():
        loop.gate.weight.copy_(moe.router.weight)
        for e, m in enumerate(loop.experts):
            m.gate_proj.weight.copy_(moe.experts.w_gate_EFD[e])
            m.up_proj.weight.copy_(moe.experts.w_up_EFD[e])
            m.down_proj.weight.copy_(moe.experts.w_down_EDF[e])
    return loop


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, first_output_only: bool):
    """A closure running one forward + backward of ``module`` on ``x`` (fresh leaf) with ``grad``;
    ``first_output_only`` for modules that return (output, extras), as the MoE layer does."""
    def fn():
        module.zero_grad(set_to_none=True)
        y = module(x.detach().requires_grad_())
        (y[0] if first_output_only else y).backward(grad)
    return fn


def bench_shape(name, T, D, E, K, Fw, args):
    torch.manual_seed(0)
    moe, moe_impl = _build_moe(D, Fw, E, K, args.backend)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)  # Timer-S1 init
    loop = _build_loop(D, Fw, E, K, moe)
    dense = DenseSwiGLU(D, K * Fw)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(1, T, D)
    grad = torch.randn(1, T, D)

    fns = {"moe": fwd_bwd(moe, x, grad, True), "loop": fwd_bwd(loop, x, grad, False),
           "dense": fwd_bwd(dense, x, grad, False)}
    # Parity check before timing: the two MoE implementations must agree.
    with torch.no_grad():
        y_moe, y_loop = moe(x)[0], loop(x)
    max_err = float((y_moe - y_loop).abs().max())
    t = time_interleaved(fns, torch.device("cpu"), args.repeats, warmup=args.warmup)
    flops = 18 * T * K * D * Fw
    emit({
        "bench": "moe", "shape": name, "T": T, "D": D, "E": E, "K": K, "F": Fw, "dtype": "fp32",
        "threads": torch.get_num_threads(), "moe_impl": moe_impl, "backend": args.backend,
        "moe_ms": t["moe"] * 1e3, "loop_ms": t["loop"] * 1e3, "dense_ms": t["dense"] * 1e3,
        "moe_tflops": flops / t["moe"] / 1e12, "dense_tflops": flops / t["dense"] / 1e12,
        "vs_dense": t["dense"] / t["moe"], "vs_loop": t["loop"] / t["moe"],
        "loop_vs_dense": t["dense"] / t["loop"], "max_abs_diff_vs_loop": max_err,
    })
    with maybe_profile(args.profile, f"moe_{name}", torch.device("cpu")):
        for fn in fns.values():
            fn()


def run(args) -> int:
    if args.threads:
        # Only for diagnosis: on a shared or oversubscribed machine, 1 thread avoids OpenMP
        # barrier stalls that hit the many mid-sized GEMMs of the MoE far harder than dense.
        torch.set_num_threads(args.threads)
    for name in args.shapes:
        bench_shape(name, *SHAPES[name], args)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="layer shapes to measure")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernel implementation (auto: Triton on CUDA, the PyTorch fast path on CPU)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--profile", default=None, metavar="DIR", help="write torch.profiler traces to DIR")


NAME = "moe"
HELP = "MoE layer fwd+bwd vs released per-expert loop and dense SwiGLU"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
