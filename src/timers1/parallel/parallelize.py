"""``parallelize(model, dims, parallel_cfg)``: TP -> EP -> activation checkpointing -> compile -> FSDP.

The order is fixed (as in torchtitan) because each step consumes the previous one's output:
TP turns dense weights into DTensors on the tp mesh; EP turns expert weights into DTensors
Shard(0) on the ep mesh; checkpointing must wrap the blocks before FSDP registers its hooks
on them; compiled attention keeps its parameter names and runs inside FSDP's unsharded window
(torchtitan compiles before FSDP for the same reason); FSDP then shards whatever DTensor (or plain) parameter it finds along dp and
combines the meshes (FSDP x TP = 2-D, expert-FSDP x EP = 2-D, 3-D with HSDP).

FSDP groups (one all-gather / reduce-scatter each): every block's experts (on the expert mesh
``efsdp``; it spans the tp ranks, whose token shards must be *summed*, so the expert style
rescales the expert gradients by tp / ep to turn FSDP's average into sum-over-tp,
mean-over-dp), every block (attention, router, norms), and the root part (embedding, final
norm, head).

Works on a whole TimerS1 or on a pipeline stage of one (any module may be missing).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from timers1.parallel.dims import ParallelDims
from timers1.parallel.expert_parallel import apply_expert_parallel
from timers1.parallel.tensor_parallel import apply_tensor_parallel


def _blocks(model: nn.Module):
    """(MoE-carrying block, module to shard/checkpoint) for main and STP blocks."""
    for block in model.layers.values():
        yield block, block
    for stp in model.stp_blocks.values():
        yield stp.block, stp


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (composable API: parameter names do not change).

    Inside a recomputed block the EP all-to-alls run again; every rank recomputes the same
    blocks in the same order, so collectives stay matched. (Router losses and expert-load counts
    are taken from the block's outputs, outside the recomputed region: they run once.)
    """
    from torch.distributed._composable import checkpoint

    for _, module in _blocks(model):
        checkpoint(module)


def apply_compile(model: nn.Module) -> None:
    """torch.compile every TimeMoE block's attention half (``train.compile``).

    ``TimeMoEBlock.attend`` (two RMSNorms, RoPE, QK-norm, the sigmoid gate and a residual add
    around five small GEMMs) is dozens of elementwise passes over [B, N, D] each way, which
    inductor fuses into a few loops; the MoE half already runs as hand-written kernels (and its
    per-expert split sizes would break the graph). Blocks of one class share compiled graphs
    (their parameters are graph inputs); under FSDP the main blocks' class is FSDP's subclass and
    the STP blocks' inner ones stay plain, so each set of variants (train/eval, padded or not,
    two sequence lengths) exists twice, which the raised recompile limit leaves room for.

    The compiled function is an instance attribute bound to its block: a deepcopy of a compiled
    model would run the original's weights, so copies (pipeline stages) are made before this.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    from timers1.model.block import TimeMoEBlock

    for module in model.modules():
        if isinstance(module, TimeMoEBlock):
            module.attend = torch.compile(module.attend)


def apply_fsdp(model: nn.Module, dims: ParallelDims, param_dtype: torch.dtype | None, reshard_after_forward: bool) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh, expert_mesh = dims.mesh("dp"), dims.mesh("efsdp")
    for moe_block, module in _blocks(model):
        experts = moe_block.moe.experts
        fully_shard(experts, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # Root: embedding, final norm and head; kept unsharded after forward (used again at once).
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize(model: nn.Module, dims: ParallelDims, parallel_cfg, param_dtype: torch.dtype | None = None,
                compile_attention: bool = False) -> nn.Module:
    """Apply TP, EP, activation checkpointing, compile and FSDP/HSDP in place; returns ``model``.

    One process (world size 1) gets activation checkpointing at most: its parameters stay plain
    tensors. Otherwise ``dims.build_meshes`` must have run and FSDP is always applied (a size-1
    dp mesh is cheap): it makes every parameter a DTensor, which is what DCP state dicts and
    resharding need, and it is where partial gradients (sequence-parallel and router weights)
    get reduced.
    """
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh("tp"))
    if dims.ep > 1 or dims.tp > 1:
        apply_expert_parallel(model, dims.mesh("ep"), grad_factor=dims.tp / dims.ep)
    if parallel_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_attention:
        apply_compile(model)
    if dims.world_size > 1:
        # With PP each microbatch would re-gather the weights; keep them gathered for the step.
        apply_fsdp(model, dims, param_dtype, reshard_after_forward=dims.pp == 1)
    return model
