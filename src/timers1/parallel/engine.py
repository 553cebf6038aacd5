"""The training engine: one object that hides whether the model is pipelined or not.

    engine = build_engine(model, dims, cfg)          # cfg: timers1.config.Config
    parts = engine.forward_backward(values_BW, mask_BW, grad_scale=1.0)   # -> LossParts
    engine.model_parts                               # list[nn.Module] for optimizer and DCP

See ``timers1.parallel`` (the package docstring) for the full contract.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from timers1.config import Config
from timers1.losses import LossParts, stp_weights
from timers1.model.timer_s1 import TimerS1, init_weights, instance_normalize
from timers1.parallel.dims import LayoutError, ParallelDims
from timers1.parallel.losses import StepContext
from timers1.parallel.parallelize import parallelize
from timers1.parallel.pipeline import build_schedule, make_stage, split_units


def _param_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Engine:
    """Forward + backward of one (global) batch over whatever layout ``dims`` describes."""

    def __init__(self, model_parts, dims: ParallelDims, cfg: Config, ctx: StepContext, device, stage_ids):
        self.model_parts: list[nn.Module] = model_parts
        self.dims = dims
        self.cfg = cfg
        self.ctx = ctx
        self.device = device
        self.stage_ids = stage_ids
        self.pipelined = dims.pp > 1
        self._schedules: dict = {}

    def _schedule_for(self, microbatch_rows: int, context_points: int):
        """The pipeline schedule for this microbatch shape (built once per shape)."""
        key = (microbatch_rows, context_points)
        if key not in self._schedules:
            m, p = self.cfg.model, self.cfg.parallel
            patches = context_points // m.patch_points
            if patches % self.dims.tp:
                raise LayoutError(f"data.context_points={context_points} gives {patches} patches, not divisible by "
                                  f"parallel.tp={self.dims.tp} (sequence parallel splits patches); change either")
            num_stages = self.dims.pp * (2 if p.pp_schedule == "interleaved_1f1b" else 1)
            self._schedules[key] = build_schedule(
                self.model_parts, self.stage_ids, num_stages, self.device, self.dims.mesh("pp").get_group(),
                p.pp_schedule, p.pp_microbatches, (microbatch_rows, patches // self.dims.tp, m.hidden_size),
                (microbatch_rows, context_points))[0]
        return self._schedules[key]

    # ------------------------------------------------------------------------------ step
    def forward_backward(self, values_BW: torch.Tensor, mask_BW: torch.Tensor, grad_scale: float = 1.0) -> LossParts:
        """Accumulate into ``.grad`` the gradient of ``grad_scale * loss`` of this rank's batch.

        ``values_BW``/``mask_BW``: this rank's data shard (rank ``dims.dp_rank`` of dp; every tp
        and pp rank of a dp group gets the same batch), the first ``data.context_points`` points
        are the input, the rest the targets (any width the loss accepts). Returns the loss
        parts, **identical on every rank**: the mean over dp ranks (and pipeline microbatches)
        of the per-batch losses, router losses over the global microbatch; not scaled by
        ``grad_scale``. Gradients are reduced (FSDP) when this returns.
        """
        cfg, ctx = self.cfg, self.ctx
        context = cfg.data.context_points
        if values_BW.shape[1] <= context:
            raise ValueError(f"window of {values_BW.shape[1]} points holds no target after "
                             f"data.context_points={context}")
        values_BW = values_BW.to(self.device)
        mask_BW = mask_BW.to(self.device).to(values_BW.dtype)
        normed, mean, scale = instance_normalize(values_BW[:, :context], mask_BW[:, :context])
        num_mb = cfg.parallel.pp_microbatches if self.pipelined else 1
        if values_BW.shape[0] % num_mb:
            raise LayoutError(f"batch of {values_BW.shape[0]} windows per rank is not divisible by "
                              f"parallel.pp_microbatches={num_mb}; change the batch size or the microbatches")
        ctx.num_microbatches = num_mb
        ctx.grad_scale = grad_scale
        ctx.targets = (values_BW, mask_BW, mean, scale)
        ctx.reset(self.device)
        rows_B = torch.arange(values_BW.shape[0], device=self.device)
        if not self.pipelined:
            loss = self.model_parts[0](normed, mask_BW[:, :context], rows_B)
            loss.sum().backward()
        else:
            schedule = self._schedule_for(values_BW.shape[0] // num_mb, context)
            target = torch.zeros(values_BW.shape[0], device=self.device)
            schedule.step(normed, mask_BW[:, :context], rows_B, target=target)
            self.tie_head_grads()
        return self._report()

    def tie_head_grads(self) -> None:
        """Sum the shared head's gradient over every stage copy (this rank's and other pp ranks')."""
        heads = [dict(p.head.named_parameters()) for p in self.model_parts]
        for name in heads[0]:
            params = [h[name] for h in heads]
            local = [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad) for p in params if p.grad is not None]
            ref = params[0]
            shard = ref.to_local() if isinstance(ref, DTensor) else ref
            total = torch.zeros_like(shard) if not local else torch.stack(local).sum(0)
            if self.dims.pp > 1:
                dist.all_reduce(total, group=self.dims.mesh("pp").get_group())
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).copy_(total)

    def _report(self) -> LossParts:
        ctx = self.ctx
        report = ctx.report
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(report)
        j, nb = ctx.num_horizons, ctx.num_blocks
        per_h = [report[i].float() for i in range(j)]
        ntp, stp = per_h[0], per_h[1:]
        total = ntp.clone()
        if stp:
            weights = stp_weights(len(stp), ctx.stp_weighting)
            total = total + sum(w * v for w, v in zip(weights, stp)) / len(stp)
        aux = z = None
        if ctx.aux_loss_coef > 0 and nb:
            aux = report[j:j + nb].mean().float()
            total = total + ctx.aux_loss_coef * aux
        if ctx.z_loss_coef > 0 and nb:
            z = report[j + nb:j + 2 * nb].mean().float()
            total = total + ctx.z_loss_coef * z
        return LossParts(total, ntp, stp, aux, z)

    # ------------------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> "Engine":
        for p in self.model_parts:
            p.train(mode)
        return self

    def parameters(self):
        """Every parameter of this rank (the shared head appears once per stage copy)."""
        for part in self.model_parts:
            yield from part.parameters()


def build_engine(model: TimerS1, dims: ParallelDims, cfg: Config, device: torch.device | str | None = None) -> Engine:
    """Split (PP), parallelize (TP -> EP -> AC -> FSDP) and wrap ``model`` for training.

    ``model`` may live on the meta device (then parameters are materialised on ``device`` and
    initialised with ``init_weights`` after sharding; values then differ from a single-process
    init) or be a real model (identical on every rank, e.g. built with the same seed; its
    values are kept, which is what parity tests and fine-tuning use). The process group must
    be initialised (``init_distributed``).
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if not dims._meshes:
        dims.build_meshes(device.type)
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    num_blocks = m.num_layers + m.num_stp_blocks
    dims.check_model(moe.num_experts, m.num_heads, m.hidden_size, num_blocks, p.pp_schedule,
                     p.pp_microbatches if dims.pp > 1 else 1)
    tp_mesh = dims.mesh("tp") if dims.tp > 1 else None
    batch_mesh = dims.mesh("batch")
    ctx = StepContext(
        quantiles=list(m.quantiles), num_horizons=m.num_stp_blocks + 1, num_blocks=num_blocks,
        patch_points=m.patch_points, context_points=cfg.data.context_points, stp_weighting=cfg.train.stp_weighting,
        min_prefix_fraction=cfg.train.min_prefix_fraction, wql_denominator=cfg.train.wql_denominator,
        aux_loss_coef=moe.aux_loss_coef,
        z_loss_coef=moe.z_loss_coef, dp=dims.dp, tp=dims.tp, batch_group=batch_mesh.get_group(),
        batch_group_size=batch_mesh.size(),
    )
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
        part.configure_stage(splits[sid], sid == 0, sid == num_stages - 1, m.num_stp_blocks > 0, ctx, tp_mesh)
        parallelize(part, dims, p, param_dtype=_param_dtype(cfg.train.precision, device))
        # After TP (prepend: the hook sees the MoE's local output before TP wraps it).
        for name, block in part.layers.items():
            block.moe.register_forward_hook(ctx.router_hook(int(name)), prepend=True)
        for name, stp in part.stp_blocks.items():
            stp.block.moe.register_forward_hook(ctx.router_hook(m.num_layers + int(name)), prepend=True)
        if on_meta:
            part.to_empty(device=device)
            init_weights(part, m.init_std)
        elif device.type != "cpu":
            part.to(device)
        parts.append(part)
    return Engine(parts, dims, cfg, ctx, device, stage_ids)
