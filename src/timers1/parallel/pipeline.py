"""Pipeline parallelism: split Timer-S1 into stages and run them with torch.distributed.pipelining.

The model is a chain of **units**: the L main blocks (the last one followed by the final norm
and the NTP prediction) and then the H STP blocks (each followed by a prediction). The patch
embedding goes with the first unit. Units are split into ``pp * v`` contiguous stages by
block count (v = 2 stages per rank for interleaved 1F1B, placed round-robin: stage s lives on
pp rank s % pp, as torch's interleaved schedule expects).

What travels between stages is ``(h, h0, rows)``: the hidden state, the patch embeddings h0,
which every STP block consumes (they are not recomputed: the embedding lives on stage 0 and
its gradient must flow back there), and the int64 batch-row ids of the microbatch (no
gradient; they tell each stage which targets to score). Under TP h and h0 are the local
sequence shards, so a stage boundary moves 1/tp of the activation. h0 is dropped when the
model has no STP blocks.

Each stage computes the loss terms of the horizons it predicts (the engine gives every rank
the targets of its whole batch; the stage picks its microbatch's rows) and attaches their gradient to its
output with ``AttachLoss``; the last stage returns its own terms as the pipeline loss. The
quantile head is shared by every predicting block, so every stage keeps a copy; the engine
sums the copies' gradients over stages (``tie_head_grads``), as Megatron does for tied
embeddings, so all copies stay identical.

A stage is the model itself with the modules it does not own removed (``None`` or deleted
from the ModuleDicts), re-classed to ``TimerS1Stage``: parameter names stay those of the full
model, so DCP checkpoints reshard across pipeline layouts.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from timers1.model.timer_s1 import TimerS1, padding_masks
from timers1.parallel.losses import AttachLoss, StepContext


def split_units(num_layers: int, num_stp: int, num_stages: int) -> list[list[tuple[str, str]]]:
    """Contiguous, balanced-by-count split of the L + H blocks into ``num_stages`` stages."""
    units = [("main", str(i)) for i in range(num_layers)] + [("stp", str(j)) for j in range(num_stp)]
    base, extra = divmod(len(units), num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(units[start:start + n])
        start += n
    return out


class TimerS1Stage(TimerS1):
    """A TimerS1 that owns only some units; ``forward`` is the stage computation."""

    def configure_stage(self, units, is_first: bool, is_last: bool, carry_h0: bool, ctx: StepContext, tp_mesh) -> None:
        self.stage_units = list(units)
        self.is_first_stage, self.is_last_stage, self.carry_h0 = is_first, is_last, carry_h0
        self.step_ctx = ctx
        self.tp_mesh = tp_mesh
        self.last_main = str(self.model_cfg.num_layers - 1)

    def _to_dtensor(self, x):
        if self.tp_mesh is None or isinstance(x, DTensor):
            return x
        return DTensor.from_local(x, self.tp_mesh, [Shard(1)], run_check=False)

    @staticmethod
    def _to_local(x):
        return x.to_local() if isinstance(x, DTensor) else x

    def _predict(self, h, j: int, rows_B: torch.Tensor) -> torch.Tensor:
        pred = self.head_quantiles(h)
        if isinstance(pred, DTensor):
            # Each tp rank computes the (cheap) loss on the gathered predictions; the backward
            # of full_tensor hands every rank the gradient of its own positions only.
            pred = pred.full_tensor()
        return self.step_ctx.horizon_loss(pred, j, rows_B)

    def forward(self, *args):
        """First stage: (values_BL, mask_BL, rows_B); others: (h, [h0,] rows_B).

        Returns (h, [h0,] rows_B), or on the last stage the scalar loss of its horizons.
        """
        ctx = self.step_ctx
        mb = args[-1]
        if self.is_first_stage:
            values_BL, mask_BL = args[:2]
            h0 = self.embed_patches(values_BL, mask_BL)
            h = h0
        else:
            h = self._to_dtensor(args[0])
            h0 = self._to_dtensor(args[1]) if self.carry_h0 else None
        # Padding masks for this microbatch, for the whole sequence (attention sees all of it).
        context_mask_BL = ctx.targets[1].index_select(0, mb)[:, : ctx.context_points]
        attn_mask, token_valid = padding_masks(context_mask_BL, self.model_cfg.patch_points)
        rope = self.rope(context_mask_BL.shape[1] // self.model_cfg.patch_points, h)
        loss = None
        for kind, name in self.stage_units:
            if kind == "main":
                h, _ = self.layers[name](h, rope, attn_mask, token_valid)
                if name == self.last_main:
                    h = self.norm(h)
                    term = self._predict(h, 0, mb)
                    loss = term if loss is None else loss + term
            else:
                h, _ = self.stp_blocks[name](h, h0, rope, attn_mask, token_valid)
                term = self._predict(h, int(name) + 1, mb)
                loss = term if loss is None else loss + term
        if self.is_last_stage:
            # Shape [1], not a scalar: the schedule concatenates the microbatches' outputs.
            return (loss * ctx.grad_scale).reshape(1)
        h_local = self._to_local(h)
        if loss is not None:
            h_local = AttachLoss.apply(h_local, loss, ctx.grad_scale)
        if not self.carry_h0:
            return h_local, mb
        # view_as: a fresh autograd node even when this stage passes h0 through untouched.
        return h_local, self._to_local(h0).view_as(self._to_local(h0)), mb


def make_stage(model: TimerS1, units, num_layers: int, copy_model: bool) -> TimerS1Stage:
    """The model (or a deep copy) with every unit not in ``units`` removed, re-classed."""
    part = copy.deepcopy(model) if copy_model else model
    owned_main = {n for k, n in units if k == "main"}
    owned_stp = {n for k, n in units if k == "stp"}
    if ("main", "0") not in units:
        part.embed = None
    if ("main", str(num_layers - 1)) not in units:
        part.norm = None
    for name in list(part.layers.keys()):
        if name not in owned_main:
            del part.layers[name]
    for name in list(part.stp_blocks.keys()):
        if name not in owned_stp:
            del part.stp_blocks[name]
    part.__class__ = TimerS1Stage
    return part


def build_schedule(stages_modules: list[nn.Module], stage_ids: list[int], num_stages: int, device, pp_group,
                   schedule: str, num_microbatches: int, act_shape: tuple[int, int, int], input_shape: tuple[int, int]):
    """PipelineStage objects for this rank's stages and the 1F1B / interleaved 1F1B schedule.

    Shapes are given statically (``act_shape`` = local [b, n, D] of h per microbatch,
    ``input_shape`` = [b, L] of the first stage's inputs): dynamic inference would run an extra
    forward, i.e. extra MoE collectives and loss terms, on the first step.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    def acts(carry_h0: bool):
        # requires_grad on the examples: it is how static metadata says "a gradient comes back".
        h = torch.empty(act_shape, device=device, requires_grad=True)
        rows = torch.empty(act_shape[0], dtype=torch.int64, device=device)
        return (h, torch.empty_like(h).requires_grad_(), rows) if carry_h0 else (h, rows)

    stages = []
    for m, s in zip(stages_modules, stage_ids):
        if s == 0:
            inputs = (torch.empty(input_shape, device=device), torch.empty(input_shape, device=device),
                      torch.empty(input_shape[0], dtype=torch.int64, device=device))
        else:
            inputs = acts(m.carry_h0)
        outputs = torch.empty(1, device=device, requires_grad=True) if s == num_stages - 1 else acts(m.carry_h0)
        stages.append(PipelineStage(m, s, num_stages, device, input_args=inputs, output_args=outputs, group=pp_group))

    def loss_fn(output, _target):
        return output.sum()  # the last stage already returns its (scaled) loss, shape [1]

    if schedule == "1f1b":
        return Schedule1F1B(stages[0], num_microbatches, loss_fn=loss_fn), stages
    return ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=loss_fn), stages
