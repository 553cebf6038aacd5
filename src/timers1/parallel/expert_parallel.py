"""Expert parallelism: a dropless all-to-all token dispatcher around the ``experts`` seam.

``MoE.forward`` hands ``self.experts(x_SD, tokens_per_expert_E)`` the routed slots already
grouped by (global) expert. Under EP the E experts are split into ep contiguous groups of
E_l = E / ep, one per EP rank; the expert weights become DTensors ``Shard(0)`` on the EP mesh
(so DCP saves and reshards them like any other parameter). The dispatcher runs in three phases,
Megatron-style, so a faster transport can replace one without touching the others:

  1. preprocess (one tiny collective): exchange per-expert counts with ``all_to_all_single``
     on a fixed-size int64 tensor [E] -> [ep, E_l] ("how many rows does each source send to
     each of my experts"). A fixed-size exchange works on every backend (gloo rejects uneven
     ``all_gather`` and tensor split sizes); the counts then become host lists (one sync).
  2. dispatch: ``all_to_all_single`` of the rows with list split sizes (dropless: whatever the
     router chose is sent). Rows arrive source-major ([src][local expert]); a gather regroups
     them expert-major, which is what the grouped GEMM wants.
  3. combine: the inverse regroup and the reverse all-to-all (split sizes swapped).

Both all-to-alls are autograd Functions whose backward is the opposite all-to-all, so the
gradient of a token's row returns to the rank that routed it. A rank that receives zero rows
still takes part in every collective (empty sends are legal) and computes zero gradients for
its experts, so FSDP's reduce-scatter stays matched across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from timers1.kernels import swiglu_experts
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


def all_to_all(x_SD: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_SD, output_splits, input_splits, group)


class DispatchPlan:
    """Phase 1 (preprocess): split sizes and the source-major -> expert-major regroup order."""

    def __init__(self, tokens_per_expert_E: torch.Tensor, ep: int, group):
        num_experts = tokens_per_expert_E.numel()
        local = num_experts // ep
        counts = tokens_per_expert_E.to(torch.int64).contiguous()
        recv = torch.empty_like(counts)
        # Fixed-size exchange: rank r sends counts[j*E_l:(j+1)*E_l] to rank j.
        dist.all_to_all_single(recv, counts, group=group)
        send_ES = counts.view(ep, local)
        recv_SE = recv.view(ep, local)  # [source rank, local expert]
        # One host sync: split sizes must be Python ints for all_to_all_single.
        self.input_splits: list[int] = send_ES.sum(1).tolist()
        self.output_splits: list[int] = recv_SE.sum(1).tolist()
        self.local_counts_E: torch.Tensor = recv_SE.sum(0)
        # Received rows are ordered (source, expert); the grouped GEMM wants (expert, source).
        # Build the gather index from the counts: the block (s, e) starts at start_SE[s, e].
        flat = recv_SE.reshape(-1)
        start_SE = (torch.cumsum(flat, 0) - flat).view(ep, local)
        order = start_SE.t().reshape(-1)  # blocks in (expert, source) order
        lengths = recv_SE.t().reshape(-1)
        total = int(flat.sum())
        if total:
            block_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=flat.device), lengths)
            row_start = torch.cumsum(lengths, 0) - lengths
            within = torch.arange(total, device=flat.device) - row_start[block_of_row]
            self.regroup_S = order[block_of_row] + within
        else:
            self.regroup_S = torch.zeros(0, dtype=torch.int64, device=flat.device)
        self.total = total


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _local(w: torch.Tensor, grad_factor: float) -> torch.Tensor:
    w = w.to_local() if isinstance(w, DTensor) else w
    return _ScaleGrad.apply(w, grad_factor) if grad_factor != 1.0 else w


class ExpertParallelGroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose forward dispatches rows to the EP rank owning their expert.

    Installed by ``apply_expert_parallel`` by re-classing the module in place, so parameter
    names (and DCP keys) are unchanged; the weights are DTensors Shard(0) on the EP mesh.
    """

    ep_group = None
    ep_size = 1
    grad_factor = 1.0

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        f = self.grad_factor
        if self.ep_size == 1:
            return swiglu_experts(x_SD, tokens_per_expert_E, _local(self.w_gate_EFD, f), _local(self.w_up_EFD, f),
                                  _local(self.w_down_EDF, f), backend=self.backend)
        plan = DispatchPlan(tokens_per_expert_E, self.ep_size, self.ep_group)
        recv_SD = all_to_all(x_SD, plan.output_splits, plan.input_splits, self.ep_group)
        grouped_SD = recv_SD.index_select(0, plan.regroup_S)
        y_SD = swiglu_experts(grouped_SD, plan.local_counts_E, _local(self.w_gate_EFD, f), _local(self.w_up_EFD, f),
                              _local(self.w_down_EDF, f), backend=self.backend)
        # Inverse regroup (expert-major -> source-major) by scattering rows back.
        back_SD = torch.empty_like(y_SD).index_copy(0, plan.regroup_S, y_SD)
        return all_to_all(back_SD, plan.input_splits, plan.output_splits, self.ep_group)


def apply_expert_parallel(model: nn.Module, ep_mesh, grad_factor: float = 1.0) -> None:
    """Shard every GroupedExperts' weights Shard(0) over ``ep_mesh`` (None: ep = 1) and install
    the dispatcher.

    ``grad_factor`` multiplies the expert weights' gradients. The expert FSDP mesh averages
    over its efsdp ranks, but the right reduction is a sum over the tp ranks (disjoint token
    shards) and a mean over dp: factor = efsdp * dp_replicate / dp = tp / ep. (FSDP's
    ``set_gradient_divide_factor`` would do the same with NCCL's PreMulSum, which gloo lacks;
    one code path for both backends is worth a multiply.)
    """
    for module in model.modules():
        if type(module) is GroupedExperts:
            if ep_mesh is not None:
                for name in EXPERT_PARAMS:
                    p = getattr(module, name)
                    module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]),
                                                                 requires_grad=p.requires_grad))
                module.ep_group = ep_mesh.get_group()
                module.ep_size = ep_mesh.size()
            module.__class__ = ExpertParallelGroupedExperts
            module.grad_factor = grad_factor
