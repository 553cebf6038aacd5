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

Names: shape suffixes follow the package legend (S routed rows, D, F, E). The per-expert row
counts are ``tokens_per_expert_E`` everywhere (``tokens_per_expert_ptr`` in kernels, the host
list ``tokens_per_expert`` on the PyTorch path). The generic grouped-GEMM helpers take operands
whose widths are D or F depending on the call, so those operands carry no suffix; their
docstrings write M, N for output dims and R for the reduction length, never legend letters.
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


def _torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """a: [S, R], b: [E, R, N] -> [S, N]; rows of expert e end at ``offsets_E[e]``."""
    return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offsets_E))


def swiglu_experts_reference(
    x_SD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    offsets_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    gate_SF = _torch_grouped_mm(x_SD, w_gate_EFD.transpose(1, 2), offsets_E)
    up_SF = _torch_grouped_mm(x_SD, w_up_EFD.transpose(1, 2), offsets_E)
    return _torch_grouped_mm(F.silu(gate_SF) * up_SF, w_down_EDF.transpose(1, 2), offsets_E)


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
    def _tile_of(tokens_per_expert_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """Map program_id(0) to (expert, first row of the tile, end row of the expert).

        Tiles are numbered expert by expert: expert e owns cdiv(tokens_per_expert[e], BLOCK_M)
        tiles. A pid past the last tile gets e >= E (the caller skips it). Cost: one E-vector
        load + cumsum.
        """
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_E)
        tokens_per_expert = tl.load(tokens_per_expert_ptr + cols, mask=cols < E, other=0).to(tl.int32)
        tiles = (tokens_per_expert + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, axis=0)
        row_end = tl.cumsum(tokens_per_expert, axis=0)
        e = tl.sum((tile_end <= pid).to(tl.int32), axis=0)
        here = cols == e
        first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), axis=0)
        row_stop = tl.sum(tl.where(here, row_end, 0), axis=0)
        row_begin = row_stop - tl.sum(tl.where(here, tokens_per_expert, 0), axis=0)
        return e, row_begin + (pid - first_tile) * BLOCK_M, row_stop

    @triton.jit
    def _gate_up_fwd_kernel(
        x_ptr, w_gate_ptr, w_up_ptr, tokens_per_expert_ptr, g_ptr, u_ptr, h_ptr,
        E, D, Fw,
        s_we, s_wf, s_wd,
        PREC: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """G, U = X W_gate[e]^T, X W_up[e]^T sharing the X tile; epilogue H = silu(G) * U.
        x: [S, D] row-major; w_gate/w_up: [E, F, D], both with the strides s_w*; g/u/h: [S, F]
        row-major. Tiles: BLOCK_M rows, BLOCK_N of F, BLOCK_K of D (the reduction)."""
        e, m0, row_stop = _tile_of(tokens_per_expert_ptr, E, BLOCK_M, BLOCK_E)
        if e < E:
            rm = m0 + tl.arange(0, BLOCK_M)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            m_ok = rm < row_stop
            n_ok = rn < Fw
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            w_off = e * s_we + rn[None, :] * s_wf
            for k0 in range(0, D, BLOCK_K):
                k = k0 + rk
                k_ok = k < D
                a = tl.load(x_ptr + rm[:, None] * D + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & n_ok[None, :]
                bg = tl.load(w_gate_ptr + w_off + k[:, None] * s_wd, mask=w_mask, other=0.0)
                bu = tl.load(w_up_ptr + w_off + k[:, None] * s_wd, mask=w_mask, other=0.0)
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
        a_ptr, b_ptr, a2_ptr, b2_ptr, tokens_per_expert_ptr, c_ptr, g_ptr, u_ptr, c2_ptr,
        E, N, R,
        s_be, s_br, s_bn,
        TWO: tl.constexpr, SWIGLU_BWD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """C_e = A_e B[e] (+ A2_e B2[e] if TWO). A/A2: [S, R] row-major, B/B2: [E, R, N] via
        strides (so a transposed weight is just swapped strides; B2 uses B's), C: [S, N].
        Epilogue SWIGLU_BWD: the product is dH; reads G, U ([S, N]) at the tile and stores dG
        into c and dU into c2. Tiles: BLOCK_M rows, BLOCK_N of N, BLOCK_K of R (the reduction).
        Launched only through _grouped_mm, _grouped_mm_sum2 and _grouped_mm_swiglu_bwd."""
        e, m0, row_stop = _tile_of(tokens_per_expert_ptr, E, BLOCK_M, BLOCK_E)
        if e < E:
            rm = m0 + tl.arange(0, BLOCK_M)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            m_ok = rm < row_stop
            n_ok = rn < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            b_off = e * s_be + rn[None, :] * s_bn
            for k0 in range(0, R, BLOCK_K):
                k = k0 + rk
                k_ok = k < R
                a_mask = m_ok[:, None] & k_ok[None, :]
                b_mask = k_ok[:, None] & n_ok[None, :]
                a = tl.load(a_ptr + rm[:, None] * R + k[None, :], mask=a_mask, other=0.0)
                b = tl.load(b_ptr + b_off + k[:, None] * s_br, mask=b_mask, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
                if TWO:
                    a2 = tl.load(a2_ptr + rm[:, None] * R + k[None, :], mask=a_mask, other=0.0)
                    b2 = tl.load(b2_ptr + b_off + k[:, None] * s_br, mask=b_mask, other=0.0)
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
        a_ptr, b_ptr, g_ptr, u_ptr, tokens_per_expert_ptr, out_ptr,
        E, M, N,
        s_oe, s_om, s_on,
        H_FROM_GU: tl.constexpr, PREC: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[e] = A_e^T B_e, reduced over expert e's rows. A: [S, M], B: [S, N] row-major,
        out: [E, M, N] via strides. With H_FROM_GU, B is H = silu(G) * U recomputed from G and U
        on load (g/u: [S, N]). Tiles: BLOCK_M of M, BLOCK_N of N, BLOCK_K of the expert's rows
        (the reduction). grid = (E, m tiles * n tiles); an expert with no rows stores zeros.
        Launched only through _grouped_wgrad and _grouped_wgrad_recomputed_h."""
        e = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        rm = (tl.program_id(1) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tl.program_id(1) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_E)
        tokens_per_expert = tl.load(tokens_per_expert_ptr + cols, mask=cols < E, other=0).to(tl.int32)
        row_end = tl.cumsum(tokens_per_expert, axis=0)
        row_stop = tl.sum(tl.where(cols == e, row_end, 0), axis=0)
        row_begin = row_stop - tl.sum(tl.where(cols == e, tokens_per_expert, 0), axis=0)
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
# rows per expert, where 128-row tiles would be mostly padding. BLOCK_K always tiles the
# reduction of the kernel it is given to (see each kernel's docstring), never top-k.
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
    _gate_up_fwd_kernel: triton.autotune(_H100_CONFIGS, key=["D", "Fw"])(_gate_up_fwd_kernel),
    _grouped_mm_kernel: triton.autotune(_H100_CONFIGS, key=["N", "R", "TWO", "SWIGLU_BWD"])(_grouped_mm_kernel),
    _grouped_wgrad_kernel: triton.autotune(_H100_CONFIGS, key=["M", "N", "H_FROM_GU"])(_grouped_wgrad_kernel),
}


def _launch(kernel, grid, **args):
    """Launch with autotuned tiles on a GPU, fixed small tiles in the interpreter.

    ``args`` are keyword arguments named as the kernel's parameters. ``grid(meta)`` gets the
    tile sizes, because the number of tiles (and so the grid) depends on them.
    """
    if interpreting():
        kernel[grid(_INTERP_BLOCKS)](**args, **_INTERP_BLOCKS)
    else:
        _TUNED[kernel][grid](**args)


def _rows_grid(S, E, N):
    """Grid of the kernels that find their expert with ``_tile_of``: cdiv(S, BLOCK_M) + E row
    programs bound sum_e cdiv(tokens_per_expert[e], BLOCK_M) without a host sync; surplus
    programs exit at once."""
    return lambda meta: (triton.cdiv(S, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"]))


def _gate_up_swiglu(x_SD, w_gate_EFD, w_up_EFD, tokens_per_expert_E, g_SF, u_SF, h_SF):
    """G, U and H = silu(G) * U for all experts in one launch, into g_SF, u_SF, h_SF."""
    S, D = x_SD.shape
    E, Fw, _ = w_gate_EFD.shape
    assert w_up_EFD.stride() == w_gate_EFD.stride(), "the kernel reads both weights with one set of strides"
    if S == 0:
        return
    _launch(
        _gate_up_fwd_kernel, _rows_grid(S, E, Fw),
        x_ptr=x_SD, w_gate_ptr=w_gate_EFD, w_up_ptr=w_up_EFD, tokens_per_expert_ptr=tokens_per_expert_E,
        g_ptr=g_SF, u_ptr=u_SF, h_ptr=h_SF,
        E=E, D=D, Fw=Fw, s_we=w_gate_EFD.stride(0), s_wf=w_gate_EFD.stride(1), s_wd=w_gate_EFD.stride(2),
        PREC=dot_precision(x_SD.dtype), BLOCK_E=next_pow2(E),
    )


def _launch_grouped_mm(a, b, tokens_per_expert_E, out, *, TWO, SWIGLU_BWD,
                       a2=None, b2=None, g=None, u=None, c2=None):
    """The launch shared by the three ``_grouped_mm*`` modes.

    Operands a mode does not read stay None: Triton specializes a None argument as a constant,
    and the TWO / SWIGLU_BWD branches that would touch it are not compiled, so no placeholder
    tensor is needed.
    """
    S, R = a.shape
    E, _, N = b.shape
    if S == 0:
        return
    _launch(
        _grouped_mm_kernel, _rows_grid(S, E, N),
        a_ptr=a, b_ptr=b, a2_ptr=a2, b2_ptr=b2, tokens_per_expert_ptr=tokens_per_expert_E,
        c_ptr=out, g_ptr=g, u_ptr=u, c2_ptr=c2,
        E=E, N=N, R=R, s_be=b.stride(0), s_br=b.stride(1), s_bn=b.stride(2),
        TWO=TWO, SWIGLU_BWD=SWIGLU_BWD, PREC=dot_precision(a.dtype), BLOCK_E=next_pow2(E),
    )


def _grouped_mm(a, b, tokens_per_expert_E, out):
    """out_e = a_e b[e] per expert. a: [S, R] row-major; b: [E, R, N], any strides (pass
    ``w.transpose(1, 2)`` to multiply by w[e]^T without a copy); out: [S, N] row-major."""
    _launch_grouped_mm(a, b, tokens_per_expert_E, out, TWO=False, SWIGLU_BWD=False)
    return out


def _grouped_mm_sum2(a, b, a2, b2, tokens_per_expert_E, out):
    """out_e = a_e b[e] + a2_e b2[e] in one accumulator, so out is written once; shapes as in
    ``_grouped_mm``, and b2 must have b's strides."""
    assert b2.stride() == b.stride(), "the kernel reads b2 with b's strides"
    _launch_grouped_mm(a, b, tokens_per_expert_E, out, a2=a2, b2=b2, TWO=True, SWIGLU_BWD=False)
    return out


def _grouped_mm_swiglu_bwd(dy_SD, w_down_EDF, g_SF, u_SF, tokens_per_expert_E, dg_SF, du_SF):
    """dH_e = dY_e W_down[e] with the SwiGLU backward as epilogue, into dg_SF and du_SF: dH
    itself never reaches memory."""
    _launch_grouped_mm(dy_SD, w_down_EDF, tokens_per_expert_E, dg_SF, g=g_SF, u=u_SF, c2=du_SF,
                       TWO=False, SWIGLU_BWD=True)
    return dg_SF, du_SF


def _launch_grouped_wgrad(a, tokens_per_expert_E, out, *, H_FROM_GU, b=None, g=None, u=None):
    """The launch shared by the two ``_grouped_wgrad*`` modes (None operands: as in
    ``_launch_grouped_mm``). One program per (expert, output tile), so an expert without rows
    still writes its zeros."""
    E, M, N = out.shape
    _launch(
        _grouped_wgrad_kernel,
        lambda meta: (E, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),
        a_ptr=a, b_ptr=b, g_ptr=g, u_ptr=u, tokens_per_expert_ptr=tokens_per_expert_E, out_ptr=out,
        E=E, M=M, N=N, s_oe=out.stride(0), s_om=out.stride(1), s_on=out.stride(2),
        H_FROM_GU=H_FROM_GU, PREC=dot_precision(a.dtype), BLOCK_E=next_pow2(E),
    )
    return out


def _grouped_wgrad(a, b, tokens_per_expert_E, out):
    """out[e] = a_e^T b_e over expert e's rows. a: [S, M], b: [S, N] row-major; out: [E, M, N],
    any strides."""
    return _launch_grouped_wgrad(a, tokens_per_expert_E, out, b=b, H_FROM_GU=False)


def _grouped_wgrad_recomputed_h(a, g, u, tokens_per_expert_E, out):
    """out[e] = a_e^T h_e with h = silu(g) * u rebuilt as g and u load, so H is never stored;
    g, u: [S, N] row-major, otherwise as ``_grouped_wgrad``."""
    return _launch_grouped_wgrad(a, tokens_per_expert_E, out, g=g, u=u, H_FROM_GU=True)


def _triton_forward(x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF):
    S, D = x_SD.shape
    Fw = w_gate_EFD.shape[1]
    dt = x_SD.dtype
    g_SF = torch.empty(S, Fw, device=x_SD.device, dtype=dt)
    u_SF = torch.empty_like(g_SF)
    h_SF = torch.empty_like(g_SF)
    y_SD = torch.empty(S, D, device=x_SD.device, dtype=dt)
    _gate_up_swiglu(x_SD, w_gate_EFD, w_up_EFD, tokens_per_expert_E, g_SF, u_SF, h_SF)
    _grouped_mm(h_SF, w_down_EDF.transpose(1, 2), tokens_per_expert_E, y_SD)
    return y_SD, g_SF, u_SF


def _triton_backward(dy_SD, x_SD, g_SF, u_SF, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, need):
    dg_SF, du_SF = _grouped_mm_swiglu_bwd(dy_SD, w_down_EDF, g_SF, u_SF, tokens_per_expert_E,
                                          torch.empty_like(g_SF), torch.empty_like(u_SF))
    dx_SD = dw_gate_EFD = dw_up_EFD = dw_down_EDF = None
    if need[0]:
        dx_SD = _grouped_mm_sum2(dg_SF, w_gate_EFD, du_SF, w_up_EFD, tokens_per_expert_E,
                                 torch.empty_like(x_SD))
    if need[2]:
        dw_gate_EFD = _grouped_wgrad(dg_SF, x_SD, tokens_per_expert_E, torch.empty_like(w_gate_EFD))
    if need[3]:
        dw_up_EFD = _grouped_wgrad(du_SF, x_SD, tokens_per_expert_E, torch.empty_like(w_up_EFD))
    if need[4]:
        dw_down_EDF = _grouped_wgrad_recomputed_h(dy_SD, g_SF, u_SF, tokens_per_expert_E,
                                                  torch.empty_like(w_down_EDF))
    return dx_SD, dw_gate_EFD, dw_up_EFD, dw_down_EDF


# ---------------------------------------------------------------------------------------------
# PyTorch fast path
# ---------------------------------------------------------------------------------------------


def _torch_forward(x_SD, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF):
    S, D = x_SD.shape
    Fw = w_gate_EFD.shape[1]
    g_SF = x_SD.new_empty(S, Fw)
    u_SF = x_SD.new_empty(S, Fw)
    y_SD = x_SD.new_empty(S, D)
    # Per-expert views made once per call (one op each, not one select per expert and use).
    w_gate_DF, w_up_DF, w_down_FD = (w.transpose(1, 2).unbind(0) for w in (w_gate_EFD, w_up_EFD, w_down_EDF))
    lo = 0
    for e, n in enumerate(tokens_per_expert):
        if n == 0:
            continue
        hi = lo + n
        x, g, u = x_SD[lo:hi], g_SF[lo:hi], u_SF[lo:hi]
        torch.mm(x, w_gate_DF[e], out=g)
        torch.mm(x, w_up_DF[e], out=u)
        h = F.silu(g).mul_(u)  # this expert's block only: still in cache
        torch.mm(h, w_down_FD[e], out=y_SD[lo:hi])
        lo = hi
    return y_SD, g_SF, u_SF


def _empty_grad(w, tokens_per_expert):
    """Gradient buffer for a stacked [E, ., .] weight: uninitialised, except exact zeros for
    experts that received no rows (every other slice is overwritten by an ``mm(out=)``). Avoids
    a full zero-fill, which on CPU costs as much as a small GEMM (first-touch page faults)."""
    out = torch.empty_like(w)
    for e, n in enumerate(tokens_per_expert):
        if n == 0:
            out[e].zero_()
    return out


def _torch_backward(dy_SD, x_SD, g_SF, u_SF, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF, need):
    dx = torch.empty_like(x_SD) if need[0] else None
    dwg = _empty_grad(w_gate_EFD, tokens_per_expert) if need[2] else None
    dwu = _empty_grad(w_up_EFD, tokens_per_expert) if need[3] else None
    dwd = _empty_grad(w_down_EDF, tokens_per_expert) if need[4] else None
    silu_backward = torch.ops.aten.silu_backward
    w_gate_FD, w_up_FD, w_down_DF = (w.unbind(0) for w in (w_gate_EFD, w_up_EFD, w_down_EDF))
    dwg_FD, dwu_FD, dwd_DF = (grad.unbind(0) if grad is not None else None for grad in (dwg, dwu, dwd))
    lo = 0
    for e, n in enumerate(tokens_per_expert):
        if n == 0:
            continue
        hi = lo + n
        x, g, u, dy = x_SD[lo:hi], g_SF[lo:hi], u_SF[lo:hi], dy_SD[lo:hi]
        silu = F.silu(g)
        if dwd is not None:
            torch.mm(dy.t(), silu * u, out=dwd_DF[e])  # H recomputed, in cache
        dh = torch.mm(dy, w_down_DF[e])
        du = silu.mul_(dh)  # silu no longer needed: reuse its buffer
        # aten's fused SiLU backward: dG = (dH * U) * s * (1 + G (1 - s)) in one pass.
        dg = silu_backward(dh.mul_(u), g)
        if dwg is not None:
            torch.mm(dg.t(), x, out=dwg_FD[e])
        if dwu is not None:
            torch.mm(du.t(), x, out=dwu_FD[e])
        if dx is not None:
            dx_e = dx[lo:hi]
            torch.mm(dg, w_gate_FD[e], out=dx_e)
            dx_e.addmm_(du, w_up_FD[e])
        lo = hi
    return dx, dwg, dwu, dwd


class SwiGLUExpertsFunction(torch.autograd.Function):
    """All experts, forward and backward by hand; ``triton_path`` picks the kernels inside."""

    @staticmethod
    def forward(ctx, x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, triton_path):
        x_SD = x_SD.contiguous()
        ctx.triton_path = triton_path
        if triton_path:
            tokens_per_expert_E = tokens_per_expert_E.contiguous()
            y_SD, g_SF, u_SF = _triton_forward(x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF)
            ctx.save_for_backward(x_SD, g_SF, u_SF, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF)
        else:
            # One host sync for the split sizes: free on CPU, where this path runs.
            ctx.tokens_per_expert = tokens_per_expert_E.tolist()
            y_SD, g_SF, u_SF = _torch_forward(x_SD, ctx.tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF)
            ctx.save_for_backward(x_SD, g_SF, u_SF, w_gate_EFD, w_up_EFD, w_down_EDF)
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        dy_SD = dy_SD.contiguous()  # y.sum() sends a stride-0 gradient
        need = ctx.needs_input_grad
        if ctx.triton_path:
            x_SD, g_SF, u_SF, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF = ctx.saved_tensors
            dx, dwg, dwu, dwd = _triton_backward(dy_SD, x_SD, g_SF, u_SF, tokens_per_expert_E,
                                                 w_gate_EFD, w_up_EFD, w_down_EDF, need)
        else:
            x_SD, g_SF, u_SF, w_gate_EFD, w_up_EFD, w_down_EDF = ctx.saved_tensors
            dx, dwg, dwu, dwd = _torch_backward(dy_SD, x_SD, g_SF, u_SF, ctx.tokens_per_expert,
                                                w_gate_EFD, w_up_EFD, w_down_EDF, need)
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
