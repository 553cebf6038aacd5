"""Gather tokens into expert order, and scatter expert outputs back weighted by the router."""

from __future__ import annotations

import torch


def permute_reference(x_TD: torch.Tensor, sorted_slots_S: torch.Tensor, top_k: int) -> torch.Tensor:
    return x_TD.index_select(0, sorted_slots_S // top_k)


def unpermute_reference(
    y_SD: torch.Tensor, sorted_slots_S: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    num_tokens, top_k = weights_TK.shape
    weight_S = weights_TK.reshape(-1).index_select(0, sorted_slots_S).to(y_SD.dtype)
    out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[-1])
    return out_TD.index_add(0, sorted_slots_S // top_k, y_SD * weight_S[:, None])


def permute(x_TD: torch.Tensor, sorted_slots_S: torch.Tensor, top_k: int, backend: str = "auto") -> torch.Tensor:
    """Rows of ``x_TD`` in expert order: row s is token ``sorted_slots_S[s] // top_k``."""
    return permute_reference(x_TD, sorted_slots_S, top_k)


def unpermute(
    y_SD: torch.Tensor, sorted_slots_S: torch.Tensor, weights_TK: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Sum over each token's K slots of routing weight x expert output, back in token order."""
    return unpermute_reference(y_SD, sorted_slots_S, weights_TK)
