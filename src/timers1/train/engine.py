"""What the training loop needs from the engine, and the single-device implementation.

The loop only ever calls: ``model_parts`` (modules whose parameters the optimizer owns and
the checkpoint saves), ``forward_backward(values, mask, scale)``, ``clip_grad_norm(max)`` and
``reduce_loss(x)``. ``timers1.parallel`` provides the multi-rank engine behind the same
methods; ``make_engine`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from timers1.config import Config
from timers1.losses import window_loss


@dataclass
class StepResult:
    loss_floats: dict[str, float]
    """Loss parts of this microbatch (unscaled), as plain floats."""
    tokens_per_expert_LE: torch.Tensor | None
    """Routed slots per expert for every MoE block (int64, [L + H, E]) on this rank."""


def tokens_per_expert(records) -> torch.Tensor | None:
    if not records:
        return None
    return torch.stack([r.routing.tokens_per_expert_E.detach() for r in records]).to(torch.int64)


class LocalEngine:
    """One process, one device, the plain model."""

    dp_rank, dp_size = 0, 1

    def __init__(self, model: nn.Module, cfg: Config):
        self.model = model
        self.cfg = cfg
        self.model_parts = [model]

    def forward_backward(self, values_BW: torch.Tensor, mask_BW: torch.Tensor, scale: float = 1.0) -> StepResult:
        cfg = self.cfg
        self.model.train()
        parts, records = window_loss(self.model, values_BW, mask_BW, cfg.data.context_points, cfg.model.quantiles,
                                     cfg.train.stp_weighting, cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef)
        (parts.total * scale).backward()
        return StepResult(parts.as_floats(), tokens_per_expert(records))

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def reduce_loss(self, loss: float) -> float:
        return loss


def make_engine(model: nn.Module, cfg: Config, world_size: int):
    if world_size == 1:
        return LocalEngine(model, cfg)
    from timers1.train.distributed_engine import DistributedEngine

    return DistributedEngine(model, cfg, world_size)
