"""The training engine: one class drives forward + backward of a step for every layout.

    engine = build_engine(model, cfg, world_size, device)   # split (PP) -> TP -> EP -> AC -> FSDP
    result = engine.forward_backward(values_BW, mask_BW, grad_scale=1 / grad_accum)  # StepResult
    result = engine.forward_only(values_BW, mask_BW)   # forecast-protocol losses, eval mode, no gradients
    grad_norm = engine.clip_grad_norm(max_norm)
    engine.model_parts                                       # for the optimizer and DCP

One process is the 1x1x1x1 layout of the same engine: nothing is split or sharded, no
collective runs, and the step is the same code. The model never computes a loss: every model
part gets two stage hooks (``_StageHooks``) that turn it into one stage of the step. The input
hook receives the raw windows (or, past the first pipeline stage, the hidden states plus the
windows) and hands the model its arguments; the output hook scores what the part predicted with
the one loss function (``timers1.losses.stage_loss``), and returns the loss (last stage) or the
tensors the next stage needs, with this stage's loss terms attached to them (``AttachLoss``).
Without PP the engine calls the single part and runs backward on its loss; with PP the
torch.distributed.pipelining schedule does both, microbatch by microbatch.

bf16 autocast (``train.precision``), gradient-norm clipping and expert-load counting live here,
once. Losses come back identical on every rank: the mean over dp ranks and microbatches of the
per-batch loss, router losses over the global microbatch (``timers1.losses`` explains the
shares each rank contributes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from timers1.config import Config
from timers1.losses import LossConfig, LossParts, LossShare, normalize_window, stage_loss
from timers1.model.timer_s1 import TimerS1, init_weights
from timers1.parallel.dims import LayoutError, ParallelDims
from timers1.parallel.parallelize import parallelize
from timers1.parallel.pipeline import build_schedule, make_stage, split_units


@dataclass
class StepResult:
    loss_floats: dict[str, float]
    """Loss parts of this call (unscaled), identical on every rank."""
    tokens_per_expert_LE: torch.Tensor
    """Routed slots per expert for every MoE block (int64, [L + H, E]) on this rank."""


class AttachLoss(torch.autograd.Function):
    """Identity on ``x``; in backward gives ``loss`` the gradient 1.

    Megatron's ``MoEAuxLossAutoScaler`` trick: a pipeline stage that is not the last one sends
    only activations, so the gradient of its own loss terms rides on the activations' backward.
    """

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        # A copy, not a view: FSDP hooks the stage's outputs for its backward, and a view's
        # hook is lost under any in-place op (the copy is one activation per stage boundary).
        return x.clone()

    @staticmethod
    def backward(ctx, grad_x):
        shape, dtype, device = ctx.loss_meta
        return grad_x, torch.ones(shape, dtype=dtype, device=device)


@functools.cache
def _cpu_compiler_missing() -> bool:
    """The C++ compiler inductor will call for CPU kernels ($CXX, else g++; clang++ on macOS) is not
    on PATH (warned once per process)."""
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    missing = shutil.which(compiler) is None
    if missing:
        warnings.warn(f"train.compile: no C++ compiler {compiler!r} on PATH for torch.compile's CPU kernels "
                      f"(it uses $CXX, else {compiler}); training runs eager (install it, e.g. apt install g++, "
                      f"for faster steps)")
    return missing


def uses_compile(cfg: Config, device: torch.device) -> bool:
    """``train.compile``, unless inductor could not build its CPU kernels here (no C++ compiler):
    then eager steps with a warning, the same numbers a few percent slower, rather than a failure
    at the first step of a run a user started on a bare machine."""
    return cfg.train.compile and not (device.type == "cpu" and _cpu_compiler_missing())


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """bf16 compute: asked for, or 'auto' on a GPU."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def _local(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.to_local() if isinstance(x, DTensor) else x


class _StageHooks:
    """Forward hooks that make one model part one stage of the step (see the module docstring)."""

    def __init__(self, engine: "Engine", is_first: bool, is_last: bool):
        self.engine, self.is_first, self.is_last = engine, is_first, is_last
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None  # from the input hook to the output hook

    def model_inputs(self, _part, args):
        """(values_BW, mask_BW) or (h, [h0,] values_BW, mask_BW) -> the model's (x, mask_BL, h0)."""
        *activations, values_BW, mask_BW = args
        self._window = (values_BW, mask_BW)
        context = self.engine.loss_cfg.context_points
        context_mask = mask_BW[:, :context]
        if self.is_first:
            cfg = self.engine.loss_cfg
            window = normalize_window(values_BW, mask_BW, context, cfg.patch_points, cfg.norm_prefix_min_fraction)
            return window.context_BL, context_mask
        h, h0 = (activations + [None])[:2]
        return self.engine.sequence_sharded(h), context_mask, self.engine.sequence_sharded(h0)

    def stage_outputs(self, _part, _args, out):
        """Score the part's predictions and routing; return its loss or what the next stage needs."""
        engine = self.engine
        values_BW, mask_BW = self._window
        self._window = None
        # Under TP each rank scores the gathered predictions (cheap); the backward of
        # full_tensor hands every rank the gradient of its own positions only.
        out = replace(out, predictions=[p.full_tensor() if isinstance(p, DTensor) else p for p in out.predictions])
        objective, report = stage_loss(out, values_BW, mask_BW, engine.loss_cfg, engine.share)
        engine.report += report
        for block_id, record in zip(out.block_ids, out.router_records):
            engine.tokens_per_expert_LE[block_id] += record.routing.tokens_per_expert_E.detach()
        if self.is_last:
            # [1]: the pipeline schedule concatenates microbatches (a copy: see AttachLoss).
            return objective.reshape(1).clone()
        h = AttachLoss.apply(_local(out.h_BND), objective)
        if out.h0_BND is None:
            return h, values_BW, mask_BW
        # A fresh tensor even when this stage passes h0 through untouched (see AttachLoss).
        return h, _local(out.h0_BND).clone(), values_BW, mask_BW


class Engine:
    """Forward + backward of one batch over whatever layout ``dims`` describes (1x1x1x1 included)."""

    def __init__(self, model_parts: list[nn.Module], stage_ids: list[int], num_stages: int, dims: ParallelDims,
                 cfg: Config, device: torch.device):
        self.model_parts = model_parts
        self.dims = dims
        self.cfg = cfg
        self.device = device
        self.dp_rank, self.dp_size = dims.dp_rank, dims.dp
        self.loss_cfg = replace(LossConfig.from_config(cfg), compile=uses_compile(cfg, device))
        batch_mesh = dims.mesh("batch") if dims.world_size > 1 else None
        self.share = LossShare(dp=dims.dp, tp=dims.tp, sum_over_batch_ranks=(
            self._sum_over(batch_mesh.get_group()) if batch_mesh is not None and batch_mesh.size() > 1 else None))
        self._tp_mesh = dims.mesh("tp") if dims.tp > 1 else None
        self._pp_group = dims.mesh("pp").get_group() if dims.pp > 1 else None
        self._stage_ids, self._num_stages = stage_ids, num_stages
        self._schedules: dict = {}
        self.report = torch.zeros(self.loss_cfg.report_size, dtype=torch.float64, device=device)
        self.tokens_per_expert_LE = torch.zeros(self.loss_cfg.num_blocks, cfg.moe.num_experts, dtype=torch.int64,
                                                device=device)
        # The router softmax and every kernel accumulate in fp32 inside.
        self._autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device)
                          else contextlib.nullcontext())
        for part, sid in zip(model_parts, stage_ids):
            hooks = _StageHooks(self, sid == 0, sid == num_stages - 1)
            # prepend: before FSDP's root hooks, so FSDP casts the model's inputs (not the raw
            # windows the loss needs) and registers its backward hooks on the tensors we return.
            part.register_forward_pre_hook(hooks.model_inputs, prepend=True)
            part.register_forward_hook(hooks.stage_outputs, prepend=True)
        # The head is copied into every pipeline stage: its gradient counts once in the norm,
        # on pp rank 0's first part.
        keep_head = self._pp_group is None or dims.mesh("pp").get_local_rank() == 0
        self._norm_skip = [set() if (i == 0 and keep_head) else {n for n, _ in part.named_parameters()
                                                                  if n.startswith("head.")}
                           for i, part in enumerate(model_parts)]

    @staticmethod
    def _sum_over(group):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            dist.all_reduce(x, group=group)
            return x
        return reduce

    def sequence_sharded(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A received local activation as the ``Shard(1)`` DTensor it is under sequence parallelism."""
        if self._tp_mesh is None or x is None or isinstance(x, DTensor):
            return x
        return DTensor.from_local(x, self._tp_mesh, [Shard(1)], run_check=False)

    # ------------------------------------------------------------------------------ step
    def forward_backward(self, values_BW: torch.Tensor, mask_BW: torch.Tensor, grad_scale: float = 1.0) -> StepResult:
        """Accumulate into ``.grad`` the gradient of ``grad_scale * loss`` of this rank's batch.

        ``values_BW``/``mask_BW``: this rank's data shard (rank ``dp_rank`` of dp; every tp and
        pp rank of a dp group gets the same batch); the first ``data.context_points`` points are
        the input, the rest the targets. Gradients are reduced (FSDP) when this returns.
        """
        return self._run(values_BW, mask_BW, grad_scale, backward=True)

    def forward_only(self, values_BW: torch.Tensor, mask_BW: torch.Tensor) -> StepResult:
        """The loss parts of this rank's batch in eval mode (no dropout), without gradients, scored
        as a forecast is made: each window normalised over its whole context, only its last
        position scored (``timers1.losses``: the training option's prefixes do not apply here).
        Collective like ``forward_backward``: every rank of the layout calls it the same number
        of times."""
        training_cfg = self.loss_cfg
        self.loss_cfg = replace(training_cfg, norm_prefix_min_fraction=1.0)
        try:
            with torch.no_grad():
                return self._run(values_BW, mask_BW, 1.0, backward=False)
        finally:
            self.loss_cfg = training_cfg

    def _run(self, values_BW: torch.Tensor, mask_BW: torch.Tensor, grad_scale: float, backward: bool) -> StepResult:
        context = self.loss_cfg.context_points
        if values_BW.shape[1] <= context:
            raise ValueError(f"window of {values_BW.shape[1]} points holds no target after "
                             f"data.context_points={context}")
        values_BW = values_BW.to(self.device)
        mask_BW = mask_BW.to(self.device).to(values_BW.dtype)
        num_mb = self.cfg.parallel.pp_microbatches if self._pp_group is not None else 1
        if values_BW.shape[0] % num_mb:
            raise LayoutError(f"batch of {values_BW.shape[0]} windows per rank is not divisible by "
                              f"parallel.pp_microbatches={num_mb}; change the batch size or the microbatches")
        self.share.num_microbatches, self.share.grad_scale = num_mb, grad_scale
        self.report.zero_()
        self.tokens_per_expert_LE.zero_()
        for part in self.model_parts:
            part.train(backward)
        with self._autocast:
            if self._pp_group is None:
                objective = self.model_parts[0](values_BW, mask_BW).sum()
                if backward:
                    objective.backward()
            else:
                schedule = self._schedule_for(values_BW.shape[0] // num_mb, values_BW.shape[1])
                run = schedule.step if backward else schedule.eval
                run(values_BW, mask_BW, target=torch.zeros(values_BW.shape[0], device=self.device))
                if backward:
                    self._tie_head_grads()
        if self.dims.world_size > 1:
            dist.all_reduce(self.report)
        parts = LossParts.from_report(self.report, self.loss_cfg)
        # Counts are per rank (tokens routed here); the loop sums them over ranks.
        return StepResult(parts.as_floats(), self.tokens_per_expert_LE.cpu())

    def _schedule_for(self, microbatch_rows: int, window_points: int):
        """The pipeline schedule for this microbatch shape (built once per shape)."""
        key = (microbatch_rows, window_points)
        if key not in self._schedules:
            m = self.cfg.model
            patches = self.loss_cfg.context_points // m.patch_points
            if patches % self.dims.tp:
                raise LayoutError(f"data.context_points={self.loss_cfg.context_points} gives {patches} patches, not "
                                  f"divisible by parallel.tp={self.dims.tp} (sequence parallel splits patches); "
                                  f"change either")
            self._schedules[key] = build_schedule(
                self.model_parts, self._stage_ids, self._num_stages, self.device, self._pp_group,
                self.cfg.parallel.pp_schedule, self.cfg.parallel.pp_microbatches,
                (microbatch_rows, patches // self.dims.tp, m.hidden_size), (microbatch_rows, window_points),
                carry_h0=m.num_stp_blocks > 0)
        return self._schedules[key]

    def _tie_head_grads(self) -> None:
        """Sum the shared head's gradient over every stage copy (this rank's and other pp ranks')."""
        heads = [dict(p.head.named_parameters()) for p in self.model_parts]
        for name in heads[0]:
            params = [h[name] for h in heads]
            grads = [_local(p.grad) for p in params if p.grad is not None]
            total = torch.stack(grads).sum(0) if grads else torch.zeros_like(_local(params[0]))
            dist.all_reduce(total, group=self._pp_group)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).copy_(total)

    # ------------------------------------------------------------------------------ gradients
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient L2 norm (every parameter once); gradients are scaled to ``max_norm`` if above."""
        norms = [grad_norm_of([part], skip) for part, skip in zip(self.model_parts, self._norm_skip)]
        total = torch.stack(norms).pow(2).sum()
        if self._pp_group is not None:
            dist.all_reduce(total, group=self._pp_group)
        total = total.sqrt()
        if max_norm != float("inf") and torch.isfinite(total):
            coef = max_norm / (float(total) + 1e-6)
            if coef < 1.0:  # a Python float: DTensor grads on different meshes take it as they are
                for part in self.model_parts:
                    for p in part.parameters():
                        if p.grad is not None:
                            p.grad.mul_(coef)
        return float(total)


def grad_norm_of(parts: list[nn.Module], skip_names: set[str] = frozenset()) -> torch.Tensor:
    """Global L2 norm of the gradients of ``parts`` (DTensor shards on any mesh, or plain tensors).

    DTensor norms are grouped by mesh and placement so every group reduces over its own
    shards (dense and expert parameters live on different meshes); replicated copies count
    once. Parameters named in ``skip_names`` are left out (pipeline copies of the head).
    """
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
    for grads in [*groups.values(), plain]:
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            total_sq += (norm.full_tensor() if isinstance(norm, DTensor) else norm).double() ** 2
    return total_sq.sqrt()


def build_engine(model: TimerS1, cfg: Config, world_size: int = 1, device: torch.device | str | None = None,
                 dims: ParallelDims | None = None) -> Engine:
    """Split (PP), parallelize (TP -> EP -> AC -> FSDP) and wrap ``model`` for training.

    ``world_size`` 1 needs no process group; larger ones need it initialised
    (``init_distributed``). ``model`` may live on the meta device (then parameters are
    materialised on ``device`` and initialised with ``init_weights`` after sharding; values then
    differ from a single-process init) or be a real model (identical on every rank, e.g. built
    with the same seed; its values are kept, which is what parity tests and fine-tuning use).
    The engine takes the model over: with one pipeline stage per rank the part *is* ``model``,
    and its forward now runs as a stage of the step (it returns the loss).
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    dims = dims or ParallelDims.from_config(cfg.parallel, world_size)
    if dims.world_size > 1 and not dims._meshes:
        dims.build_meshes(device.type)
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    dims.check_model(moe.num_experts, m.num_heads, m.hidden_size, m.num_layers + m.num_stp_blocks, p.pp_schedule,
                     p.pp_microbatches if dims.pp > 1 else 1)
    on_meta = any(t.is_meta for t in model.parameters())
    if dims.pp == 1:
        stage_ids, num_stages = [0], 1
    else:
        virtual = 2 if p.pp_schedule == "interleaved_1f1b" else 1
        num_stages = dims.pp * virtual
        pp_rank = dims.mesh("pp").get_local_rank()
        stage_ids = [pp_rank + k * dims.pp for k in range(virtual)]
    splits = split_units(m.num_layers, m.num_stp_blocks, num_stages)
    parts = []
    for sid in stage_ids:
        part = make_stage(model, splits[sid], m.num_layers, copy_model=dims.pp > 1)
        parallelize(part, dims, p, param_dtype=torch.bfloat16 if uses_bf16(cfg, device) else None,
                    compile_attention=uses_compile(cfg, device))
        if on_meta:
            part.to_empty(device=device)
            init_weights(part, m.init_std)
        elif device.type != "cpu":
            part.to(device)
        parts.append(part)
    return Engine(parts, stage_ids, num_stages, dims, cfg, device)
