"""What the training loop needs from the engine, and the single-device implementation.

The loop only ever calls: ``model_parts`` (modules whose parameters the optimizer owns and
the checkpoint saves), ``forward_backward(values, mask, scale)``, ``clip_grad_norm(max)`` and
``reduce_loss(x)``. ``timers1.parallel`` provides the multi-rank engine behind the same
methods; ``make_engine`` picks one.
"""

from __future__ import annotations

import contextlib

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
        if cfg.parallel.activation_checkpointing:
            from timers1.parallel.parallelize import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        device_type = next(model.parameters()).device.type
        # bf16 autocast on GPUs ('auto') or when asked; the router softmax stays fp32 inside.
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device_type == "cuda")
        self._autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())

    def forward_backward(self, values_BW: torch.Tensor, mask_BW: torch.Tensor, scale: float = 1.0) -> StepResult:
        cfg = self.cfg
        self.model.train()
        with self._autocast:
            parts, records = window_loss(self.model, values_BW, mask_BW, cfg.data.context_points,
                                         cfg.model.quantiles, cfg.train.stp_weighting, cfg.moe.aux_loss_coef,
                                         cfg.moe.z_loss_coef, cfg.train.min_prefix_fraction,
                                         cfg.train.wql_denominator)
        (parts.total * scale).backward()
        return StepResult(parts.as_floats(), tokens_per_expert(records))

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def reduce_loss(self, loss: float) -> float:
        return loss


def grad_norm_of(parts: list[nn.Module], skip_names: set[str] = frozenset()) -> torch.Tensor:
    """Global L2 norm of the gradients of ``parts`` (DTensor shards on any mesh, or plain tensors).

    DTensor norms are grouped by mesh and placement so every group reduces over its own
    shards (dense and expert parameters live on different meshes); replicated copies count
    once. Parameters named in ``skip_names`` are left out (pipeline copies of the head on all
    but one stage).
    """
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    plain = []
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is None or name in skip_names:
                continue
            if isinstance(p.grad, DTensor):
                groups.setdefault((p.grad.device_mesh, p.grad.placements), []).append(p.grad)
            else:
                plain.append(p.grad)
    device = next(p for part in parts for p in part.parameters()).device
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for grads in groups.values():
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        norm = torch.linalg.vector_norm(norms)
        total_sq += (norm.full_tensor() if isinstance(norm, DTensor) else norm).double() ** 2
    for g in plain:
        total_sq += torch.linalg.vector_norm(g.float()).double() ** 2
    return total_sq.sqrt()


def clip_grads_(parts: list[nn.Module], total_norm: torch.Tensor, max_norm: float) -> None:
    coef = max_norm / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for part in parts:
            for p in part.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)


class DistributedEngine:
    """The multi-rank engine of ``timers1.parallel`` behind the interface the loop uses."""

    def __init__(self, model: nn.Module, cfg: Config, world_size: int, device: torch.device):
        from timers1.parallel import ParallelDims, build_engine
        from timers1.parallel.losses import _in_backward

        self.cfg = cfg
        self.dims = ParallelDims.from_config(cfg.parallel, world_size)
        self.engine = build_engine(model, self.dims, cfg, device)
        self.model_parts = self.engine.model_parts
        self.dp_rank, self.dp_size = self.dims.dp_rank, self.dims.dp
        self._pp_group = self.dims.mesh("pp").get_group() if self.dims.pp > 1 else None
        # The head is copied into every stage: its gradient counts once, on pp rank 0's first part.
        keep_head = self._pp_group is None or self.dims.mesh("pp").get_local_rank() == 0
        self._skip_per_part = [
            set() if (i == 0 and keep_head) else {n for n, _ in part.named_parameters() if n.startswith("head.")}
            for i, part in enumerate(self.model_parts)
        ]
        num_blocks = cfg.model.num_layers + cfg.model.num_stp_blocks
        self._load_LE = torch.zeros(num_blocks, cfg.moe.num_experts, dtype=torch.int64)

        def counter(block_id: int):
            def hook(_module, _args, out):
                if not _in_backward():  # activation-checkpoint recomputation would count twice
                    self._load_LE[block_id] += out[1].routing.tokens_per_expert_E.detach().cpu()
            return hook

        for part in self.model_parts:
            for name, block in part.layers.items():
                block.moe.register_forward_hook(counter(int(name)))
            for name, stp in part.stp_blocks.items():
                stp.block.moe.register_forward_hook(counter(cfg.model.num_layers + int(name)))

    def forward_backward(self, values_BW: torch.Tensor, mask_BW: torch.Tensor, scale: float = 1.0) -> StepResult:
        self._load_LE.zero_()
        self.engine.train()
        parts = self.engine.forward_backward(values_BW, mask_BW, grad_scale=scale)
        # Counts are per rank (tokens routed here); the loop sums them over ranks.
        return StepResult(parts.as_floats(), self._load_LE.clone())

    def clip_grad_norm(self, max_norm: float) -> float:
        norms = [grad_norm_of([part], skip) for part, skip in zip(self.model_parts, self._skip_per_part)]
        total = torch.stack(norms).pow(2).sum()
        if self._pp_group is not None:
            torch.distributed.all_reduce(total, group=self._pp_group)
        total = total.sqrt()
        if max_norm != float("inf") and torch.isfinite(total):
            clip_grads_(self.model_parts, total, max_norm)
        return float(total)

    def reduce_loss(self, loss: float) -> float:
        return loss  # the engine's loss parts are already identical on every rank


def make_engine(model: nn.Module, cfg: Config, world_size: int, device: torch.device | None = None):
    if world_size == 1:
        return LocalEngine(model, cfg)
    return DistributedEngine(model, cfg, world_size, device or torch.device("cpu"))
