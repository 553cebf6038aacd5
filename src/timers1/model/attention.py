"""Gated causal self-attention with RoPE and QK-norm, as released with Timer-S1."""

from __future__ import annotations

import torch
from torch import nn

from timers1.model.layers import apply_rope


class HeadRMSNorm(nn.Module):
    """Per-head QK-norm ``x * rsqrt(mean(x^2) + eps) * w`` over the head dim (one w shared by all heads).

    A module of its own, not a method of ``Attention``, so tensor parallelism can treat it like
    any other norm: its input is sharded over heads and its weight replicated, and DTensor sums
    the weight's per-head partial gradients (a sequence-parallel style on dim 1 = heads).
    """

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x_BHND: torch.Tensor) -> torch.Tensor:
        return x_BHND * torch.rsqrt(x_BHND.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """q/k/v (with bias) -> RoPE -> per-head QK-norm -> causal SDPA -> sigmoid gate -> o (no bias).

    Order matters for parity: QK-norm is applied *after* RoPE, and the gate is computed from
    the block input (the normed hidden state), not from the attention output.
    q/k/v/gate are column-parallel and o row-parallel under tensor parallelism; the head
    count is read from the weight shapes at run time so a TP-sharded module works unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, qk_norm_eps: float = 1e-6):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.gate_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm = HeadRMSNorm(self.head_dim, qk_norm_eps)
        self.k_norm = HeadRMSNorm(self.head_dim, qk_norm_eps)

    def _heads(self, x_BND: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x_BND.shape
        return x_BND.view(batch, tokens, width // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(self, x_BND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn_mask_B1NN: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask_B1NN`` (bool, True = may attend) replaces the plain causal mask when given."""
        cos_ND, sin_ND = rope
        q = self.q_norm(apply_rope(self._heads(self.q_proj(x_BND)), cos_ND, sin_ND))
        k = self.k_norm(apply_rope(self._heads(self.k_proj(x_BND)), cos_ND, sin_ND))
        v = self._heads(self.v_proj(x_BND))
        out_BHND = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask_B1NN, is_causal=attn_mask_B1NN is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        gate_BHND = self._heads(torch.sigmoid(self.gate_proj(x_BND)))
        out_BND = (out_BHND * gate_BHND).transpose(1, 2).flatten(2)
        return self.o_proj(out_BND)
