"""Gather tokens into expert order, and scatter expert outputs back weighted by the router.

Both directions are written as *gathers*, never as scatter-adds: with the inverse permutation
``row_of_slot_S`` (row_of_slot_S[slot] = position of that slot in expert order) every token
reads its K rows and sums them, so there are no atomics on the GPU and no serial ``index_add``
on the CPU, and the sum over k runs in a fixed order (deterministic, identical across backends).

  permute:    x_SD[s]    = x_TD[sorted_slots_S[s] // K]
    backward: dx_TD[t]   = sum_k dx_SD[row_of_slot_S[t*K + k]]              (gather + sum)
  unpermute:  y_TD[t]    = sum_k w_TK[t, k] * y_SD[row_of_slot_S[t*K + k]]  (gather + weighted sum)
    backward: dy_SD[s]   = w[slot_s] * dy_TD[slot_s // K]                   (a scaled permute)
              dw_TK[t,k] = <dy_TD[t], y_SD[row_of_slot_S[t*K + k]]>

Each op: Triton kernels, a PyTorch path (also hand-written forward/backward, because autograd
through index_select would backprop with index_add), one autograd Function per op whose
internals switch between the two, and the dispatcher. Sums accumulate in fp32.
"""

from __future__ import annotations

import torch

from timers1.kernels._dispatch import next_pow2, tl, triton, use_triton


def permute_reference(x_TD: torch.Tensor, sorted_slots_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """Oracle: autograd through index_select."""
    return x_TD.index_select(0, sorted_slots_S // top_k)


def unpermute_reference(
    y_SD: torch.Tensor, sorted_slots_S: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """Oracle: autograd through index_add (the textbook scatter formulation)."""
    num_tokens, top_k = weights_TK.shape
    weight_S = weights_TK.reshape(-1).index_select(0, sorted_slots_S).to(y_SD.dtype)
    out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[-1])
    return out_TD.index_add(0, sorted_slots_S // top_k, y_SD * weight_S[:, None])


def inverse_permutation(sorted_slots_S: torch.Tensor) -> torch.Tensor:
    """row_of_slot_S with row_of_slot_S[sorted_slots_S[s]] = s (one O(S) integer scatter)."""
    inv_S = torch.empty_like(sorted_slots_S)
    inv_S[sorted_slots_S] = torch.arange(sorted_slots_S.numel(), device=sorted_slots_S.device)
    return inv_S


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gather_rows_kernel(
        src_ptr, idx_ptr, scale_ptr, scale_idx_ptr, dst_ptr, R, D,
        DIV: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dst[r] = (scale[scale_idx[r]] *) src[idx[r] // DIV]; src/dst row-major with D columns."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        r_ok = r < R
        ok = r_ok[:, None] & (d < D)[None, :]
        slot = tl.load(idx_ptr + r, mask=r_ok, other=0)
        v = tl.load(src_ptr + (slot // DIV)[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_SCALE:
            w = tl.load(scale_ptr + tl.load(scale_idx_ptr + r, mask=r_ok, other=0), mask=r_ok, other=0.0)
            v = v * w.to(tl.float32)[:, None]
        tl.store(dst_ptr + r[:, None] * D + d[None, :], v.to(dst_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gather_sum_kernel(
        src_ptr, inv_ptr, w_ptr, dst_ptr, T, D,
        K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dst[t] = sum_k (w[t, k] *) src[inv[t*K + k]], summed in k order in fp32."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        t_ok = t < T
        ok = t_ok[:, None] & (d < D)[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + k, mask=t_ok, other=0)
            v = tl.load(src_ptr + row[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + k, mask=t_ok, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(dst_ptr + t[:, None] * D + d[None, :], acc.to(dst_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _weight_grad_kernel(
        dy_ptr, y_ptr, inv_ptr, dw_ptr, T, D,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dw[t, k] = <dy_TD[t], y_SD[inv[t*K + k]]>, reduced over D in fp32."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        for k in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + k, mask=t_ok, other=0)
            acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                ok = t_ok[:, None] & (d < D)[None, :]
                g = tl.load(dy_ptr + t[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
                v = tl.load(y_ptr + row[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
                acc += tl.sum(g * v, axis=1)
            tl.store(dw_ptr + t * K + k, acc, mask=t_ok)


_BLOCK_R = 32   # rows per program: 32 x 128 elements, a 16 KiB bf16 tile
_BLOCK_D = 128


def _gather_rows(src, idx, div, out_rows, scale=None, scale_idx=None):
    D = src.shape[1]
    dst = torch.empty(out_rows, D, device=src.device, dtype=src.dtype)
    if out_rows == 0 or D == 0:
        return dst
    grid = (triton.cdiv(out_rows, _BLOCK_R), triton.cdiv(D, _BLOCK_D))
    # Without a scale its pointers stay None: Triton specializes None as a constant and the
    # HAS_SCALE branch that would read them is not compiled.
    _gather_rows_kernel[grid](
        src_ptr=src, idx_ptr=idx, scale_ptr=scale, scale_idx_ptr=scale_idx, dst_ptr=dst, R=out_rows, D=D,
        DIV=div, HAS_SCALE=scale is not None, BLOCK_R=_BLOCK_R, BLOCK_D=_BLOCK_D,
    )
    return dst


def _gather_sum(src, inv_S, T, K, weights=None, out_dtype=None):
    D = src.shape[1]
    dst = torch.empty(T, D, device=src.device, dtype=out_dtype or src.dtype)
    if T == 0 or D == 0:
        return dst
    grid = (triton.cdiv(T, _BLOCK_R), triton.cdiv(D, _BLOCK_D))
    _gather_sum_kernel[grid](
        src_ptr=src, inv_ptr=inv_S, w_ptr=weights, dst_ptr=dst, T=T, D=D,  # w None: see _gather_rows
        K=K, HAS_W=weights is not None, BLOCK_T=_BLOCK_R, BLOCK_D=_BLOCK_D,
    )
    return dst


# ---------------------------------------------------------------------------------------------
# PyTorch fast path (what the model runs on CPU): the same gathers with torch ops
# ---------------------------------------------------------------------------------------------


def _torch_gather_sum(src_SD, inv_S, T, K):
    """sum_k src[inv[t*K+k]]: one index_select plus a reduction over k."""
    return src_SD.index_select(0, inv_S).view(T, K, -1).sum(1)


def _weighted_k_sum(y_TKD, weights_TK):
    """sum_k w[t, k] * y[t, k], accumulated in k order with K fused multiply-adds over [T, D].

    Not ``bmm([T,1,K], [T,K,D])``: a batch of T 1xK products is MKL's slowest shape (4.5x these
    multiply-adds for T=1024, K=2, D=128 on the 2-core machine) and writes no fewer bytes.
    """
    w_TK1 = weights_TK.to(y_TKD.dtype).unsqueeze(-1)
    out_TD = y_TKD[:, 0] * w_TK1[:, 0]
    for k in range(1, y_TKD.shape[1]):
        out_TD.addcmul_(y_TKD[:, k], w_TK1[:, k])
    return out_TD


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, sorted_slots_S, top_k, triton_path):
        ctx.top_k, ctx.triton_path, ctx.num_tokens = top_k, triton_path, x_TD.shape[0]
        ctx.save_for_backward(sorted_slots_S)
        if triton_path:
            return _gather_rows(x_TD.contiguous(), sorted_slots_S, top_k, sorted_slots_S.numel())
        return x_TD.index_select(0, sorted_slots_S // top_k)

    @staticmethod
    def backward(ctx, grad_SD):
        (sorted_slots_S,) = ctx.saved_tensors
        inv_S = inverse_permutation(sorted_slots_S)
        grad_SD = grad_SD.contiguous()
        if ctx.triton_path:
            dx = _gather_sum(grad_SD, inv_S, ctx.num_tokens, ctx.top_k)
        else:
            dx = _torch_gather_sum(grad_SD, inv_S, ctx.num_tokens, ctx.top_k)
        return dx, None, None, None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD, sorted_slots_S, weights_TK, triton_path):
        T, K = weights_TK.shape
        inv_S = inverse_permutation(sorted_slots_S)
        y_SD = y_SD.contiguous()
        ctx.triton_path = triton_path
        if triton_path:
            ctx.save_for_backward(y_SD, sorted_slots_S, inv_S, weights_TK)
            return _gather_sum(y_SD, inv_S, T, K, weights_TK.contiguous())
        # PyTorch path: keep y in token order ([T, K, D], same size as y_SD) for the weight
        # gradient, so backward does not gather it a second time.
        y_TKD = y_SD.index_select(0, inv_S).view(T, K, -1)
        ctx.save_for_backward(y_TKD, sorted_slots_S, inv_S, weights_TK)
        return _weighted_k_sum(y_TKD, weights_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        y_saved, sorted_slots_S, inv_S, weights_TK = ctx.saved_tensors
        T, K = weights_TK.shape
        D = y_saved.shape[-1]
        grad_TD = grad_TD.contiguous()
        dy = dw = None
        if ctx.triton_path:
            w_S = weights_TK.contiguous().view(-1)
            if ctx.needs_input_grad[0]:
                dy = _gather_rows(grad_TD, sorted_slots_S, K, T * K, scale=w_S, scale_idx=sorted_slots_S)
            if ctx.needs_input_grad[2]:
                dw = torch.empty(T, K, device=y_saved.device, dtype=torch.float32)
                if T > 0:
                    _weight_grad_kernel[(triton.cdiv(T, 64),)](
                        grad_TD, y_saved, inv_S, dw, T, D, K=K, BLOCK_T=64, BLOCK_D=min(128, next_pow2(D)),
                    )
                dw = dw.to(weights_TK.dtype)
        else:
            if ctx.needs_input_grad[0]:
                w_S = weights_TK.reshape(-1).index_select(0, sorted_slots_S).to(grad_TD.dtype)
                dy = grad_TD.index_select(0, sorted_slots_S // K).mul_(w_S[:, None])
            if ctx.needs_input_grad[2]:
                # The per-slot dot products <y[t, k], dy[t]> (a product and a row sum: see
                # _weighted_k_sum on why not a batched matmul).
                dw = (y_saved * grad_TD.unsqueeze(1)).sum(-1).to(weights_TK.dtype)
        return dy, None, dw, None


def permute(x_TD: torch.Tensor, sorted_slots_S: torch.Tensor, top_k: int, backend: str = "auto") -> torch.Tensor:
    """Rows of ``x_TD`` in expert order: row s is token ``sorted_slots_S[s] // top_k``."""
    return PermuteFunction.apply(x_TD, sorted_slots_S, top_k, use_triton(backend, x_TD))


def unpermute(
    y_SD: torch.Tensor, sorted_slots_S: torch.Tensor, weights_TK: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Sum over each token's K slots of routing weight x expert output, back in token order.

    The output has ``y_SD``'s dtype; the weights (fp32) are applied in fp32 on the Triton path.
    """
    return UnpermuteFunction.apply(y_SD, sorted_slots_S, weights_TK, use_triton(backend, y_SD))
