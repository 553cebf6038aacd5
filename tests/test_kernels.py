"""MoE kernel ops on CPU: the PyTorch fast paths against the oracles, gradchecks, dispatch, and
the Triton kernels run under the interpreter in a subprocess.

The fast paths (hand-written autograd Functions; what the model runs on CPU) are compared with
  * the autograd oracles (``*_reference``: index_select/index_add, ``torch._grouped_mm``),
  * the naive per-expert loop (``swiglu_experts_loop``), and
  * the released Timer-S1 layer (sktime's ``TimerS1ExpertsLayer``), end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timers1.kernels import permute, route, swiglu_experts, unpermute
from timers1.kernels.grouped_gemm import swiglu_experts_loop, swiglu_experts_reference
from timers1.kernels.permute import permute_reference, unpermute_reference
from timers1.kernels.routing import route_reference

COUNT_CASES = {
    "zero_expert": [5, 0, 17, 40],
    "all_on_one": [0, 0, 33, 0],
    "ragged": [1, 2, 3, 4, 5, 6, 7, 9],
    "e64": [int(c) for c in torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(3))],
}


def _expert_weights(E, D, Fw, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(E, Fw, D, generator=g, dtype=dtype) * 0.3,
            torch.randn(E, Fw, D, generator=g, dtype=dtype) * 0.3,
            torch.randn(E, D, Fw, generator=g, dtype=dtype) * 0.3]


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_swiglu_fast_path_matches_loop_and_grouped_mm(case):
    """The loop-free CPU path and the naive per-expert loop give the same outputs and grads."""
    counts = COUNT_CASES[case]
    E, S, D, Fw = len(counts), sum(counts), 24, 40
    ws = _expert_weights(E, D, Fw, seed=E + S)
    x = torch.randn(S, D, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(S, D, generator=torch.Generator().manual_seed(2))
    c = torch.tensor(counts)
    outs = {}
    for name, fn in {
        "fast": lambda *a: swiglu_experts(*a, backend="torch"),
        "grouped_mm": swiglu_experts_reference,
        "loop": swiglu_experts_loop,
    }.items():
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() for w in ws]
        y = fn(xi, c, *wi)
        outs[name] = (y, *torch.autograd.grad((y * gy).sum(), [xi, *wi]))
    for name in ("fast", "grouped_mm"):
        for got, want in zip(outs[name], outs["loop"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Forward of the fast path is the loop's arithmetic exactly (same mm per expert).
    assert torch.equal(outs["fast"][0], outs["loop"][0])
    for e, n in enumerate(counts):
        if n == 0:
            assert all(float(t[e].abs().max()) == 0.0 for t in outs["fast"][2:])


def test_swiglu_fast_path_gradcheck():
    counts = torch.tensor([3, 0, 4, 1])
    ws = [w.requires_grad_() for w in _expert_weights(4, 5, 6, seed=0, dtype=torch.float64)]
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *w: swiglu_experts(x, counts, *w, backend="torch"), (x, *ws))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_permute_unpermute_fast_path(K):
    T, E, D = 23, 8, 12
    r = route_reference(torch.randn(T, E, generator=torch.Generator().manual_seed(K)), K)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = r.weights_TK.detach().double().requires_grad_()
    gy = torch.randn(T, D, dtype=torch.float64)
    outs = []
    for fast in (True, False):
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        xs = permute(xi, r.sorted_slots_S, K, backend="torch") if fast else permute_reference(xi, r.sorted_slots_S, K)
        ys = xs * torch.sin(xs.sum(1, keepdim=True))
        y = unpermute(ys, r.sorted_slots_S, wi, backend="torch") if fast else unpermute_reference(ys, r.sorted_slots_S, wi)
        outs.append((xs, y, *torch.autograd.grad((y * gy).sum(), [xi, wi])))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x: permute(x, r.sorted_slots_S, K, backend="torch"), (x,))
    ys = torch.randn(T * K, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: unpermute(y, r.sorted_slots_S, w, backend="torch"), (ys, w))


def test_route_reference_contract():
    T, E, K = 50, 16, 2
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    r = route(logits, K, backend="torch")
    assert int(r.tokens_per_expert_E.sum()) == T * K
    experts_S = r.experts_TK.reshape(-1)[r.sorted_slots_S]
    assert torch.all(experts_S[1:] >= experts_S[:-1])  # grouped by expert
    same = experts_S[1:] == experts_S[:-1]
    assert torch.all(r.sorted_slots_S[1:][same] > r.sorted_slots_S[:-1][same])  # stable
    # No renormalization: weights are the raw top-k softmax probabilities.
    torch.testing.assert_close(r.weights_TK, torch.softmax(logits, -1).gather(1, r.experts_TK))
    rn = route(logits, K, renormalize=True, backend="torch")
    torch.testing.assert_close(rn.weights_TK.sum(-1), torch.ones(T))


def test_backend_validation():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError):
        route(x, 1, backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            route(x, 1, backend="triton")


@pytest.mark.parametrize("E,K", [(8, 2), (16, 4)])
def test_moe_matches_released_timer_s1_layer(E, K):
    """route -> permute -> experts -> unpermute equals sktime's per-expert loop layer."""
    pytest.importorskip("sktime")
    from sktime.libs.timer_s1.modeling_TimerS1 import TimerS1Config, TimerS1ExpertsLayer

    torch.manual_seed(E + K)
    D, Fw, T = 16, 24, 30
    cfg = TimerS1Config(hidden_size=D, intermediate_size=Fw * K, num_experts=E, num_experts_per_token=K)
    ref = TimerS1ExpertsLayer(cfg)
    w_router = ref.gate.weight.detach().clone().requires_grad_()
    wg = torch.stack([m.gate_proj.weight for m in ref.experts]).detach().clone().requires_grad_()
    wu = torch.stack([m.up_proj.weight for m in ref.experts]).detach().clone().requires_grad_()
    wd = torch.stack([m.down_proj.weight for m in ref.experts]).detach().clone().requires_grad_()
    x = torch.randn(2, T // 2, D)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.pow(2).sum().backward()

    xo = x.clone().requires_grad_()
    x_TD = xo.reshape(-1, D)
    r = route(x_TD @ w_router.t(), K, backend="torch")
    ys = swiglu_experts(permute(x_TD, r.sorted_slots_S, K), r.tokens_per_expert_E, wg, wu, wd, backend="torch")
    y = unpermute(ys, r.sorted_slots_S, r.weights_TK).view_as(x)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_router.grad, ref.gate.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wg.grad, torch.stack([m.gate_proj.weight.grad for m in ref.experts]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wd.grad, torch.stack([m.down_proj.weight.grad for m in ref.experts]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                    reason="TRITON_INTERPRET already set: tests/test_kernels_triton.py runs directly")
def test_triton_kernels_under_interpreter():
    """Run tests/test_kernels_triton.py in a fresh process with TRITON_INTERPRET=1.

    A subprocess is the only robust way: ``@triton.jit`` picks interpret-or-compile when the
    kernel modules are imported, and other tests in this session may have imported them already.
    """
    pytest.importorskip("triton")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_kernels_triton.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
