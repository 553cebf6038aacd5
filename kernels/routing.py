"""Router: fp32 softmax over experts, top-k, per-expert counts and the expert-ordered permutation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Everything downstream of the router needs, computed once per MoE layer call."""

    weights_TK: torch.Tensor
    """fp32 routing weight of each token's k-th choice (differentiable w.r.t. the logits)."""
    experts_TK: torch.Tensor
    """int64 expert id of each token's k-th choice."""
    probs_TE: torch.Tensor
    """fp32 softmax over all experts (for the load-balancing loss)."""
    tokens_per_expert_E: torch.Tensor
    """int64 number of routed slots per expert."""
    sorted_slots_S: torch.Tensor
    """int64 slot ids (token * K + k) ordered by expert, stable within an expert."""


def route_reference(logits_TE: torch.Tensor, top_k: int, renormalize: bool = False) -> Routing:
    # Softmax in fp32 whatever the activation dtype: bf16 probabilities are too coarse to rank
    # 32+ experts stably, and the released model was trained this way.
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    flat_S = experts_TK.reshape(-1)
    tokens_per_expert_E = torch.bincount(flat_S, minlength=logits_TE.shape[-1])
    sorted_slots_S = torch.argsort(flat_S, stable=True)
    return Routing(weights_TK, experts_TK, probs_TE, tokens_per_expert_E, sorted_slots_S)


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool = False, backend: str = "auto") -> Routing:
    """Route tokens to experts. ``backend``: 'auto' | 'torch' | 'triton'."""
    return route_reference(logits_TE, top_k, renormalize)
