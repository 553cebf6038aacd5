"""Tensor + sequence parallelism in Megatron's layout, through DTensor plans.

Between blocks the hidden state is a DTensor ``Shard(1)`` (sequence parallel): every
per-position module (patch embedding, RMSNorms, STP input projection, quantile head) runs on
its own slice of positions with **replicated** weights, so nothing is computed twice and the
weights' gradients come out as partial sums that DTensor (via FSDP's redistribute) all-reduces.
Attention needs the whole sequence:

    Shard(1) --all-gather--> q/k/v/gate (column-parallel: each rank owns num_heads/tp heads)
             --> local RoPE, QK-norm, SDPA, gate --> o (row-parallel) --reduce-scatter--> Shard(1)

The ``Attention`` module reads the head count from the local weight width, so it runs on the
local shard unchanged; its per-head-dim QK-norm scales are shared by all heads, so each rank's
gradient for them is a partial sum over its heads: they are replicated DTensors turned local
with ``grad_placements=Partial()``.

The MoE runs on the local tokens of the sequence shard (no gather): routing is per token, and
expert parallelism (if any) moves rows between ranks anyway. The router weight is replicated
and used the same Partial-gradient way; the experts' gradients are summed over tp by the
expert FSDP mesh, which spans the tp ranks (see dims.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from timers1.model.attention import Attention
from timers1.model.block import TimeMoEBlock, TimeSTPBlock


def _partial_local(p: torch.Tensor) -> torch.Tensor:
    """A replicated parameter used on rank-local data: its local gradient is a partial sum."""
    return p.to_local(grad_placements=(Partial(),)) if isinstance(p, DTensor) else p


class TPAttention(Attention):
    """Attention whose QK-norm scales are replicated DTensors with partial gradients."""

    def _qk_norm(self, x_BHND: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return super()._qk_norm(x_BHND, _partial_local(scale))


class TPReplicatedLinear(nn.Linear):
    """Linear with a replicated DTensor weight applied to rank-local tokens (the MoE router)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = _partial_local(self.bias) if self.bias is not None else None
        return nn.functional.linear(x, _partial_local(self.weight), bias)


def _replicate_params(module: nn.Module, mesh, names: tuple[str, ...]) -> None:
    for name in names:
        p = getattr(module, name)
        module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()]),
                                                     requires_grad=p.requires_grad))


def _moe_local_io(moe: nn.Module, mesh) -> None:
    """MoE sees the local sequence shard as a plain tensor and returns one wrapped as Shard(1)."""

    def pre(_mod, args):
        x = args[0]
        token_valid_BN = args[1] if len(args) > 1 else None
        if token_valid_BN is not None:
            # Validity comes for the whole sequence; the MoE sees this rank's Shard(1) slice
            # (DTensor shards by torch.chunk, so chunk the same way).
            token_valid_BN = torch.chunk(token_valid_BN, mesh.size(), dim=1)[mesh.get_local_rank()]
        return (x.to_local() if isinstance(x, DTensor) else x, token_valid_BN)

    def post(_mod, _args, out):
        y, record = out
        return DTensor.from_local(y, mesh, [Shard(1)], run_check=False), record

    moe.register_forward_pre_hook(pre)
    moe.register_forward_hook(post)


def _parallelize_block(block: TimeMoEBlock, mesh) -> None:
    parallelize_module(block, mesh, {
        "attention_norm": SequenceParallel(),
        # Inputs: (x, rope, attention mask); only x is a DTensor, gathered for full-sequence attention.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None), use_local_output=True),
        "attention.q_proj": ColwiseParallel(),
        "attention.k_proj": ColwiseParallel(),
        "attention.v_proj": ColwiseParallel(),
        "attention.gate_proj": ColwiseParallel(),
        "attention.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "moe_norm": SequenceParallel(),
    })
    attn = block.attention
    _replicate_params(attn, mesh, ("q_scale", "k_scale"))
    attn.__class__ = TPAttention
    router = block.moe.router
    _replicate_params(router, mesh, tuple(n for n, _ in router.named_parameters()))
    router.__class__ = TPReplicatedLinear
    _moe_local_io(block.moe, mesh)


def _embed_input_fn(mesh):
    def fn(_mod, inputs, _mesh):
        # Every tp rank holds the whole (replicated) batch; keep only this rank's positions.
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return (x.redistribute(mesh, [Shard(1)]),)
    return fn


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """TP + SP over ``tp_mesh`` on whatever part of TimerS1 ``model`` holds (pipeline parts too)."""
    if getattr(model, "embed", None) is not None:
        distribute_module(model.embed, tp_mesh, input_fn=_embed_input_fn(tp_mesh))
    if getattr(model, "norm", None) is not None:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
    if getattr(model, "head", None) is not None:
        # Non-leaf module: replicate all its weights; its input is already a Shard(1) DTensor.
        distribute_module(model.head, tp_mesh)
    for block in model.layers.values():
        _parallelize_block(block, tp_mesh)
    for stp in model.stp_blocks.values():
        assert isinstance(stp, TimeSTPBlock)
        parallelize_module(stp, tp_mesh, {
            "hidden_norm": SequenceParallel(),
            "embed_norm": SequenceParallel(),
            "projection": SequenceParallel(),
            "out_norm": SequenceParallel(),
        })
        _parallelize_block(stp.block, tp_mesh)
