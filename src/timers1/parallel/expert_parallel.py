"""Expert parallelism: a dropless all-to-all token dispatcher, applied to the ``experts`` seam as a style.

``MoE.forward`` hands ``self.experts(x_SD, tokens_per_expert_E)`` the routed slots already
grouped by (global) expert. ``ExpertParallel`` splits the E experts into ep contiguous groups
of G = E / ep, one per EP rank: its partition turns the expert weights into DTensors
``Shard(0)`` on the EP mesh (so DCP saves and reshards them like any other parameter), its
input hook dispatches the rows to the ranks owning their experts and its output hook combines
the results back; ``GroupedExperts.forward`` in between runs unchanged on the local rows.
The dispatcher has three phases, Megatron-style, each a function of its own, so a faster
transport can replace one without touching the others:

  1. ``plan_dispatch`` (preprocess, one tiny collective): exchange per-expert counts with
     ``all_to_all_single`` on a fixed-size int64 tensor [E] -> [R, G] ("how many rows does each
     source rank send to each of my experts"). A fixed-size exchange works on every backend
     (gloo rejects uneven ``all_gather`` and tensor split sizes); the counts then become host
     lists (one sync).
  2. ``dispatch``: ``all_to_all_single`` of the rows with list split sizes (dropless: whatever
     the router chose is sent). Rows arrive source-major ([source rank][local expert]); a gather
     regroups them expert-major, which is what the grouped GEMM wants.
  3. ``combine``: the inverse regroup and the reverse all-to-all (split sizes swapped).

Both all-to-alls are autograd Functions whose backward is the opposite all-to-all, so the
gradient of a row returns to the rank that routed it. A rank that receives zero rows still
takes part in every collective (empty sends are legal) and computes zero gradients for its
experts, so FSDP's reduce-scatter stays matched across ranks.

Shape letters here: R EP ranks, G experts per EP rank (E = R * G), S rows, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from timers1.model.moe import GroupedExperts

EXPERT_PARAMS = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with list split sizes; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x_SD, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x_SD.new_empty((sum(output_splits),) + tuple(x_SD.shape[1:]))
        dist.all_to_all_single(out, x_SD.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


@dataclass
class DispatchPlan:
    """Split sizes and regroup order of one MoE call (``plan_dispatch``)."""

    input_splits: list[int]
    """Rows this rank sends to each EP rank."""
    output_splits: list[int]
    """Rows this rank receives from each EP rank."""
    tokens_per_expert_G: torch.Tensor
    """Rows per local expert after the dispatch."""
    regroup_S: torch.Tensor
    """Position, in the received (source-major) rows, of each expert-major row."""


def plan_dispatch(tokens_per_expert_E: torch.Tensor, group) -> DispatchPlan:
    """Phase 1: exchange the per-expert counts and derive split sizes and the regroup order."""
    ranks = dist.get_world_size(group)
    sent_RG = tokens_per_expert_E.to(torch.int64).contiguous().view(ranks, -1)  # [destination rank, its expert]
    recv_RG = torch.empty_like(sent_RG)  # [source rank, my expert]
    dist.all_to_all_single(recv_RG.view(-1), sent_RG.view(-1), group=group)
    # One host sync: split sizes must be Python ints for all_to_all_single.
    input_splits, output_splits = sent_RG.sum(1).tolist(), recv_RG.sum(1).tolist()
    # Received rows are ordered (source, expert); the grouped GEMM wants (expert, source).
    # Block (r, g) starts at start_RG[r, g]; list the blocks expert-major and expand to rows.
    flat = recv_RG.reshape(-1)
    start_RG = (torch.cumsum(flat, 0) - flat).view_as(recv_RG)
    block_start, block_rows = start_RG.t().reshape(-1), recv_RG.t().reshape(-1)
    total = sum(output_splits)
    block_of_row = torch.repeat_interleave(torch.arange(block_rows.numel(), device=flat.device), block_rows)
    row_in_block = torch.arange(total, device=flat.device) - (torch.cumsum(block_rows, 0) - block_rows)[block_of_row]
    return DispatchPlan(input_splits, output_splits, recv_RG.sum(0), block_start[block_of_row] + row_in_block)


def dispatch(x_SD: torch.Tensor, plan: DispatchPlan, group) -> torch.Tensor:
    """Phase 2: send each row to the rank owning its expert; rows come back grouped expert-major."""
    recv_SD = _AllToAll.apply(x_SD, plan.output_splits, plan.input_splits, group)
    return recv_SD.index_select(0, plan.regroup_S)


def combine(y_SD: torch.Tensor, plan: DispatchPlan, group) -> torch.Tensor:
    """Phase 3: undo the regroup and send every row back to the rank that routed it."""
    source_major_SD = torch.empty_like(y_SD).index_copy(0, plan.regroup_S, y_SD)
    return _AllToAll.apply(source_major_SD, plan.input_splits, plan.output_splits, group)


class ExpertParallel(ParallelStyle):
    """Shard a ``GroupedExperts`` over an EP mesh; dispatch as its input hook, combine as its output hook.

    ``grad_factor`` multiplies the expert weights' gradients (and nothing else: the rows'
    gradient is scaled by it on the way into the experts and by its inverse on the way out).
    The expert FSDP mesh averages over its efsdp ranks, but the right reduction is a sum over
    the tp ranks (disjoint token shards) and a mean over dp: factor = efsdp * dp_replicate / dp
    = tp / ep. (FSDP's ``set_gradient_divide_factor`` would do the same with NCCL's PreMulSum,
    which gloo lacks; one code path for both backends is worth a multiply.) On a mesh of one
    rank (tp > 1 without ep) nothing is sharded or sent; only the factor applies.
    """

    def __init__(self, grad_factor: float = 1.0):
        super().__init__()
        self.grad_factor = grad_factor
        self._plan: DispatchPlan | None = None  # from this module's dispatch to its combine

    def _partition(self, _name: str, module: nn.Module, mesh) -> None:
        for name in EXPERT_PARAMS:
            p = getattr(module, name, None)
            if p is not None:
                module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)]),
                                                             requires_grad=p.requires_grad))

    def _dispatch(self, _module, inputs, mesh):
        x_SD, tokens_per_expert_E = inputs
        if self.grad_factor != 1.0:
            x_SD = _ScaleGrad.apply(x_SD, 1.0 / self.grad_factor)
        if mesh.size() == 1:
            return x_SD, tokens_per_expert_E
        group = mesh.get_group()
        self._plan = plan_dispatch(tokens_per_expert_E, group)
        return dispatch(x_SD, self._plan, group), self._plan.tokens_per_expert_G

    def _combine(self, _module, y_SD, mesh):
        if self.grad_factor != 1.0:
            y_SD = _ScaleGrad.apply(y_SD, self.grad_factor)
        if mesh.size() == 1:
            # A fresh tensor, not _ScaleGrad's view: FSDP hooks the module's output for its
            # backward, and an in-place op on a view would drop that hook.
            return y_SD.clone() if self.grad_factor != 1.0 else y_SD
        y_SD = combine(y_SD, self._plan, mesh.get_group())
        self._plan = None
        return y_SD

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, GroupedExperts):
            raise TypeError(f"ExpertParallel applies to GroupedExperts, not {type(module).__name__}")
        if device_mesh.size() > 1:
            return distribute_module(module, device_mesh, self._partition, self._dispatch, self._combine)
        # One EP rank: the weights stay plain tensors (distribute_module would make them
        # replicated DTensors); only the gradient factor is hooked on.
        module.register_forward_pre_hook(lambda m, inputs: self._dispatch(m, inputs, device_mesh))
        module.register_forward_hook(lambda m, _inputs, out: self._combine(m, out, device_mesh))
        return module


def apply_expert_parallel(model: nn.Module, ep_mesh, grad_factor: float = 1.0) -> None:
    """``ExpertParallel`` on every ``GroupedExperts`` of ``model`` (one style instance each)."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            ExpertParallel(grad_factor)._apply(module, ep_mesh)
