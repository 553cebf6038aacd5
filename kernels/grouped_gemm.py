"""SwiGLU experts over tokens grouped by expert: down(silu(gate(x)) * up(x)) per group."""

from __future__ import annotations

import torch


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
    return _grouped_mm(torch.nn.functional.silu(gate_SF) * up_SF, w_down_EDF.transpose(1, 2), offsets_E)


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
        h = torch.nn.functional.silu(x @ w_gate_EFD[e].T) * (x @ w_up_EFD[e].T)
        outs.append(h @ w_down_EDF[e].T)
    return torch.cat(outs, 0) if outs else x_SD.new_zeros(0, w_down_EDF.shape[1])


def swiglu_experts(
    x_SD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """All experts in one call; rows of ``x_SD`` are grouped by expert in ``tokens_per_expert_E`` counts."""
    return swiglu_experts_reference(x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF)
