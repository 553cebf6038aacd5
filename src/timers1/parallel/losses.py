"""Loss terms as the engine computes them: per-stage horizon losses and router losses.

Under pipeline parallelism no stage sees the whole model, so every term is computed on the
stage that owns its modules and its gradient is attached to that stage's activations with
``AttachLoss`` (Megatron's ``MoEAuxLossAutoScaler`` trick): the forward returns the
activation unchanged; the backward returns the activation's gradient plus a constant gradient
for the attached scalar. No stage needs a second output, and the pipeline schedules see one
loss (the last stage's) as usual.

Router losses are computed over the **global microbatch**: tokens-per-expert counts are
summed over every rank that holds other tokens of the same stage (dp x tp), so f_e is the
fraction over the whole microbatch, exactly as the single-process model computes it on the
concatenated batch. The probability term P_e is linear in the tokens, so each rank adds its
local share ``sum_t p_te / T_total``; its gradient is multiplied by dp because FSDP averages
gradients over the dp ranks (the tp ranks' shares are summed, by DTensor or the expert mesh).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from timers1.losses import (masked_mean, stp_weights, target_patches, valid_router_tokens,
                            weighted_quantile_loss)


class AttachLoss(torch.autograd.Function):
    """Identity on ``x``; in backward gives ``loss`` the gradient ``scale`` (a constant)."""

    @staticmethod
    def forward(ctx, x, loss, scale: float):
        ctx.scale = scale
        ctx.loss_shape = loss.shape
        ctx.loss_meta = (loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        dtype, device = ctx.loss_meta
        return grad_x, torch.full(ctx.loss_shape, ctx.scale, dtype=dtype, device=device), None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class StepContext:
    """Per-step state shared by every stage of this rank (targets, scales, the loss report)."""

    quantiles: list[float]
    num_horizons: int
    num_blocks: int
    patch_points: int
    context_points: int = 0
    stp_weighting: str = "uniform"
    min_prefix_fraction: float = 0.0
    wql_denominator: str = "abs_target"
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    dp: int = 1
    tp: int = 1
    batch_group: object = None
    batch_group_size: int = 1
    num_microbatches: int = 1
    grad_scale: float = 1.0
    targets: tuple = ()
    """(values_BW, mask_BW, mean_B1, scale_B1) of this rank's whole batch; stages pick rows."""
    report: torch.Tensor | None = None

    # report layout: [J horizon losses][num_blocks aux][num_blocks z]
    def reset(self, device) -> None:
        self.report = torch.zeros(self.num_horizons + 2 * self.num_blocks, dtype=torch.float64, device=device)

    def horizon_weight(self, j: int) -> float:
        if j == 0:
            return 1.0
        h = self.num_horizons - 1
        return stp_weights(h, self.stp_weighting)[j - 1] / h

    def horizon_loss(self, pred_BNQP: torch.Tensor, j: int, rows_B: torch.Tensor) -> torch.Tensor:
        """wQL of horizon j (0 = NTP) for the batch rows ``rows_B``, weighted as in ``timer_s1_loss``."""
        values_BW, mask_BW, mean_B1, scale_B1 = (t.index_select(0, rows_B) for t in self.targets)
        n = pred_BNQP.shape[1]
        target, tmask = target_patches(values_BW, mask_BW, self.patch_points, n, j + 1, self.min_prefix_fraction)
        pred = pred_BNQP.unsqueeze(1) * scale_B1.view(-1, 1, 1, 1, 1) + mean_B1.view(-1, 1, 1, 1, 1)
        q = torch.tensor(self.quantiles, device=pred.device)
        wql, valid = weighted_quantile_loss(pred, target[:, j:j + 1].to(pred.dtype), tmask[:, j:j + 1].to(pred.dtype),
                                            q, scale_B1.view(-1).to(pred.dtype), self.wql_denominator)
        loss = masked_mean(wql[:, 0], valid[:, 0])
        if not _in_backward():
            # Reported as the mean over dp (and the identical tp copies) and microbatches.
            self.report[j] += loss.detach().double() / (self.dp * self.tp * self.num_microbatches)
        return loss * self.horizon_weight(j)

    def router_hook(self, block_id: int):
        """Forward hook for an MoE module: attach its aux / z loss gradient to its output."""

        def hook(_module, _args, out):
            if self.aux_loss_coef == 0 and self.z_loss_coef == 0:
                return None
            y, record = out
            routing = record.routing
            # Fully padded tokens are not data (see timers1.losses.load_balancing_loss).
            probs_TE, experts_TK, logits_TE = valid_router_tokens(record)
            counts = torch.bincount(experts_TK.reshape(-1), minlength=probs_TE.shape[-1]).to(torch.float32)
            if self.batch_group_size > 1:
                counts = counts.clone()
                dist.all_reduce(counts, group=self.batch_group)
            top_k = routing.weights_TK.shape[-1]
            total_tokens = counts.sum() / top_k
            term = y.new_zeros((), dtype=torch.float32)
            if self.aux_loss_coef > 0:
                aux = probs_TE.shape[-1] * (counts / counts.sum() * probs_TE.sum(dim=0)).sum() / total_tokens
                term = term + self.aux_loss_coef * aux
                if not _in_backward():
                    self.report[self.num_horizons + block_id] += aux.detach().double() / self.num_microbatches
            if self.z_loss_coef > 0:
                lse = torch.logsumexp(logits_TE.float(), dim=-1)
                z = lse.pow(2).sum() / total_tokens
                term = term + self.z_loss_coef * z
                if not _in_backward():
                    self.report[self.num_horizons + self.num_blocks + block_id] += z.detach().double() / self.num_microbatches
            scale = self.grad_scale * self.dp / self.num_blocks
            return AttachLoss.apply(y, term, scale), record

        return hook
