"""Mixture-of-Experts feed-forward: softmax top-k router and SwiGLU experts computed loop-free.

The layer is three phases, each a call into ``timers1.kernels``:
  1. route: fp32 softmax over E, top-k (no renormalization in Timer-S1), counts, the
     permutation that groups routed slots by expert;
  2. experts: ``self.experts(x_SD, tokens_per_expert_E)`` on slots already grouped by expert.
     This module call is **the seam**: expert parallelism hooks an all-to-all dispatch onto
     its input and the matching combine onto its output, from outside (it sees grouped tokens
     and counts, nothing else), and a faster kernel replaces what runs inside it;
  3. unpermute: weighted sum of each token's K expert outputs, back in token order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from timers1.kernels import Routing, permute, route, swiglu_experts, unpermute


@dataclass
class RouterRecord:
    """What one MoE call exposes for losses and metrics."""

    routing: Routing
    logits_TE: torch.Tensor
    token_valid_T: torch.Tensor | None = None
    """bool per token: False for fully padded patches, which routing losses must ignore."""


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three stacked weights: ``down(silu(gate x) * up x)``, no biases."""

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.w_gate_EFD = nn.Parameter(torch.empty(num_experts, expert_hidden, hidden_size))
        self.w_up_EFD = nn.Parameter(torch.empty(num_experts, expert_hidden, hidden_size))
        self.w_down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden))

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # Under expert parallelism the weights are DTensors sharded over experts, and the rows
        # that reach this call are already those of this rank's experts: the local shard is the
        # whole computation. (torchtitan's GroupedExperts does the same: the variable-size row
        # groups cannot be expressed as DTensors.)
        w_gate_EFD, w_up_EFD, w_down_EDF = (w.to_local() if isinstance(w, DTensor) else w
                                            for w in (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF))
        # Autocast leaves custom autograd functions alone. Under FSDP the rows and weights arrive
        # in bf16 already (its param_dtype); in one process they would arrive in fp32 and the
        # grouped GEMMs would run in fp32, so cast them here as autocast casts nn.Linear's.
        device_type = x_SD.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x_SD, w_gate_EFD, w_up_EFD, w_down_EDF = (t.to(dtype) for t in (x_SD, w_gate_EFD, w_up_EFD, w_down_EDF))
        return swiglu_experts(x_SD, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, backend=self.backend)


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        expert_hidden: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.backend = backend
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = GroupedExperts(num_experts, hidden_size, expert_hidden, backend)

    def forward(self, x_BND: torch.Tensor, token_valid_BN: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterRecord]:
        """``token_valid_BN`` (bool, optional) marks real tokens; it only travels to the record."""
        x_TD = x_BND.reshape(-1, x_BND.shape[-1])
        logits_TE = self.router(x_TD)
        routing = route(logits_TE, self.top_k, self.renormalize, backend=self.backend)
        x_SD = permute(x_TD, routing.sorted_slots_S, self.top_k, backend=self.backend)
        y_SD = self.experts(x_SD, routing.tokens_per_expert_E)
        y_TD = unpermute(y_SD, routing.sorted_slots_S, routing.weights_TK, backend=self.backend)
        valid_T = token_valid_BN.reshape(-1) if token_valid_BN is not None else None
        return y_TD.view_as(x_BND), RouterRecord(routing, logits_TE, valid_T)
