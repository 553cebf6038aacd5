"""Triton kernels against their PyTorch references, forward and backward, in fp32.

These tests need the Triton kernels to be *runnable*: either TRITON_INTERPRET=1 was set before
triton was imported (CPU, how CI runs them), or a CUDA device is present. In a plain pytest run
on CPU they are skipped here and executed instead by
``tests/test_kernels.py::test_triton_kernels_under_interpreter``, which starts a fresh
interpreter with the variable set (``@triton.jit`` decides at decoration time whether to
interpret, so setting it later in a process that already imported triton has no effect).

Shapes are small on purpose: each interpreted program is a numpy call per op.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("runs under TRITON_INTERPRET=1 via test_kernels.py, or on CUDA", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' brings it on Linux x86_64)")

from timers1.kernels import permute, route, swiglu_experts, unpermute  # noqa: E402
from timers1.kernels.grouped_gemm import swiglu_experts_loop  # noqa: E402
from timers1.kernels.permute import permute_reference, unpermute_reference  # noqa: E402
from timers1.kernels.routing import route_reference  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
ATOL = 2e-5
RTOL = 1e-5
if DEV == "cuda":  # fp32 on a GPU: no TF32 anywhere, so both sides compute in full fp32
    torch.backends.cuda.matmul.allow_tf32 = False


def _close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    "T,E,K,renorm",
    [(37, 8, 2, False), (64, 64, 4, False), (50, 32, 1, False), (40, 16, 8, True), (130, 4, 2, True)],
)
def test_route_matches_reference(T, E, K, renorm):
    g = torch.Generator().manual_seed(T * E + K)
    logits = torch.randn(T, E, generator=g).to(DEV)
    a_in = logits.clone().requires_grad_()
    b_in = logits.clone().requires_grad_()
    a = route(a_in, K, renorm, backend="triton")
    b = route_reference(b_in, K, renorm)
    for field in ("experts_TK", "tokens_per_expert_E", "sorted_slots_S"):
        assert getattr(a, field).dtype == torch.int64
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    _close(a.weights_TK, b.weights_TK)
    _close(a.probs_TE, b.probs_TE)
    # Backward through both differentiable outputs (weights for the MoE, probs for aux loss).
    gw = torch.randn(T, K, generator=g).to(DEV)
    gp = torch.randn(T, E, generator=g).to(DEV)
    (da,) = torch.autograd.grad((a.weights_TK * gw).sum() + (a.probs_TE * gp).sum(), a_in)
    (db,) = torch.autograd.grad((b.weights_TK * gw).sum() + (b.probs_TE * gp).sum(), b_in)
    _close(da, db)
    # Weights only (probs unused: the kernel's HAS_GRAD_P=False branch).
    (da,) = torch.autograd.grad((route(a_in, K, renorm, backend="triton").weights_TK * gw).sum(), a_in)
    (db,) = torch.autograd.grad((route_reference(b_in, K, renorm).weights_TK * gw).sum(), b_in)
    _close(da, db)


def test_route_all_tokens_on_one_expert():
    T, E, K = 70, 16, 1
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    logits[:, 5] += 50.0
    r = route(logits.to(DEV), K, backend="triton")
    counts = torch.zeros(E, dtype=torch.int64)
    counts[5] = T
    assert torch.equal(r.tokens_per_expert_E.cpu(), counts)
    assert torch.equal(r.sorted_slots_S.cpu(), torch.arange(T))


# ---------------------------------------------------------------------- permute / unpermute


@pytest.mark.parametrize("T,E,K,D", [(37, 8, 2, 24), (45, 64, 4, 130), (50, 4, 1, 16)])
def test_permute_unpermute_match_reference(T, E, K, D):
    g = torch.Generator().manual_seed(T + E + K + D)
    routing = route_reference(torch.randn(T, E, generator=g), K)
    slots = routing.sorted_slots_S.to(DEV)
    x = torch.randn(T, D, generator=g).to(DEV)
    w = routing.weights_TK.detach().to(DEV)
    gy = torch.randn(T, D, generator=g).to(DEV)
    results = []
    for use_ref in (False, True):
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_()
        xs = permute_reference(xi, slots, K) if use_ref else permute(xi, slots, K, backend="triton")
        ys = xs * torch.sin(xs.sum(1, keepdim=True))  # row-dependent, so row order matters
        y = unpermute_reference(ys, slots, wi) if use_ref else unpermute(ys, slots, wi, backend="triton")
        results.append((xs, y, *torch.autograd.grad((y * gy).sum(), [xi, wi])))
    for got, want in zip(*results):
        _close(got, want)


# --------------------------------------------------------------------------- grouped GEMM

COUNT_CASES = {
    "zero_expert": [5, 0, 17, 40],
    "all_on_one": [0, 0, 33, 0],
    "ragged": [1, 2, 3, 4, 5, 6, 7, 9],
    "e64": [int(c) for c in torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(3))],
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_swiglu_experts_triton_matches_loop(case):
    counts = COUNT_CASES[case]
    E, S = len(counts), sum(counts)
    D, Fw = (24, 40) if E <= 8 else (16, 32)
    g = torch.Generator().manual_seed(E + S)
    x = torch.randn(S, D, generator=g).to(DEV)
    ws = [torch.randn(E, Fw, D, generator=g).mul(0.3).to(DEV),
          torch.randn(E, Fw, D, generator=g).mul(0.3).to(DEV),
          torch.randn(E, D, Fw, generator=g).mul(0.3).to(DEV)]
    gy = torch.randn(S, D, generator=g).to(DEV)
    c = torch.tensor(counts, device=DEV)
    outs = []
    for fn in (lambda *a: swiglu_experts(*a, backend="triton"), swiglu_experts_loop):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() for w in ws]
        y = fn(xi, c, *wi)
        outs.append((y, *torch.autograd.grad((y * gy).sum(), [xi, *wi])))
    for got, want in zip(*outs):
        _close(got, want, atol=5e-5, rtol=1e-4)
    # An expert with no rows gets an exactly-zero weight gradient.
    for e, n in enumerate(counts):
        if n == 0:
            assert all(float(t[e].abs().max()) == 0.0 for t in outs[0][2:])


# ---------------------------------------------------------------------------- whole layer


@pytest.mark.parametrize("K", [1, 2, 4])
def test_moe_pipeline_triton_matches_torch(K):
    """route -> permute -> experts -> unpermute, all-Triton vs all-PyTorch, with grads."""
    T, D, E, Fw = 40, 16, 8, 32
    g = torch.Generator().manual_seed(K)
    params = [torch.randn(E, D, generator=g) * 0.5, torch.randn(E, Fw, D, generator=g) * 0.3,
              torch.randn(E, Fw, D, generator=g) * 0.3, torch.randn(E, D, Fw, generator=g) * 0.3]
    x = torch.randn(T, D, generator=g)
    outs = []
    for backend in ("triton", "torch"):
        xi = x.clone().to(DEV).requires_grad_()
        wr, wg, wu, wd = [p.clone().to(DEV).requires_grad_() for p in params]
        r = route(xi @ wr.t(), K, backend=backend)
        xs = permute(xi, r.sorted_slots_S, K, backend=backend)
        ys = swiglu_experts(xs, r.tokens_per_expert_E, wg, wu, wd, backend=backend)
        y = unpermute(ys, r.sorted_slots_S, r.weights_TK, backend=backend)
        loss = (y * y).sum() + r.probs_TE.pow(2).sum()
        outs.append((y, *torch.autograd.grad(loss, [xi, wr, wg, wu, wd])))
    for got, want in zip(*outs):
        _close(got, want, atol=5e-5, rtol=1e-4)
