"""Pipeline parallelism: split Timer-S1 into stages and run them with torch.distributed.pipelining.

The model is a chain of **units**: the L main blocks (the last one followed by the final norm
and the NTP prediction) and then the H STP blocks (each followed by a prediction). The patch
embedding goes with the first unit. Units are split into ``pp * v`` contiguous stages by
block count (v = 2 stages per rank for interleaved 1F1B, placed round-robin: stage s lives on
pp rank s % pp, as torch's interleaved schedule expects).

What travels between stages is ``(h, h0, values_BW, mask_BW)``: the hidden state, the patch
embeddings h0, which every STP block consumes (they are not recomputed: the embedding lives on
stage 0 and its gradient must flow back there), and the microbatch's raw windows (no gradient;
every stage scores the horizons it predicts against them, and takes its padding masks from
them; they are 1/(D/P) of h's size). Under TP h and h0 are the local sequence shards, so a
stage boundary moves 1/tp of the activation. h0 is dropped when the model has no STP blocks.
What a stage does with them, and how its loss terms reach the backward, is the engine's
(``timers1.parallel.engine``): the same stage hooks run the single stage of an unpipelined
layout.

A stage is the model itself with the modules it does not own removed (``None`` or deleted
from the ModuleDicts; ``TimerS1.forward`` runs whatever is left): parameter names stay those
of the full model, so DCP checkpoints reshard across pipeline layouts. The quantile head is
shared by every predicting block, so every stage keeps a copy; the engine sums the copies'
gradients over stages, as Megatron does for tied embeddings, so all copies stay identical.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from timers1.model.timer_s1 import TimerS1


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


def make_stage(model: TimerS1, units, num_layers: int, copy_model: bool) -> TimerS1:
    """The model (or a deep copy) with every unit not in ``units`` removed."""
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
    return part


def build_schedule(stages_modules: list[nn.Module], stage_ids: list[int], num_stages: int, device, pp_group,
                   schedule: str, num_microbatches: int, act_shape: tuple[int, int, int], window_shape: tuple[int, int],
                   carry_h0: bool):
    """PipelineStage objects for this rank's stages and the 1F1B / interleaved 1F1B schedule.

    Shapes are given statically (``act_shape`` = local [b, n, D] of h per microbatch,
    ``window_shape`` = [b, W] of the raw windows): dynamic inference would run an extra
    forward, i.e. extra MoE collectives and loss terms, on the first step.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    def window():
        return torch.empty(window_shape, device=device), torch.empty(window_shape, device=device)

    def boundary():
        # requires_grad on the examples: it is how static metadata says "a gradient comes back".
        h = torch.empty(act_shape, device=device, requires_grad=True)
        return ((h, torch.empty_like(h).requires_grad_()) if carry_h0 else (h,)) + window()

    stages = []
    for module, s in zip(stages_modules, stage_ids):
        inputs = window() if s == 0 else boundary()
        outputs = torch.empty(1, device=device, requires_grad=True) if s == num_stages - 1 else boundary()
        stages.append(PipelineStage(module, s, num_stages, device, input_args=inputs, output_args=outputs,
                                    group=pp_group))

    def loss_fn(output, _target):
        return output.sum()  # the last stage already returns its (scaled) loss, shape [1]

    if schedule == "1f1b":
        return Schedule1F1B(stages[0], num_microbatches, loss_fn=loss_fn)
    return ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=loss_fn)
