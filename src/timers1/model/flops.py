"""Parameter counts (on the meta device) and model FLOPs per patch token.

Active parameters are those a single token touches: everything except the (E - K) experts it
is not routed to in each of the L + H MoE blocks.
"""

from __future__ import annotations

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


def forward_flops_per_patch(model_cfg: ModelConfig, moe_cfg: MoEConfig, context_patches: int) -> float:
    """Matmul FLOPs of one training forward, per input patch token, with all H STP blocks.

    Counted as 2 x (multiply-adds): embedding, per block attention projections (q, k, v, gate,
    o), router and K active SwiGLU experts, STP input projections, the head applied H + 1
    times, and causal attention (QK^T and AV over on average S/2 keys: 2 * S * D per block).
    Norms, softmax and elementwise work are left out, as MFU conventions do.
    """
    p, d, i = model_cfg.patch_points, model_cfg.hidden_size, model_cfg.intermediate_size
    q = len(model_cfg.quantiles)
    blocks = model_cfg.num_layers + model_cfg.num_stp_blocks
    h = model_cfg.num_stp_blocks
    f = i // moe_cfg.top_k
    embed = 2 * p * i + i * d + 2 * p * d
    per_block = 5 * d * d + d * moe_cfg.num_experts + 3 * moe_cfg.top_k * d * f
    head = d * d + 2 * d * q * p
    matmul_params = embed + blocks * per_block + h * 2 * d * d + (h + 1) * head
    return 2.0 * matmul_params + blocks * 2.0 * context_patches * d


def train_flops_per_patch(model_cfg: ModelConfig, moe_cfg: MoEConfig, context_patches: int) -> float:
    """Forward + backward (2x forward) FLOPs per patch token."""
    return 3.0 * forward_flops_per_patch(model_cfg, moe_cfg, context_patches)
