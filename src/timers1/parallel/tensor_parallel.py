"""Tensor + sequence parallelism in Megatron's layout, through DTensor plans.

Between blocks the hidden state is a DTensor ``Shard(1)`` (sequence parallel): every
per-position module (patch embedding, RMSNorms, STP input projection, quantile head) runs on
its own slice of positions with **replicated** weights, so nothing is computed twice and the
weights' gradients come out as partial sums that DTensor (via FSDP's redistribute) all-reduces.
Attention needs the whole sequence:

    Shard(1) --all-gather--> q/k/v/gate (column-parallel: each rank owns num_heads/tp heads)
             --> local RoPE, QK-norm, SDPA, gate --> o (row-parallel) --reduce-scatter--> Shard(1)

The ``Attention`` module reads the head count from the local weight width, so it runs on the
local shard unchanged. Its QK-norms are per head dim and shared by all heads: they get the
sequence-parallel style on the heads dim (input ``Shard(1)`` of [B, H, N, Dh], replicated weight),
so DTensor sums the weight's per-head partial gradients.

The MoE runs on the local tokens of the sequence shard (no gather): routing is per token, and
expert parallelism (if any) moves rows between ranks anyway. ``MoELocalTokens`` hooks that onto
the MoE module; the router weight is replicated with the sequence-parallel style on the token
dim (partial gradients summed over tp), and the experts' gradients are summed over tp by the
expert FSDP mesh, which spans the tp ranks (see dims.py and ``ExpertParallel``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from timers1.model.block import TimeMoEBlock


class MoELocalTokens(ParallelStyle):
    """The MoE sees this rank's sequence shard as plain local tokens and returns it as ``Shard(1)``.

    Plain module hooks, not ``distribute_module``: that would also replicate the experts, which
    expert parallelism and the expert FSDP mesh own.
    """

    def _local_inputs(self, _module, args, mesh):
        x = args[0]
        token_valid_BN = args[1] if len(args) > 1 else None
        if token_valid_BN is not None:
            # Validity comes for the whole sequence; the MoE sees this rank's Shard(1) slice
            # (DTensor shards by torch.chunk, so chunk the same way).
            token_valid_BN = torch.chunk(token_valid_BN, mesh.size(), dim=1)[mesh.get_local_rank()]
        return (x.to_local() if isinstance(x, DTensor) else x, token_valid_BN)

    def _sharded_output(self, _module, out, mesh):
        y, record = out
        return DTensor.from_local(y, mesh, [Shard(1)], run_check=False), record

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.register_forward_pre_hook(lambda m, args: self._local_inputs(m, args, device_mesh))
        module.register_forward_hook(lambda m, _args, out: self._sharded_output(m, out, device_mesh))
        return module


class RouterOnLocalTokens(SequenceParallel):
    """The router's replicated weight applied to this rank's tokens [T, D] (tokens on dim 0).

    Its logits leave the MoE inside the router record, i.e. in the output of an FSDP-wrapped
    block, which FSDP hooks for its backward: they must be a fresh tensor, not the view that
    ``to_local`` returns (the copy is [T, E], small).
    """

    def __init__(self):
        super().__init__(sequence_dim=0, use_local_output=True)

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.to_local().clone()


def _parallelize_block(block: TimeMoEBlock, mesh) -> None:
    parallelize_module(block, mesh, {
        "attention_norm": SequenceParallel(),
        # Inputs: (x, rope, attention mask); only x is a DTensor, gathered for full-sequence attention.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None), use_local_output=False),
        "attention.q_proj": ColwiseParallel(),
        "attention.k_proj": ColwiseParallel(),
        "attention.v_proj": ColwiseParallel(),
        "attention.gate_proj": ColwiseParallel(),
        # Heads are local after the column-parallel projections: dim 1 of [B, H, N, Dh].
        "attention.q_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
        "attention.k_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
        "attention.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "moe_norm": SequenceParallel(),
        "moe": MoELocalTokens(),
        "moe.router": RouterOnLocalTokens(),
    })


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
        parallelize_module(stp, tp_mesh, {
            "hidden_norm": SequenceParallel(),
            "embed_norm": SequenceParallel(),
            "projection": SequenceParallel(),
            "out_norm": SequenceParallel(),
        })
        _parallelize_block(stp.block, tp_mesh)
