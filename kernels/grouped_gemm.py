"""SwiGLU experts over tokens grouped by expert: down(silu(gate(x)) * up(x)) per group.

Rows of ``x_SD`` arrive grouped by expert (``tokens_per_expert_E`` consecutive rows each, zero
allowed). Per expert e, with rows X_e:
    G_e = X_e W_gate[e]^T,  U_e = X_e W_up[e]^T,  H_e = silu(G_e) * U_e,  Y_e = H_e W_down[e]^T
Backward, by hand (same math on both backends):
    dH_e = dY_e W_down[e]
    dG_e = dH_e * U_e * s * (1 + G_e (1 - s)),  s = sigmoid(G_e)      dU_e = dH_e * silu(G_e)
    dX_e = dG_e W_gate[e] + dU_e W_up[e]
    dW_down[e] = dY_e^T H_e,  dW_gate[e] = dG_e^T X_e,  dW_up[e] = dU_e^T X_e
Only X, G and U are saved; H is recomputed in backward (elementwise, on data already in cache).

Implementations:
  * Triton (CUDA): three grouped-GEMM kernels, each ONE launch for all experts. The M tiles of
    all experts are numbered consecutively; every program finds its expert from the per-expert
    counts in-kernel (cumsum of cdiv(count, BLOCK_M)), so there is no host sync and no host-side
    tile table; programs past the last tile exit. Gate and up share the X tile loads (two
    accumulators) and the SwiGLU is the epilogue; the SwiGLU backward is the epilogue of dH;
    dX sums two products in one accumulator; weight gradients reduce over each expert's rows
    (an empty expert reduces nothing and stores zeros).
  * PyTorch fast path (CPU): one hand-written autograd Function looping over experts with
    ``torch.mm(..., out=)`` on contiguous row slices. Working expert by expert keeps each
    expert's G/U/H block in cache while its elementwise SwiGLU runs, which is why this path
    matches or beats one dense GEMM of the same FLOPs on CPU (see ``timers1 bench moe``). The
    Python loop costs a few microseconds per expert, small against the GEMMs.
  * ``swiglu_experts_reference``: ``torch._grouped_mm`` under autograd, the oracle;
    ``swiglu_experts_loop``: the naive per-expert loop under autograd, the other oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from timers1.kernels._dispatch import dot_precision, interpreting, next_pow2, tl, triton, use_triton


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s CPU backward rejects stride-0 gradients (what ``y.sum()`` sends
    back), so every grouped-mm output passes through this.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm(x_SI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_SI, w_EIO, offs=offsets_E))


def swiglu_experts_reference(
    x_SD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    offsets_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    gate_SF = _grouped_mm(x_SD, w_gate_EFD.transpose(1, 2), offsets_E)
    up_SF = _grouped_mm(x_SD, w_up_EFD.transpose(1, 2), offsets_E)
    return _grouped_mm(F.silu(gate_SF) * up_SF, w_down_EDF.transpose(1, 2), offsets_E)


def swiglu_experts_loop(
    x_SD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """One matmul chain per expert: the naive baseline the fused paths are tested against."""
    outs = []
    start = 0
    for e, n in enumerate(tokens_per_expert_E.tolist()):
        x = x_SD[start:start + n]
        start += n
        h = F.silu(x @ w_gate_EFD[e].T) * (x @ w_up_EFD[e].T)
        outs.append(h @ w_down_EDF[e].T)
    return torch.cat(outs, 0) if outs else x_SD.new_zeros(0, w_down_EDF.shape[1])


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile_of(counts_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """Map program_id(0) to (expert, first row of the tile, end row of the expert).

        Tiles are numbered expert by expert: expert e owns cdiv(count_e, BLOCK_M) tiles. A pid
        past the last tile gets e == E (the caller skips it). Cost: one E-vector load + cumsum.
        """
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_E)
        counts = tl.load(counts_ptr + cols, mask=cols < E, other=0).to(tl.int32)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, axis=0)
        row_end = tl.cumsum(counts, axis=0)
        e = tl.sum((tile_end <= pid).to(tl.int32), axis=0)
        here = cols == e
        first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), axis=0)
        row_stop = tl.sum(tl.where(here, row_end, 0), axis=0)
        row_begin = row_stop - tl.sum(tl.where(here, counts, 0), axis=0)
        return e, row_begin + (pid - first_tile) * BLOCK_M, row_stop

    @triton.jit
    def _gate_up_fwd_kernel(
        x_ptr, wg_ptr, wu_ptr, counts_ptr, g_ptr, u_ptr, h_ptr,
        E, Dm, Fw,
        s_we, s_wf, s_wd,
        PREC: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """G, U = X W_gate[e]^T, X W_up[e]^T sharing the X tile; epilogue H = silu(G) * U.
        x: [S, Dm] row-major; w*: [E, Fw, Dm] strided; g/u/h: [S, Fw] row-major."""
        e, m0, row_stop = _tile_of(counts_ptr, E, BLOCK_M, BLOCK_E)
        if e < E:
            rm = m0 + tl.arange(0, BLOCK_M)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            m_ok = rm < row_stop
            n_ok = rn < Fw
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            w_off = e * s_we + rn[None, :] * s_wf
            for k0 in range(0, Dm, BLOCK_K):
                k = k0 + rk
                k_ok = k < Dm
                a = tl.load(x_ptr + rm[:, None] * Dm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & n_ok[None, :]
                bg = tl.load(wg_ptr + w_off + k[:, None] * s_wd, mask=w_mask, other=0.0)
                bu = tl.load(wu_ptr + w_off + k[:, None] * s_wd, mask=w_mask, other=0.0)
                acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
                acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
            h = acc_g * tl.sigmoid(acc_g) * acc_u
            out = rm[:, None] * Fw + rn[None, :]
            ok = m_ok[:, None] & n_ok[None, :]
            tl.store(g_ptr + out, acc_g.to(g_ptr.dtype.element_ty), mask=ok)
            tl.store(u_ptr + out, acc_u.to(u_ptr.dtype.element_ty), mask=ok)
            tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _grouped_mm_kernel(
        a_ptr, b_ptr, a2_ptr, b2_ptr, counts_ptr, c_ptr, g_ptr, u_ptr, c2_ptr,
        E, N, Kd,
        s_be, s_bk, s_bn,
        TWO: tl.constexpr, SWIGLU_BWD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """C_e = A_e B[e] (+ A2_e B2[e] if TWO), A/A2: [S, Kd] row-major, B/B2: [E, Kd, N] via
        strides (so a transposed weight is just swapped strides). Epilogue SWIGLU_BWD reads G, U
        at the tile and stores dG into c and dU into c2 instead of C (which is dH)."""
        e, m0, row_stop = _tile_of(counts_ptr, E, BLOCK_M, BLOCK_E)
        if e < E:
            rm = m0 + tl.arange(0, BLOCK_M)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            m_ok = rm < row_stop
            n_ok = rn < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            b_off = e * s_be + rn[None, :] * s_bn
            for k0 in range(0, Kd, BLOCK_K):
                k = k0 + rk
                k_ok = k < Kd
                a_mask = m_ok[:, None] & k_ok[None, :]
                b_mask = k_ok[:, None] & n_ok[None, :]
                a = tl.load(a_ptr + rm[:, None] * Kd + k[None, :], mask=a_mask, other=0.0)
                b = tl.load(b_ptr + b_off + k[:, None] * s_bk, mask=b_mask, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
                if TWO:
                    a2 = tl.load(a2_ptr + rm[:, None] * Kd + k[None, :], mask=a_mask, other=0.0)
                    b2 = tl.load(b2_ptr + b_off + k[:, None] * s_bk, mask=b_mask, other=0.0)
                    acc = tl.dot(a2, b2, acc, input_precision=PREC)
            out = rm[:, None] * N + rn[None, :]
            ok = m_ok[:, None] & n_ok[None, :]
            if SWIGLU_BWD:
                g = tl.load(g_ptr + out, mask=ok, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + out, mask=ok, other=0.0).to(tl.float32)
                s = tl.sigmoid(g)
                tl.store(c_ptr + out, (acc * u * s * (1.0 + g * (1.0 - s))).to(c_ptr.dtype.element_ty), mask=ok)
                tl.store(c2_ptr + out, (acc * g * s).to(c2_ptr.dtype.element_ty), mask=ok)
            else:
                tl.store(c_ptr + out, acc.to(c_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _grouped_wgrad_kernel(
        a_ptr, b_ptr, g_ptr, u_ptr, counts_ptr, out_ptr,
        E, M, N,
        s_oe, s_om, s_on,
        H_FROM_GU: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[e] = A_e^T B_e, reduced over expert e's rows. A: [S, M], B: [S, N] row-major.
        With H_FROM_GU, B is H = silu(G) * U recomputed from G and U on load (g/u: [S, N]).
        grid = (E, m tiles * n tiles); an expert with no rows stores zeros."""
        e = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        rm = (tl.program_id(1) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tl.program_id(1) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_E)
        counts = tl.load(counts_ptr + cols, mask=cols < E, other=0).to(tl.int32)
        row_end = tl.cumsum(counts, axis=0)
        row_stop = tl.sum(tl.where(cols == e, row_end, 0), axis=0)
        row_begin = row_stop - tl.sum(tl.where(cols == e, counts, 0), axis=0)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(row_begin, row_stop, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < row_stop
            # A^T tile loaded directly as [BLOCK_M, BLOCK_K]: element (m, r) = A[r, m].
            at = tl.load(a_ptr + r[None, :] * M + rm[:, None], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b_mask = r_ok[:, None] & n_ok[None, :]
            if H_FROM_GU:
                g = tl.load(g_ptr + r[:, None] * N + rn[None, :], mask=b_mask, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + r[:, None] * N + rn[None, :], mask=b_mask, other=0.0).to(tl.float32)
                b = (g * tl.sigmoid(g) * u).to(at.dtype)
            else:
                b = tl.load(b_ptr + r[:, None] * N + rn[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(at, b, acc, input_precision=PREC)
        tl.store(out_ptr + e * s_oe + rm[:, None] * s_om + rn[None, :] * s_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# H100 bf16 candidates: 128x128x64 with 8 warps / 3 stages is the usual winner for MoE-sized
# problems (hundreds to thousands of rows per expert); narrower tiles for small widths or few
# rows per expert, where 128-row tiles would be mostly padding.
_H100_CONFIGS = [] if triton is None else [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3),
    ]
]
# The interpreter cannot autotune (no device timer) and runs each program as numpy calls:
# one small legal tile (tl.dot needs every dim >= 16).
_INTERP_BLOCKS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
# Tuning keys: the GEMM's fixed dims and the epilogue flags; the token count S varies every
# step and only changes the grid, so it is left out (the tile-to-expert map is in-kernel).
_TUNED = {} if triton is None else {
    _gate_up_fwd_kernel: triton.autotune(_H100_CONFIGS, key=["Dm", "Fw"])(_gate_up_fwd_kernel),
    _grouped_mm_kernel: triton.autotune(_H100_CONFIGS, key=["N", "Kd", "TWO", "SWIGLU_BWD"])(_grouped_mm_kernel),
    _grouped_wgrad_kernel: triton.autotune(_H100_CONFIGS, key=["M", "N", "H_FROM_GU"])(_grouped_wgrad_kernel),
}


def _launch(kernel, grid, *args, **kwargs):
    """Launch with autotuned tiles on a GPU, fixed small tiles in the interpreter.

    ``grid(meta)`` gets the tile sizes, because the number of M tiles (and so the grid) depends
    on BLOCK_M: the grouped kernels launch cdiv(S, BLOCK_M) + E programs, an upper bound on
    sum_e cdiv(count_e, BLOCK_M) that needs no host sync; surplus programs exit at once.
    """
    if interpreting():
        kernel[grid(_INTERP_BLOCKS)](*args, **kwargs, **_INTERP_BLOCKS)
    else:
        _TUNED[kernel][grid](*args, **kwargs)


def _wgrad(a_SM, b_SN, counts_E, out, g=None, u=None):
    """out[e] = a_e^T b_e into ``out`` ([E, M, N] with arbitrary strides)."""
    E, M, N = out.shape
    _launch(
        _grouped_wgrad_kernel,
        lambda meta: (E, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),
        a_SM, b_SN if b_SN is not None else a_SM, g if g is not None else a_SM, u if u is not None else a_SM,
        counts_E, out, E, M, N, out.stride(0), out.stride(1), out.stride(2),
        H_FROM_GU=g is not None, PREC=dot_precision(a_SM.dtype), BLOCK_E=next_pow2(E),
    )
    return out


def _rows_grid(S, E, N):
    return lambda meta: (triton.cdiv(S, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"]))


def _triton_forward(x_SD, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF):
    S, D = x_SD.shape
    E, Fw, _ = w_gate_EFD.shape
    dt = x_SD.dtype
    g_SF = torch.empty(S, Fw, device=x_SD.device, dtype=dt)
    u_SF = torch.empty_like(g_SF)
    h_SF = torch.empty_like(g_SF)
    y_SD = torch.empty(S, D, device=x_SD.device, dtype=dt)
    if S == 0:
        return y_SD, g_SF, u_SF
    prec = dot_precision(dt)
    BE = next_pow2(E)
    _launch(
        _gate_up_fwd_kernel, _rows_grid(S, E, Fw),
        x_SD, w_gate_EFD, w_up_EFD, counts_E, g_SF, u_SF, h_SF, E, D, Fw,
        w_gate_EFD.stride(0), w_gate_EFD.stride(1), w_gate_EFD.stride(2),
        PREC=prec, BLOCK_E=BE,
    )
    # Y = H W_down[e]^T: B[e] = W_down[e]^T is [F, D], i.e. W_down with its last two strides swapped.
    _launch(
        _grouped_mm_kernel, _rows_grid(S, E, D),
        h_SF, w_down_EDF, h_SF, w_down_EDF, counts_E, y_SD, y_SD, y_SD, y_SD, E, D, Fw,
        w_down_EDF.stride(0), w_down_EDF.stride(2), w_down_EDF.stride(1),
        TWO=False, SWIGLU_BWD=False, PREC=prec, BLOCK_E=BE,
    )
    return y_SD, g_SF, u_SF


def _triton_backward(dy_SD, x_SD, g_SF, u_SF, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF, need):
    S, D = x_SD.shape
    E, Fw, _ = w_gate_EFD.shape
    prec = dot_precision(x_SD.dtype)
    BE = next_pow2(E)
    dg_SF = torch.empty_like(g_SF)
    du_SF = torch.empty_like(u_SF)
    # dH = dY W_down[e] with the SwiGLU backward as epilogue -> dG, dU.
    if S > 0:
        _launch(
            _grouped_mm_kernel, _rows_grid(S, E, Fw),
            dy_SD, w_down_EDF, dy_SD, w_down_EDF, counts_E, dg_SF, g_SF, u_SF, du_SF, E, Fw, D,
            w_down_EDF.stride(0), w_down_EDF.stride(1), w_down_EDF.stride(2),
            TWO=False, SWIGLU_BWD=True, PREC=prec, BLOCK_E=BE,
        )
    dx = dwg = dwu = dwd = None
    if need[0]:
        # dX = dG W_gate[e] + dU W_up[e], both products in one accumulator.
        dx = torch.empty_like(x_SD)
        if S > 0:
            _launch(
                _grouped_mm_kernel, _rows_grid(S, E, D),
                dg_SF, w_gate_EFD, du_SF, w_up_EFD, counts_E, dx, dx, dx, dx, E, D, Fw,
                w_gate_EFD.stride(0), w_gate_EFD.stride(1), w_gate_EFD.stride(2),
                TWO=True, SWIGLU_BWD=False, PREC=prec, BLOCK_E=BE,
            )
    if need[2]:
        dwg = _wgrad(dg_SF, x_SD, counts_E, torch.empty_like(w_gate_EFD))
    if need[3]:
        dwu = _wgrad(du_SF, x_SD, counts_E, torch.empty_like(w_up_EFD))
    if need[4]:
        dwd = _wgrad(dy_SD, None, counts_E, torch.empty_like(w_down_EDF), g=g_SF, u=u_SF)
    return dx, dwg, dwu, dwd


# ---------------------------------------------------------------------------------------------
# PyTorch fast path
# ---------------------------------------------------------------------------------------------


def _torch_forward(x_SD, counts, w_gate_EFD, w_up_EFD, w_down_EDF):
    S, D = x_SD.shape
    Fw = w_gate_EFD.shape[1]
    g_SF = x_SD.new_empty(S, Fw)
    u_SF = x_SD.new_empty(S, Fw)
    y_SD = x_SD.new_empty(S, D)
    lo = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        hi = lo + n
        x, g, u = x_SD[lo:hi], g_SF[lo:hi], u_SF[lo:hi]
        torch.mm(x, w_gate_EFD[e].t(), out=g)
        torch.mm(x, w_up_EFD[e].t(), out=u)
        h = F.silu(g).mul_(u)  # this expert's block only: still in cache
        torch.mm(h, w_down_EDF[e].t(), out=y_SD[lo:hi])
        lo = hi
    return y_SD, g_SF, u_SF


def _empty_grad(w_EXY, counts):
    """Gradient buffer for a stacked weight: uninitialised, except exact zeros for experts that
    received no rows (every other slice is overwritten by an ``mm(out=)``). Avoids a full
    zero-fill, which on CPU costs as much as a small GEMM (first-touch page faults)."""
    out = torch.empty_like(w_EXY)
    for e, n in enumerate(counts):
        if n == 0:
            out[e].zero_()
    return out


def _torch_backward(dy_SD, x_SD, g_SF, u_SF, counts, w_gate_EFD, w_up_EFD, w_down_EDF, need):
    dx = torch.empty_like(x_SD) if need[0] else None
    dwg = _empty_grad(w_gate_EFD, counts) if need[2] else None
    dwu = _empty_grad(w_up_EFD, counts) if need[3] else None
    dwd = _empty_grad(w_down_EDF, counts) if need[4] else None
    silu_backward = torch.ops.aten.silu_backward
    lo = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        hi = lo + n
        x, g, u, dy = x_SD[lo:hi], g_SF[lo:hi], u_SF[lo:hi], dy_SD[lo:hi]
        silu = F.silu(g)
        if dwd is not None:
            torch.mm(dy.t(), silu * u, out=dwd[e])  # H recomputed, in cache
        dh = torch.mm(dy, w_down_EDF[e])
        du = silu.mul_(dh)  # silu no longer needed: reuse its buffer
        # aten's fused SiLU backward: dG = (dH * U) * s * (1 + G (1 - s)) in one pass.
        dg = silu_backward(dh.mul_(u), g)
        if dwg is not None:
            torch.mm(dg.t(), x, out=dwg[e])
        if dwu is not None:
            torch.mm(du.t(), x, out=dwu[e])
        if dx is not None:
            dx_e = dx[lo:hi]
            torch.mm(dg, w_gate_EFD[e], out=dx_e)
            dx_e.addmm_(du, w_up_EFD[e])
        lo = hi
    return dx, dwg, dwu, dwd


class SwiGLUExpertsFunction(torch.autograd.Function):
    """All experts, forward and backward by hand; ``triton_path`` picks the kernels inside."""

    @staticmethod
    def forward(ctx, x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, triton_path):
        x_SD = x_SD.contiguous()
        ctx.triton_path = triton_path
        if triton_path:
            counts = tokens_per_expert_E.contiguous()
            y, g, u = _triton_forward(x_SD, counts, w_gate_EFD, w_up_EFD, w_down_EDF)
            ctx.save_for_backward(x_SD, g, u, counts, w_gate_EFD, w_up_EFD, w_down_EDF)
        else:
            # One host sync for the split sizes: free on CPU, where this path runs.
            ctx.counts = tokens_per_expert_E.tolist()
            y, g, u = _torch_forward(x_SD, ctx.counts, w_gate_EFD, w_up_EFD, w_down_EDF)
            ctx.save_for_backward(x_SD, g, u, w_gate_EFD, w_up_EFD, w_down_EDF)
        return y

    @staticmethod
    def backward(ctx, dy_SD):
        dy_SD = dy_SD.contiguous()  # y.sum() sends a stride-0 gradient
        need = ctx.needs_input_grad
        if ctx.triton_path:
            x, g, u, counts, wg, wu, wd = ctx.saved_tensors
            dx, dwg, dwu, dwd = _triton_backward(dy_SD, x, g, u, counts, wg, wu, wd, need)
        else:
            x, g, u, wg, wu, wd = ctx.saved_tensors
            dx, dwg, dwu, dwd = _torch_backward(dy_SD, x, g, u, ctx.counts, wg, wu, wd, need)
        return dx, None, dwg, dwu, dwd, None


def swiglu_experts(
    x_SD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """All experts in one call; rows of ``x_SD`` are grouped by expert in ``tokens_per_expert_E`` counts.

    Weights must share ``x_SD``'s dtype. 'torch' (CPU default) is the hand-written per-expert
    path; 'triton' (CUDA default) the grouped-GEMM kernels.
    """
    tp = use_triton(backend, x_SD, w_gate_EFD)
    return SwiGLUExpertsFunction.apply(x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, tp)
