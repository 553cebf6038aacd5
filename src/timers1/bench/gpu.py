"""`timers1 bench gpu`: one prepared check of the CUDA path on a single GPU, in <= 8 minutes.

Five sections run in order; each prints JSON lines (``"metric"`` lines: a measurement, as a
ratio against a baseline measured in the same run where the issue names one), then one section
line (``"status"``: ok | failed | timeout | skipped, ``seconds``, ``error``/``reason``). A section
that fails or runs past its time limit prints its error and the next one still runs:
  kernels     every Triton kernel (route, permute, unpermute, grouped SwiGLU, fwd + bwd) against
              the PyTorch oracle computed in fp32 from the same inputs, in fp32 and bf16, with
              zero-token experts, odd token counts and the flagship shapes. Error measure: max
              |kernel - oracle| / max |oracle| per output; tolerance 1e-4 in fp32 (TF32 off),
              2e-2 in bf16 (outputs and saved G/U stored in bf16); integer outputs (expert ids,
              counts, slot order) must be equal. ``ratio`` = error / tolerance (<= 1 passes).
  throughput  grouped SwiGLU forward vs one dense GEMM of equal FLOPs (target >= 0.85);
              route + permute vs a device copy of the same bytes (target >= 0.6); the MoE layer
              vs the dense SwiGLU of equal active FLOPs, fwd + bwd, at the flagship's
              proportions (D 1024, E 32, K 2, F 2048).
  megatron    our MoE layer vs megatron-core's ``MoELayer`` (alltoall dispatcher, SequentialMLP:
              the expert MLP it has without Transformer Engine or the grouped_gemm extension)
              at the same shape, fwd + bwd.
  train       a few hundred bf16 steps of a ~1B-total Timer-S1 (the flagship's widths, 4 + 1
              blocks): tokens/s, MFU against the dense bf16 GEMM peak measured in this run
              (target >= 0.35), peak memory against ``timers1 plan``'s prediction, loss falling.
  checkpoint  DCP save + load of that model from GPU memory against a raw file write/read.

``--device cpu`` is the dry run (CI): small shapes, fp32, the Triton kernels under the
interpreter (in a subprocess, since TRITON_INTERPRET must be set before triton is imported),
the torch paths elsewhere; sections that need CUDA report why they cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from timers1.bench.kernels import emit, measure_peaks, time_interleaved

SECTIONS = ("kernels", "throughput", "megatron", "train", "checkpoint")
# Seconds per section on a GPU, (full, --quick): full sums to 415 s, quick to 325 s, so with
# process start-up the check ends inside 8 (quick: 6) minutes. The kernels section is the
# longest: it autotunes six grouped-GEMM kernels over six tile configurations, in two dtypes,
# before later sections reuse the tuned configurations.
GPU_TIME_LIMIT_S = {"kernels": (150, 120), "throughput": (50, 40), "megatron": (45, 35), "train": (120, 90),
                    "checkpoint": (50, 40)}
CPU_TIME_LIMIT_S = 40
# The flagship MoE layer (configs/timer_s1_8b.yaml): D, E, K and F = intermediate_size // K.
FLAGSHIP = dict(D=1024, E=32, K=2, F=2048)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class SectionTimeout(Exception):
    pass


class SectionSkipped(Exception):
    """A section that cannot run here; its message says why."""


@dataclass
class Check:
    device: torch.device
    quick: bool
    scratch: Path
    repeats: int
    deadline: float = float("inf")
    """time.perf_counter() at which the running section's time limit ends."""
    shared: dict = field(default_factory=dict)
    """Baselines and objects later sections reuse (peak TFLOP/s, the trained model)."""
    lines: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def inner(self) -> int:
        """Calls per timed sample: on a GPU several, so the sync around a sample is amortised."""
        return 3 if self.cuda else 1

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32

    def emit(self, section: str, **record) -> dict:
        record = {"bench": "gpu", "section": section, **record}
        self.lines.append(json.loads(emit(record)))
        return record

    def metric(self, section: str, metric: str, ratio: float | None, baseline: str, target: float | None = None,
               **detail) -> dict:
        ok = None if target is None or ratio is None else ratio >= target
        return self.emit(section, metric=metric, ratio=ratio, baseline=baseline, target=target,
                         meets_target=ok, **detail)

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_tflops(self) -> float:
        """Dense GEMM TFLOP/s of this device in the check's dtype, measured once per run."""
        if "peak_tflops" not in self.shared:
            size = 8192 if self.cuda else 512
            tflops, gbs = measure_peaks(self.device, self.dtype, self.repeats, size)
            self.shared.update(peak_tflops=tflops, peak_gbs=gbs)
            self.emit("baseline", metric="peak", dense_gemm_tflops=tflops, gemm_shape=[size] * 3,
                      dtype=str(self.dtype), memcpy_gb_s=gbs)
        return self.shared["peak_tflops"]


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in this thread after ``seconds`` (SIGALRM; main thread only).

    The signal interrupts Python code between bytecodes, so a long CUDA call finishes first;
    every call here is well under a second.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- kernels


def kernel_cases(check: Check) -> list[tuple]:
    """(name, T, D, E, K, F, experts left empty, 'one' to route every token to expert 0).

    On a GPU the small cases use the flagship widths, so they share the flagship's autotuned
    configurations (one tuning per kernel and dtype); in the interpreter widths stay tiny.
    """
    if check.cuda:
        d, e, k, f = FLAGSHIP["D"], FLAGSHIP["E"], FLAGSHIP["K"], FLAGSHIP["F"]
        # The flagship first: Triton autotunes a kernel on the first shape it sees for a key
        # (the row count is not in the key), and training sees shapes like this one.
        return [("flagship", 4096 if check.quick else 8192, d, e, k, f, (), None),
                ("odd_tokens_zero_token_experts", 37, d, e, k, f, (3, 5, 30), None),
                ("all_tokens_one_expert", 71, d, e, 1, f, (), "one")]
    return [("odd_tokens_zero_token_experts", 37, 32, 8, 2, 32, (3, 5), None),
            ("all_tokens_one_expert", 21, 32, 4, 1, 32, (), "one")]


def distinct_logits(T: int, E: int, empty: tuple, mode: str | None, gen: torch.Generator) -> torch.Tensor:
    """Router logits without ties, exactly representable in bf16 (multiples of 1/8 in [-2, 2)),
    so top-k picks the same experts in every dtype; ``empty`` experts get -8 (never chosen)."""
    perm_TE = torch.argsort(torch.rand(T, E, generator=gen), dim=1)
    logits_TE = (perm_TE - E // 2).float() / (8.0 * max(1, E // 32))
    if empty:
        logits_TE[:, list(empty)] = -8.0
    if mode == "one":
        logits_TE[:, 0] = 8.0
    return logits_TE


def check_kernel_case(check: Check, name, T, D, E, K, Fw, empty, mode, dtype) -> list[dict]:
    """Every kernel on one case in one dtype; returns one result per kernel."""
    from timers1.kernels import permute, route, swiglu_experts, unpermute
    from timers1.kernels.grouped_gemm import swiglu_experts_loop
    from timers1.kernels.permute import permute_reference, unpermute_reference
    from timers1.kernels.routing import route_reference

    dev = check.device
    gen = torch.Generator().manual_seed(T * 131 + E)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)

    def leaf(t):
        return t.detach().clone().requires_grad_()

    def oracle(t):  # the reference sees exactly the kernel's (rounded) inputs, in fp32
        return t.detach().float().requires_grad_()

    results = []

    def record(kernel, errors: dict, exact: bool = True):
        worst = max(errors.values())
        results.append(dict(case=name, dtype=str(dtype).replace("torch.", ""), kernel=kernel, T=T, D=D, E=E, K=K,
                            F=Fw, max_rel_err=worst, errors=errors, indices_equal=exact,
                            tolerance=TOLERANCE[dtype], ratio=worst / TOLERANCE[dtype],
                            ok=exact and worst <= TOLERANCE[dtype]))

    # route: integer outputs exact, weights/probs and the logit gradient close.
    logits = distinct_logits(T, E, empty, mode, gen).to(dev, dtype)
    a_in, b_in = leaf(logits), oracle(logits)
    got, ref = route(a_in, K, backend="triton"), route_reference(b_in, K)
    exact = all(torch.equal(getattr(got, f), getattr(ref, f))
                for f in ("experts_TK", "tokens_per_expert_E", "sorted_slots_S"))
    if empty:
        exact = exact and int(ref.tokens_per_expert_E[list(empty)].sum()) == 0
    gw, gp = rand(T, K).float(), rand(T, E).float()
    ((got.weights_TK * gw).sum() + (got.probs_TE * gp).sum()).backward()
    ((ref.weights_TK * gw).sum() + (ref.probs_TE * gp).sum()).backward()
    record("route", {"weights": rel_err(got.weights_TK, ref.weights_TK), "probs": rel_err(got.probs_TE, ref.probs_TE),
                     "grad_logits": rel_err(a_in.grad, b_in.grad)}, exact)
    slots_S, counts_E, weights_TK = ref.sorted_slots_S, ref.tokens_per_expert_E, ref.weights_TK.detach()
    S = T * K

    # permute
    x = rand(T, D)
    a_in, b_in = leaf(x), oracle(x)
    got, ref = permute(a_in, slots_S, K, backend="triton"), permute_reference(b_in, slots_S, K)
    g_SD = rand(S, D)
    got.backward(g_SD)
    ref.backward(g_SD.float())
    record("permute", {"out": rel_err(got, ref), "grad_x": rel_err(a_in.grad, b_in.grad)})

    # unpermute (the routing weights stay fp32, as the router emits them)
    y = rand(S, D)
    a_in, b_in, wa, wb = leaf(y), oracle(y), leaf(weights_TK), oracle(weights_TK)
    got, ref = unpermute(a_in, slots_S, wa, backend="triton"), unpermute_reference(b_in, slots_S, wb)
    g_TD = rand(T, D)
    got.backward(g_TD)
    ref.backward(g_TD.float())
    record("unpermute", {"out": rel_err(got, ref), "grad_y": rel_err(a_in.grad, b_in.grad),
                         "grad_weights": rel_err(wa.grad, wb.grad)})

    # grouped SwiGLU experts, forward and all four gradients
    x = rand(S, D)
    weights = [rand(E, Fw, D, scale=0.02), rand(E, Fw, D, scale=0.02), rand(E, D, Fw, scale=0.02)]
    got_in = [leaf(t) for t in (x, *weights)]
    ref_in = [oracle(t) for t in (x, *weights)]
    got = swiglu_experts(got_in[0], counts_E, *got_in[1:], backend="triton")
    ref = swiglu_experts_loop(ref_in[0], counts_E, *ref_in[1:])
    g_SD = rand(S, D)
    got.backward(g_SD)
    ref.backward(g_SD.float())
    errors = {"out": rel_err(got, ref)}
    for label, a, b in zip(("grad_x", "grad_w_gate", "grad_w_up", "grad_w_down"), got_in, ref_in):
        errors[label] = rel_err(a.grad, b.grad)
    record("swiglu_experts", errors)
    return results


def section_kernels(check: Check) -> dict:
    from timers1.kernels._dispatch import interpreting, triton

    if triton is None:
        raise SectionSkipped("triton is not importable")
    if not check.cuda and not interpreting():
        return relay_interpreted_kernels(check)
    dtypes = [torch.bfloat16, torch.float32] if check.cuda else [torch.float32]
    failed = 0
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases: full fp32 on both sides
    try:
        for dtype in dtypes:  # bf16 first: the dtype training runs in
            for case in kernel_cases(check):
                for result in check_kernel_case(check, *case, dtype):
                    failed += not result["ok"]
                    check.emit("kernels", metric=f"{result['kernel']}/{result['case']}/{result['dtype']}",
                               baseline="fp32 PyTorch oracle on the same inputs", target=None, **result)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if not check.cuda:
        check.emit("kernels", metric="not_run_on_cpu", reason=(
            "bf16 and the flagship shapes run on a GPU only: the interpreter computes bf16 wrongly "
            "and takes minutes per flagship-sized launch"))
    if failed:
        raise AssertionError(f"{failed} kernel checks outside tolerance (see the kernels lines)")
    return {}


def relay_interpreted_kernels(check: Check) -> dict:
    """CPU: run this section in a child process with TRITON_INTERPRET=1 and relay its lines."""
    argv = [sys.executable, "-m", "timers1.bench.gpu", "--device", "cpu", "--sections", "kernels"]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(argv + (["--quick"] if check.quick else []), env=env, capture_output=True, text=True,
                          timeout=CPU_TIME_LIMIT_S)
    child_status = None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("section") != "kernels":
            continue
        if "status" in record:
            child_status = record
        else:
            record.pop("bench"), record.pop("section")
            check.emit("kernels", **record)
    if child_status is None:
        raise RuntimeError(f"interpreter child exited {proc.returncode}: {proc.stderr[-2000:]}")
    if child_status["status"] != "ok":
        raise RuntimeError(f"interpreter child: {child_status.get('error') or child_status.get('reason')}")
    return {"interpreted": True}


# ---------------------------------------------------------------------------------- throughput


def moe_shape(check: Check) -> dict:
    if check.cuda:
        return dict(FLAGSHIP, T=8192 if check.quick else 16384)
    return dict(T=512, D=64, E=8, K=2, F=64)


def section_throughput(check: Check) -> dict:
    from timers1.bench.moe import DenseSwiGLU, _build_moe, fwd_bwd
    from timers1.kernels import permute, route, swiglu_experts
    from timers1.kernels.routing import route_reference

    dev, dt = check.device, check.dtype
    shape = moe_shape(check)
    T, D, E, K, Fw = (shape[k] for k in "TDEKF")
    S = T * K
    peak = check.peak_tflops()
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=gen).to(dev, dt)
    x_TD = torch.randn(T, D, generator=gen).to(dev, dt)
    routing = route_reference(logits_TE.float(), K)
    x_SD = permute(x_TD, routing.sorted_slots_S, K)
    w_gate, w_up, w_down = ((torch.randn(*s, generator=gen) * 0.02).to(dev, dt)
                            for s in ((E, Fw, D), (E, Fw, D), (E, D, Fw)))
    w_dense_D3F = (torch.randn(D, 3 * Fw, generator=gen) * 0.02).to(dev, dt)
    common = dict(T=T, D=D, E=E, K=K, F=Fw, dtype=str(dt).replace("torch.", ""))

    # 1. grouped SwiGLU forward (3 grouped GEMMs) vs ONE dense GEMM of the same 6*S*D*F FLOPs.
    with torch.no_grad():
        t = time_interleaved({
            "grouped": lambda: swiglu_experts(x_SD, routing.tokens_per_expert_E, w_gate, w_up, w_down),
            "dense": lambda: torch.mm(x_SD, w_dense_D3F)}, dev, check.repeats, inner=check.inner)
    flops = 6 * S * D * Fw
    check.metric("throughput", "grouped_gemm_fwd", t["dense"] / t["grouped"],
                 "one dense GEMM [S,D]x[D,3F] of equal FLOPs", 0.85, ms=t["grouped"] * 1e3,
                 baseline_ms=t["dense"] * 1e3, tflops=flops / t["grouped"] / 1e12, frac_of_peak=flops / t["grouped"] / 1e12 / peak,
                 **common)
    del w_dense_D3F

    # 2. route + permute vs a device copy moving the same bytes (read + write counted).
    esize = torch.finfo(dt).bits // 8
    moved = T * E * esize + T * E * 4 + T * K * (4 + 8) + S * 8 + E * 8 + T * D * esize + S * D * esize
    src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    with torch.no_grad():
        t = time_interleaved({
            "op": lambda: permute(x_TD, route(logits_TE, K).sorted_slots_S, K),
            "copy": lambda: dst.copy_(src)}, dev, check.repeats, inner=10 * check.inner)
    check.metric("throughput", "route_permute", t["copy"] / t["op"], "device copy of the same bytes", 0.6,
                 ms=t["op"] * 1e3, baseline_ms=t["copy"] * 1e3, bytes=moved, gb_s=moved / t["op"] / 1e9, **common)
    del src, dst

    # 3. the MoE layer vs the dense SwiGLU of equal active FLOPs (width K*F), fwd + bwd.
    torch.manual_seed(0)
    moe, moe_impl = _build_moe(D, Fw, E, K, "auto")
    dense = DenseSwiGLU(D, K * Fw)
    for module in (moe, dense):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
        module.to(dev, dt)
    x_BTD = torch.randn(1, T, D, generator=gen).to(dev, dt)
    grad_BTD = torch.randn(1, T, D, generator=gen).to(dev, dt)
    t = time_interleaved({"moe": fwd_bwd(moe, x_BTD, grad_BTD, True), "dense": fwd_bwd(dense, x_BTD, grad_BTD, False)},
                         dev, check.repeats, inner=check.inner)
    flops = 18 * T * K * D * Fw
    check.metric("throughput", "moe_layer_fwd_bwd", t["dense"] / t["moe"],
                 "dense SwiGLU of equal active FLOPs (width K*F), fwd+bwd", None, ms=t["moe"] * 1e3,
                 baseline_ms=t["dense"] * 1e3, tflops=flops / t["moe"] / 1e12, frac_of_peak=flops / t["moe"] / 1e12 / peak,
                 moe_impl=moe_impl, **common)
    return {}


# ------------------------------------------------------------------------------------ megatron

MEGATRON_NEEDS_CUDA = ("megatron-core's alltoall dispatcher (MoEAlltoAllTokenDispatcher) creates a torch.cuda.Stream "
                       "in its constructor and moves the split sizes on it in every forward, and its router moves "
                       "CPU weights to torch.cuda.current_device(): it cannot run on CPU")


@contextlib.contextmanager
def megatron_single_rank(device: torch.device):
    """A 1-rank process group and megatron's parallel_state for it, torn down on exit."""
    import torch.distributed as dist

    import_megatron()  # quietly, before parallel_state imports megatron.core
    own_group = not dist.is_initialized()
    if own_group:
        from timers1.bench.gloo_ranks import free_port

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def import_megatron():
    """megatron.core's MoE pieces, without the Transformer-Engine/Apex warnings its import prints."""
    import logging
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stderr(open(os.devnull, "w")):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            import megatron.core
            from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
            from megatron.core.transformer.spec_utils import build_module
            from megatron.core.transformer.moe import moe_utils
            from megatron.core.transformer.transformer_config import TransformerConfig
        finally:
            logging.disable(previous)
    # megatron-core 0.16.1 imports te_general_gemm only with Transformer Engine yet tests
    # `te_general_gemm is not None` in the router's gating GEMM, a NameError without TE; None
    # is what its torch.mm fallback expects.
    if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return megatron.core.__version__, get_moe_module_spec, build_module, TransformerConfig


def build_megatron_moe(D, E, K, Fw, dtype, device):
    """megatron-core's MoELayer at our layer's shape: softmax top-k router without load balancing
    loss, alltoall dispatcher, SwiGLU experts without biases (SequentialMLP)."""
    import warnings

    import torch.nn.functional as F

    _, get_moe_module_spec, build_module, TransformerConfig = import_megatron()
    with warnings.catch_warnings():  # deprecation notes about options this layer does not use
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=1, hidden_size=D, num_attention_heads=max(1, D // 64), ffn_hidden_size=K * Fw,
            moe_ffn_hidden_size=Fw, num_moe_experts=E, moe_router_topk=K, moe_token_dispatcher_type="alltoall",
            # Timer-S1 routing: softmax over all experts, then top-k, no renormalisation.
            moe_router_pre_softmax=True, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            # CPU initialisation avoids megatron's CUDA RNG tracker; the layer moves to the device after.
            use_cpu_initialization=True)
        layer = build_module(get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False), config=config)
    return layer.to(device), type(layer.experts).__name__


@torch.no_grad()
def copy_weights_into_megatron(ours, peer) -> None:
    """Our router and expert weights into megatron's layer, so both compute the same function:
    megatron's fc1 of expert e is [gate; up] stacked ([2F, D], its GLU takes the first half
    through the activation), fc2 is down ([D, F])."""
    peer.router.weight.copy_(ours.router.weight)
    experts = ours.experts
    for e, mlp in enumerate(peer.experts.local_experts):
        mlp.linear_fc1.weight.copy_(torch.cat([experts.w_gate_EFD[e], experts.w_up_EFD[e]], dim=0))
        mlp.linear_fc2.weight.copy_(experts.w_down_EDF[e])


@torch.no_grad()
def megatron_parity(ours, peer, x_TD: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative output difference of the two layers on ``x_TD`` in fp32 (both layers return to
    ``dtype`` after, exactly: bf16 -> fp32 -> bf16 is lossless). fp32, so that no near-tie in
    the top-k flips between the two routers: the peer must compute what ours does, or the
    speed ratio means nothing."""
    T, D = x_TD.shape
    ours.float(), peer.float()
    try:
        x = x_TD.float()
        return rel_err(peer(x.view(T, 1, D))[0].view(T, D), ours(x.view(1, T, D))[0].view(T, D))
    finally:
        ours.to(dtype), peer.to(dtype)


def section_megatron(check: Check) -> dict:
    from timers1.bench.moe import _build_moe, fwd_bwd

    version = import_megatron()[0]
    dev, dt = check.device, check.dtype
    shape = moe_shape(check)
    T, D, E, K, Fw = (shape[k] for k in "TDEKF")
    with megatron_single_rank(dev):
        try:
            peer, expert_mlp = build_megatron_moe(D, E, K, Fw, dt, dev)
        except RuntimeError as exc:
            if not check.cuda and "cuda" in str(exc).lower():
                raise SectionSkipped(f"{MEGATRON_NEEDS_CUDA} (megatron-core {version}: {exc})") from None
            raise
        torch.manual_seed(0)
        ours, _ = _build_moe(D, Fw, E, K, "auto")
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.02)
        ours.to(dev, dt)
        copy_weights_into_megatron(ours, peer)
        gen = torch.Generator().manual_seed(0)
        x_TD = torch.randn(T, D, generator=gen).to(dev, dt)
        grad_TD = torch.randn(T, D, generator=gen).to(dev, dt)
        parity = megatron_parity(ours, peer, x_TD[:512], dt)
        # megatron takes [sequence, batch, hidden]; ours [batch, sequence, hidden].
        t = time_interleaved({"ours": fwd_bwd(ours, x_TD.view(1, T, D), grad_TD.view(1, T, D), True),
                              "megatron": fwd_bwd(peer, x_TD.view(T, 1, D), grad_TD.view(T, 1, D), True)},
                             dev, check.repeats, inner=check.inner)
    flops = 18 * T * K * D * Fw
    check.metric("megatron", "moe_layer_vs_megatron", t["megatron"] / t["ours"],
                 f"megatron-core {version} MoELayer (alltoall, {expert_mlp}), fwd+bwd", None, ms=t["ours"] * 1e3,
                 baseline_ms=t["megatron"] * 1e3, tflops=flops / t["ours"] / 1e12,
                 megatron_tflops=flops / t["megatron"] / 1e12, fp32_output_rel_diff=parity,
                 outputs_match=parity <= TOLERANCE[torch.float32], T=T, D=D, E=E, K=K, F=Fw,
                 dtype=str(dt).replace("torch.", ""))
    return {}


# --------------------------------------------------------------------------------------- train


def train_config(check: Check):
    """~1B total parameters on a GPU: the flagship's widths and experts, 4 main + 1 STP block;
    the CPU dry run uses the tiny config."""
    from timers1.config import load_config

    repo = Path(__file__).resolve().parents[3]
    if check.cuda:
        return load_config(repo / "configs" / "timer_s1_8b.yaml", [
            "model.num_layers=4", "model.num_stp_blocks=1", "parallel.ep=1", "parallel.dp_shard=-1",
            "parallel.activation_checkpointing=false", "train.batch_size=32", "train.precision=bf16",
            f"train.steps={train_steps(check)}", "train.warmup_steps=20", "data.num_workers=0"])
    return load_config(repo / "configs" / "tiny.yaml", ["data.context_points=64", "train.batch_size=4",
                                                         f"train.steps={train_steps(check)}", "train.warmup_steps=2"])


def train_steps(check: Check) -> int:
    if check.cuda:
        return 200 if check.quick else 300
    return 10


def section_train(check: Check) -> dict:
    from timers1.bench.train import TrainingRig
    from timers1.parallel.dims import ParallelDims
    from timers1.parallel.plan import plan_memory

    dev = check.device
    cfg = train_config(check)
    peak = check.peak_tflops()
    if check.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    rig = TrainingRig(cfg, dev)
    check.shared["train_rig"] = rig
    params = sum(p.numel() for p in rig.model.parameters())
    warmup = 3  # the first steps compile and autotune kernels
    losses, step_s = [], []
    started = time.perf_counter()
    for _ in range(cfg.train.steps):
        if check.seconds_left() < 0.15 * (check.deadline - started):
            break  # the report needs the section's last seconds
        values, mask = rig.windows()
        t0 = time.perf_counter()
        losses.append(rig.step(values, mask)["loss"])
        check.sync()
        step_s.append(time.perf_counter() - t0)
    measured = step_s[warmup:]
    if len(measured) < 2:
        raise RuntimeError(f"only {len(step_s)} steps in the time limit")
    mean_step_s = sum(measured) / len(measured)
    flops = rig.train_flops_per_step()
    mfu = flops / mean_step_s / 1e12 / peak
    window = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    common = dict(params_total=params, steps=len(losses), batch_windows=cfg.train.batch_size,
                  context_points=cfg.data.context_points, layers=cfg.model.num_layers,
                  stp_blocks=cfg.model.num_stp_blocks)
    check.metric("train", "mfu", mfu, "dense GEMM peak measured in this run", 0.35 if check.cuda else None,
                 tokens_per_s=rig.patches_per_step / mean_step_s, step_ms=mean_step_s * 1e3,
                 first_step_s=step_s[0], model_tflops=flops / mean_step_s / 1e12, peak_tflops=peak, **common)
    gpu_mem_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30 if check.cuda else 80.0
    planned = plan_memory(cfg, ParallelDims(world_size=1), gpu_mem_gib, "bf16" if check.cuda else "fp32")
    if check.cuda:
        peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30
        check.metric("train", "peak_memory_vs_plan", peak_gib / planned.total_gib, "timers1 plan prediction",
                     None, peak_gib=peak_gib, planned_gib=planned.total_gib, planned=planned.line(), **common)
    else:
        check.metric("train", "peak_memory_vs_plan", None, "timers1 plan prediction", None,
                     planned_gib=planned.total_gib, reason="no device allocator statistics on CPU")
    check.metric("train", "loss_falling", first / last, "mean loss of the first tenth of the steps over the last",
                 1.0, loss_first=first, loss_last=last, losses_every_10=losses[::10], **common)
    return {}


# ---------------------------------------------------------------------------------- checkpoint


def section_checkpoint(check: Check) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from timers1.bench.checkpoint import dcp_vs_raw
    from timers1.model import build_model

    model = check.shared["train_rig"].model if "train_rig" in check.shared else None
    if model is None:  # the train section did not leave one: the same model, freshly built
        cfg = train_config(check)
        model = build_model(cfg.model, cfg.moe, device=check.device)
    state = {"model": get_model_state_dict(model)}
    root = Path(tempfile.mkdtemp(prefix="timers1-gpu-check-", dir=check.scratch))
    try:
        result = dcp_vs_raw(state, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    where = f"from {check.device.type} memory"
    check.metric("checkpoint", "dcp_save", result["save_ratio"], "raw write + fsync of a file of the same size", 0.5,
                 gb_s=result["dcp_save_gb_s"], baseline_gb_s=result["raw_write_gb_s"], bytes=result["bytes"],
                 source=where)
    check.metric("checkpoint", "dcp_load", result["load_ratio"], "raw read of that file", 0.5,
                 gb_s=result["dcp_load_gb_s"], baseline_gb_s=result["raw_read_gb_s"], bytes=result["bytes"],
                 source=f"into {check.device.type} memory")
    return {}


SECTION_FUNCS = {"kernels": section_kernels, "throughput": section_throughput, "megatron": section_megatron,
                 "train": section_train, "checkpoint": section_checkpoint}


# -------------------------------------------------------------------------------------- runner


def section_limit(check: Check, name: str, scale: float) -> float:
    if check.cuda:
        full, quick = GPU_TIME_LIMIT_S[name]
        return (quick if check.quick else full) * scale
    return CPU_TIME_LIMIT_S * scale


def run_section(check: Check, name: str, scale: float = 1.0) -> dict:
    """Run one section under its time limit; never raises (its outcome is the section line)."""
    limit = section_limit(check, name, scale)
    started = time.perf_counter()
    status, extra = "ok", {}
    check.deadline = started + limit
    try:
        with time_limit(limit):
            extra = SECTION_FUNCS[name](check) or {}
    except SectionSkipped as exc:
        status, extra = "skipped", {"reason": str(exc)}
    except (SectionTimeout, subprocess.TimeoutExpired) as exc:
        status, extra = "timeout", {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failed section must not stop the others
        status, extra = "failed", {"error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc(limit=-6)}
    if check.cuda:
        # A CUDA error is sticky: it was reported above, and every later section will report it too.
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return check.emit(name, status=status, seconds=round(time.perf_counter() - started, 2),
                      time_limit_s=round(limit, 1), **extra)


def summary_table(lines: list[dict]) -> str:
    """Markdown: one row per metric (ratio, target, baseline) and one per section outcome."""
    rows = ["| section | metric | ratio | target | meets | baseline |", "| --- | --- | --- | --- | --- | --- |"]
    for r in lines:
        if r["section"] == "baseline":
            rows.append(f"| baseline | dense GEMM {r['dense_gemm_tflops']:.4g} TFLOP/s, copy {r['memcpy_gb_s']:.4g} GB/s "
                        f"| | | | the denominators of this run |")
        elif "status" in r:
            note = r.get("error") or r.get("reason") or ""
            rows.append(f"| {r['section']} | **{r['status']}** in {r['seconds']} s | | | | {note[:160]} |")
        elif "metric" in r and (r["section"] != "kernels" or not r.get("ok", True)):
            ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3g}"
            target = "" if r.get("target") is None else f">= {r['target']}"
            meets = {True: "yes", False: "NO", None: ""}[r.get("meets_target")]
            rows.append(f"| {r['section']} | {r['metric']} | {ratio} | {target} | {meets} | {r.get('baseline', '')} |")
    kernels = [r for r in lines if r["section"] == "kernels" and "ok" in r]
    if kernels:
        worst = max(kernels, key=lambda r: r["ratio"])
        rows.append(f"| kernels | {sum(r['ok'] for r in kernels)}/{len(kernels)} checks within tolerance | "
                    f"{worst['ratio']:.3g} (worst: {worst['metric']}) | <= 1 | | error / tolerance |")
    return "\n".join(rows) + "\n"


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(device=device, quick=args.quick,
                  scratch=Path(args.scratch) if args.scratch else Path(tempfile.gettempdir()),
                  repeats=args.repeats or (10 if device.type == "cuda" else 3))
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device), "quick": args.quick}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    check.emit("environment", **info)
    outcomes = [run_section(check, name, args.time_scale) for name in args.sections]
    table = summary_table(check.lines)
    if out_dir:
        (out_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in check.lines))
        (out_dir / "summary.md").write_text(f"# timers1 bench gpu: {info.get('gpu', device)}, torch "
                                            f"{info['torch']}, triton {info.get('triton')}\n\n{table}")
    print(table, file=sys.stderr)
    return 0 if all(o["status"] in ("ok", "skipped") for o in outcomes) else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda | cpu (the dry run); default: cuda if available")
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer steps, tighter time limits")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="sections to run, in this order")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/results.jsonl and DIR/summary.md")
    p.add_argument("--scratch", default=None, metavar="DIR", help="checkpoint files go here (default: temp dir)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (default 10 GPU, 3 CPU)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit")


NAME = "gpu"
EXAMPLE = "timers1 bench gpu --quick --out results/gpu"
HELP = "the prepared single-GPU check: kernels, throughput, megatron peer, 1B training, DCP (JSON lines)"

if __name__ == "__main__":
    from timers1.bench.cli import bench_main

    sys.exit(bench_main(sys.modules[__name__]))
