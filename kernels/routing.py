"""Router: fp32 softmax over experts, top-k, per-expert counts and the expert-ordered permutation.

Three implementations of one contract (see ``Routing``):
  * ``route_reference``: plain PyTorch ops under autograd; the CPU path and the test oracle;
  * ``_route_fwd_kernel`` / ``_route_bwd_kernel``: Triton, one launch each way;
  * ``RouteFunction``: the autograd Function wrapping the Triton pair.

Numerics: the softmax runs in fp32 whatever the logit dtype (bf16 probabilities are too coarse
to rank 32+ experts stably, and the released model was trained this way). Timer-S1 does **not**
renormalize the k selected weights; ``renormalize=True`` exists for other MoE recipes.
Ordering: ``sorted_slots_S`` lists slot ids (slot = token * K + k) grouped by expert and, inside
an expert, in increasing slot id (a stable sort), so every backend yields the same permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from timers1.kernels._dispatch import next_pow2, tl, triton, use_triton


@dataclass
class Routing:
    """Everything downstream of the router needs, computed once per MoE layer call."""

    weights_TK: torch.Tensor
    """fp32 routing weight of each token's k-th choice (differentiable w.r.t. the logits)."""
    experts_TK: torch.Tensor
    """int64 expert id of each token's k-th choice."""
    probs_TE: torch.Tensor
    """fp32 softmax over all experts (for the load-balancing loss; differentiable)."""
    tokens_per_expert_E: torch.Tensor
    """int64 number of routed slots per expert."""
    sorted_slots_S: torch.Tensor
    """int64 slot ids (token * K + k) ordered by expert, stable within an expert."""


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------


def route_reference(logits_TE: torch.Tensor, top_k: int, renormalize: bool = False) -> Routing:
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    flat_S = experts_TK.reshape(-1)
    tokens_per_expert_E = torch.bincount(flat_S, minlength=logits_TE.shape[-1])
    # Stable: inside one expert, slots stay in token order (the Triton kernel matches this).
    sorted_slots_S = torch.argsort(flat_S, stable=True)
    return Routing(weights_TK, experts_TK, probs_TE, tokens_per_expert_E, sorted_slots_S)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _route_fwd_kernel(
        logits_ptr, probs_ptr, weights_ptr, experts_ptr, tokens_per_expert_ptr, sorted_slots_ptr,
        hist_ptr, rank_ptr, ticket_ptr,
        T, E, stride_lt, stride_le,
        K: tl.constexpr, RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One launch: softmax, top-k, counts and the stable expert-ordered permutation.

        Phase 1 (every program, one tile of BLOCK_T tokens): softmax and top-k in registers;
        store weights/experts/probs, the tile's per-expert histogram ``hist[tile, :]`` and, per
        slot, its rank among the tile's slots of the same expert (an exclusive cumsum down the
        token axis: a token never picks an expert twice, so slot order = token order there).

        Phase 2 (the last program to finish, elected by an acq_rel atomic ticket, the classic
        "last block" reduction): scan the histograms into per-(tile, expert) base offsets, then
        scatter every slot id to base[tile, expert] + rank. The scan is over tiles (a few
        hundred E-vectors), the scatter a vectorised gather/store, so the serial tail is short.
        Cross-program visibility: each program's stores precede its release on the ticket; the
        elected program acquires it, and reads the others' data with ``.cg`` loads (L2, not a
        possibly stale L1).
        """
        tile = tl.program_id(0)
        num_tiles = tl.num_programs(0)
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        col_ok = cols < E
        ok = row_ok[:, None] & col_ok[None, :]

        x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le,
                    mask=ok, other=float("-inf")).to(tl.float32)
        x_max = tl.max(x, axis=1)
        x_max = tl.where(row_ok, x_max, 0.0)  # padded rows: avoid (-inf) - (-inf)
        ex = tl.exp(x - x_max[:, None])
        ex = tl.where(ok, ex, 0.0)
        denom = tl.sum(ex, axis=1)
        denom = tl.where(row_ok, denom, 1.0)
        p = ex / denom[:, None]
        tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=ok)

        # Top-k by k rounds of (max, lowest index attaining it, knock out). Padded experts
        # hold -1 < any probability, so they are never picked while K <= E.
        work = tl.where(col_ok[None, :], p, -1.0)
        chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
        sel_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for _k in tl.static_range(K):
            best = tl.max(work, axis=1)
            idx = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == idx[:, None]
            chosen += hit.to(tl.int32)
            sel_sum += best
            work = tl.where(hit, -2.0, work)
        chosen = tl.where(row_ok[:, None], chosen, 0)
        rank_TE = tl.cumsum(chosen, axis=0) - chosen  # slots of this tile before, same expert
        tl.store(hist_ptr + tile * BLOCK_E + cols, tl.sum(chosen, axis=0))

        # Second identical round of picks, now storing (the first one had to finish to know the
        # ranks and, with RENORM, the sum of the k selected probabilities).
        scale = 1.0 / tl.where(row_ok, sel_sum, 1.0)
        work = tl.where(col_ok[None, :], p, -1.0)
        for k in tl.static_range(K):
            best = tl.max(work, axis=1)
            idx = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == idx[:, None]
            work = tl.where(hit, -2.0, work)
            w = best * scale if RENORM else best
            slot = rows * K + k
            tl.store(weights_ptr + slot, w, mask=row_ok)
            tl.store(experts_ptr + slot, idx.to(tl.int64), mask=row_ok)
            tl.store(rank_ptr + slot, tl.sum(tl.where(hit, rank_TE, 0), axis=1), mask=row_ok)

        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == num_tiles - 1:
            # ---- phase 2: only the last program gets here ----
            totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
            for j in range(0, num_tiles):
                totals += tl.load(hist_ptr + j * BLOCK_E + cols, cache_modifier=".cg")
            tl.store(tokens_per_expert_ptr + cols, totals.to(tl.int64), mask=col_ok)
            running = tl.cumsum(totals, axis=0) - totals  # expert start offsets
            for j in range(0, num_tiles):
                h = tl.load(hist_ptr + j * BLOCK_E + cols, cache_modifier=".cg")
                tl.store(hist_ptr + j * BLOCK_E + cols, running)  # hist becomes base offsets
                running += h
            tl.debug_barrier()  # base offsets written by some threads, read by others below
            S = T * K
            for start in range(0, S, BLOCK_S):
                s = start + tl.arange(0, BLOCK_S)
                s_ok = s < S
                e = tl.load(experts_ptr + s, mask=s_ok, other=0, cache_modifier=".cg").to(tl.int32)
                r = tl.load(rank_ptr + s, mask=s_ok, other=0, cache_modifier=".cg")
                base = tl.load(hist_ptr + (s // (BLOCK_T * K)) * BLOCK_E + e, mask=s_ok, other=0,
                               cache_modifier=".cg")
                tl.store(sorted_slots_ptr + base + r, s.to(tl.int64), mask=s_ok)

    @triton.jit
    def _route_bwd_kernel(
        probs_ptr, experts_ptr, grad_w_ptr, grad_p_ptr, grad_logits_ptr,
        T, E,
        K: tl.constexpr, RENORM: tl.constexpr, HAS_GRAD_P: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """d logits = p * (g - <p, g>) with g the gradient w.r.t. the full probability row:
        grad_probs (if the aux loss used them) plus each selected weight's gradient at its
        expert. With RENORM, w_k = p_k / sum_j p_j, so g_k = (gw_k - <gw, w>) / sum_j p_j."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        ok = row_ok[:, None] & (cols < E)[None, :]
        p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=ok, other=0.0)
        if HAS_GRAD_P:
            g = tl.load(grad_p_ptr + rows[:, None] * E + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        else:
            g = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        if RENORM:
            sel_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
            gw_dot_p = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for k in tl.static_range(K):
                e = tl.load(experts_ptr + rows * K + k, mask=row_ok, other=0)
                gw = tl.load(grad_w_ptr + rows * K + k, mask=row_ok, other=0.0).to(tl.float32)
                pk = tl.sum(tl.where(cols[None, :] == e[:, None], p, 0.0), axis=1)
                sel_sum += pk
                gw_dot_p += gw * pk
            sel_sum = tl.where(row_ok, sel_sum, 1.0)
            shift = gw_dot_p / sel_sum  # <gw, w>
        for k in tl.static_range(K):
            e = tl.load(experts_ptr + rows * K + k, mask=row_ok, other=0)
            gw = tl.load(grad_w_ptr + rows * K + k, mask=row_ok, other=0.0).to(tl.float32)
            if RENORM:
                gw = (gw - shift) / sel_sum
            g += tl.where(cols[None, :] == e[:, None], gw[:, None], 0.0)
        dlogits = p * (g - tl.sum(p * g, axis=1)[:, None])
        tl.store(grad_logits_ptr + rows[:, None] * E + cols[None, :], dlogits, mask=ok)


def _route_block_t(num_experts_padded: int) -> int:
    # Keep a [BLOCK_T, BLOCK_E] fp32 tile near 4K elements: registers on a GPU, speed in the
    # interpreter. E=32 -> 128 tokens per program, E=64 -> 64.
    return max(16, min(128, 4096 // num_experts_padded))


class RouteFunction(torch.autograd.Function):
    """Triton routing; differentiable outputs are weights_TK and probs_TE."""

    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, top_k: int, renormalize: bool):
        T, E = logits_TE.shape
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k must be in [1, num_experts={E}], got {top_k}")
        dev = logits_TE.device
        BLOCK_E = next_pow2(E)
        BLOCK_T = _route_block_t(BLOCK_E)
        num_tiles = max(1, triton.cdiv(T, BLOCK_T))
        probs_TE = torch.empty(T, E, device=dev, dtype=torch.float32)
        weights_TK = torch.empty(T, top_k, device=dev, dtype=torch.float32)
        experts_TK = torch.empty(T, top_k, device=dev, dtype=torch.int64)
        tokens_per_expert_E = torch.empty(E, device=dev, dtype=torch.int64)
        sorted_slots_S = torch.empty(T * top_k, device=dev, dtype=torch.int64)
        hist = torch.empty(num_tiles, BLOCK_E, device=dev, dtype=torch.int32)
        rank_S = torch.empty(T * top_k, device=dev, dtype=torch.int32)
        ticket = torch.zeros(1, device=dev, dtype=torch.int32)
        _route_fwd_kernel[(num_tiles,)](
            logits_TE, probs_TE, weights_TK, experts_TK, tokens_per_expert_E, sorted_slots_S,
            hist, rank_S, ticket,
            T, E, logits_TE.stride(0), logits_TE.stride(1),
            K=top_k, RENORM=renormalize, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_S=1024,
        )
        ctx.save_for_backward(probs_TE, experts_TK)
        ctx.renormalize = renormalize
        ctx.logits_dtype = logits_TE.dtype
        ctx.mark_non_differentiable(experts_TK, tokens_per_expert_E, sorted_slots_S)
        return weights_TK, experts_TK, probs_TE, tokens_per_expert_E, sorted_slots_S

    @staticmethod
    def backward(ctx, grad_w_TK, _ge, grad_p_TE, _gc, _gs):
        probs_TE, experts_TK = ctx.saved_tensors
        T, E = probs_TE.shape
        K = experts_TK.shape[1]
        if grad_w_TK is None:
            grad_w_TK = torch.zeros(T, K, device=probs_TE.device, dtype=torch.float32)
        grad_w_TK = grad_w_TK.contiguous()
        has_gp = grad_p_TE is not None
        grad_p_TE = grad_p_TE.contiguous() if has_gp else None  # None: the HAS_GRAD_P branch is not compiled
        grad_logits = torch.empty(T, E, device=probs_TE.device, dtype=torch.float32)
        BLOCK_E = next_pow2(E)
        BLOCK_T = _route_block_t(BLOCK_E)
        _route_bwd_kernel[(max(1, triton.cdiv(T, BLOCK_T)),)](
            probs_ptr=probs_TE, experts_ptr=experts_TK, grad_w_ptr=grad_w_TK, grad_p_ptr=grad_p_TE,
            grad_logits_ptr=grad_logits, T=T, E=E, K=K, RENORM=ctx.renormalize, HAS_GRAD_P=has_gp, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
        )
        return grad_logits.to(ctx.logits_dtype), None, None


def route_triton(logits_TE: torch.Tensor, top_k: int, renormalize: bool = False) -> Routing:
    weights_TK, experts_TK, probs_TE, tokens_per_expert_E, sorted_slots_S = RouteFunction.apply(
        logits_TE, top_k, renormalize)
    return Routing(weights_TK, experts_TK, probs_TE, tokens_per_expert_E, sorted_slots_S)


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool = False, backend: str = "auto") -> Routing:
    """Route tokens to experts. ``backend``: 'auto' | 'torch' | 'triton'."""
    if use_triton(backend, logits_TE):
        return route_triton(logits_TE, top_k, renormalize)
    return route_reference(logits_TE, top_k, renormalize)
