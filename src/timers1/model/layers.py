"""Small building blocks shared by every part of Timer-S1: RMSNorm, RoPE, the residual MLP.

Shape legend used across model/: B batch, N patch tokens, L points, D hidden, H heads,
Dh head dim, P patch points, Q quantiles, E experts, F expert width, K top-k, T = B*N tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x / (sqrt(mean(x^2)) + eps) * w``.

    The released model adds eps *after* the square root (unlike the usual
    ``rsqrt(mean + eps)``); that matters for parity on near-zero activations, so keep it.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The clamp changes no value the released code computes (it only acts below 1e-38),
        # but keeps the gradient finite for an all-zero row: sqrt'(0) is inf, and fully padded
        # patches embed to exactly zero while the embedding biases are still zero.
        rms = x.pow(2).mean(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
        return x / (rms + self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(num_positions: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [num_positions, head_dim] for positions 0..num_positions-1.

    Computed in fp32 exactly as the released code builds its cache (outer product of integer
    positions and inverse frequencies, duplicated halves), then cast, so positions agree to
    the last bit. Recomputed per call instead of cached in a buffer: it is tiny next to
    attention, and buffers complicate meta-device init and sharded checkpoints.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    positions = torch.arange(num_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHND: torch.Tensor, cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
    half = x_BHND.shape[-1] // 2
    rotated = torch.cat((-x_BHND[..., half:], x_BHND[..., :half]), dim=-1)
    return x_BHND * cos_ND + rotated * sin_ND


class ResidualMLP(nn.Module):
    """``Dropout(out(SiLU(hidden(x)))) + residual(x)``: the patch embedding and the quantile head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.hidden_layer = nn.Linear(in_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, out_dim)
        self.residual_layer = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.silu(self.hidden_layer(x))
        return self.dropout(self.output_layer(hidden)) + self.residual_layer(x)
