"""TimeMoE block (pre-norm attention + MoE) and TimeSTP block (serial-token prediction)."""

from __future__ import annotations

import torch
from torch import nn

from timers1.config import ModelConfig, MoEConfig
from timers1.model.attention import Attention
from timers1.model.layers import RMSNorm
from timers1.model.moe import MoE, RouterRecord


class TimeMoEBlock(nn.Module):
    """``h = h + Attn(norm(h)); h = h + MoE(norm(h))``."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        d = model_cfg.hidden_size
        self.attention_norm = RMSNorm(d)
        self.attention = Attention(d, model_cfg.num_heads, model_cfg.dropout)
        self.moe_norm = RMSNorm(d)
        # The released code sizes each expert as intermediate_size // top_k, so the active
        # FFN width per token stays intermediate_size whatever K is.
        self.moe = MoE(
            d,
            model_cfg.intermediate_size // moe_cfg.top_k,
            moe_cfg.num_experts,
            moe_cfg.top_k,
            moe_cfg.renormalize_weights,
            moe_cfg.kernel_backend,
        )

    def attend(self, h_BND: torch.Tensor, rope, attn_mask_B1NN: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half and the MoE's input norm: (h after attention, moe_norm of it).

        A method of its own because it is the block's elementwise-heavy part (two RMSNorms,
        RoPE, QK-norm, the gate, the residual add around five small GEMMs): ``train.compile``
        compiles it whole (``parallelize.apply_compile``), the MoE half stays hand-written.
        """
        h_BND = h_BND + self.attention(self.attention_norm(h_BND), rope, attn_mask_B1NN)
        return h_BND, self.moe_norm(h_BND)

    def forward(self, h_BND: torch.Tensor, rope, attn_mask_B1NN: torch.Tensor | None = None,
                token_valid_BN: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterRecord]:
        """``attn_mask_B1NN``/``token_valid_BN``: see ``timer_s1.padding_masks`` (None: no padding)."""
        h_BND, moe_in_BND = self.attend(h_BND, rope, attn_mask_B1NN)
        moe_out, record = self.moe(moe_in_BND, token_valid_BN)
        return h_BND + moe_out, record


class TimeSTPBlock(nn.Module):
    """Serial-token prediction block j: ``norm(Block(W [norm(h_{j-1}); norm(h0)]))``.

    h0 (the patch embeddings at the same positions) enters every STP block; no shifted future
    tokens are fed, so all H blocks can be trained densely in one pass.
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        d = model_cfg.hidden_size
        self.hidden_norm = RMSNorm(d)
        self.embed_norm = RMSNorm(d)
        self.projection = nn.Linear(2 * d, d, bias=False)
        self.block = TimeMoEBlock(model_cfg, moe_cfg)
        self.out_norm = RMSNorm(d)

    def forward(self, h_BND: torch.Tensor, h0_BND: torch.Tensor, rope, attn_mask_B1NN: torch.Tensor | None = None,
                token_valid_BN: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterRecord]:
        x = self.projection(torch.cat([self.hidden_norm(h_BND), self.embed_norm(h0_BND)], dim=-1))
        x, record = self.block(x, rope, attn_mask_B1NN, token_valid_BN)
        return self.out_norm(x), record
