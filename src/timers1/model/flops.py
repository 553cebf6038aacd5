"""Parameter counts (on the meta device) and model FLOPs per patch token.

Active parameters are those a single token touches: everything except the (E - K) experts it
is not routed to in each of the L + H MoE blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from timers1.config import ModelConfig, MoEConfig


def count_params(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> tuple[int, int]:
    """(total, active per token), counted over the real module tree built on the meta device."""
    from timers1.model.timer_s1 import build_model

    model = build_model(model_cfg, moe_cfg, device="meta")
    total = expert = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if name.endswith(("w_gate_EFD", "w_up_EFD", "w_down_EDF")):
            expert += param.numel()
    active = total - expert + expert * moe_cfg.top_k // moe_cfg.num_experts
    return total, active


@dataclass(frozen=True)
class ForwardFlops:
    """Forward matmul FLOPs per input patch token, by the part of the model that spends them.

    Counted as 2 x (multiply-adds). ``attention_proj``: q, k, v, gate and o of one block;
    ``attention_scores``: QK^T and AV of one causal block over on average S/2 keys (2 * S * D);
    ``router`` and ``experts`` (the K routed SwiGLU experts) of one block; ``stp_extra``: the
    input projection of one STP block on top of its TimeMoE block; ``head``: one application of
    the quantile head; ``embed``: the patch embedding. Norms, softmax and elementwise work are
    left out, as MFU conventions do.
    """

    embed: float
    attention_proj: float
    attention_scores: float
    router: float
    experts: float
    stp_extra: float
    head: float

    @property
    def block(self) -> float:
        """One TimeMoE block (main or the shared part of an STP block)."""
        return self.attention_proj + self.attention_scores + self.router + self.experts


def forward_flops_parts(model_cfg: ModelConfig, moe_cfg: MoEConfig, context_patches: int) -> ForwardFlops:
    """The terms of ``forward_flops_per_patch``, per block / per application."""
    p, d, i = model_cfg.patch_points, model_cfg.hidden_size, model_cfg.intermediate_size
    q = len(model_cfg.quantiles)
    f = i // moe_cfg.top_k
    return ForwardFlops(
        embed=2.0 * (2 * p * i + i * d + 2 * p * d),
        attention_proj=2.0 * 5 * d * d,
        attention_scores=2.0 * context_patches * d,
        router=2.0 * d * moe_cfg.num_experts,
        experts=2.0 * 3 * moe_cfg.top_k * d * f,
        stp_extra=2.0 * 2 * d * d,
        head=2.0 * (d * d + 2 * d * q * p),
    )


def forward_flops_per_patch(model_cfg: ModelConfig, moe_cfg: MoEConfig, context_patches: int) -> float:
    """Matmul FLOPs of one training forward, per input patch token, with all H STP blocks.

    The embedding, L + H TimeMoE blocks (attention projections, causal attention, router, K
    active SwiGLU experts), the H STP input projections and the head applied H + 1 times; see
    ``ForwardFlops`` for each term.
    """
    parts = forward_flops_parts(model_cfg, moe_cfg, context_patches)
    blocks = model_cfg.num_layers + model_cfg.num_stp_blocks
    h = model_cfg.num_stp_blocks
    return parts.embed + blocks * parts.block + h * parts.stp_extra + (h + 1) * parts.head


def train_flops_per_patch(model_cfg: ModelConfig, moe_cfg: MoEConfig, context_patches: int) -> float:
    """Forward + backward (2x forward) FLOPs per patch token."""
    return 3.0 * forward_flops_per_patch(model_cfg, moe_cfg, context_patches)
