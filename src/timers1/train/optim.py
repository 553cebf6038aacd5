"""Optimizer and learning-rate schedules.

Weight decay applies to matrices only (Linear weights and stacked expert weights); norm gains,
QK scales and biases are not decayed, as is standard for transformers.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Iterable

import torch
from torch import nn

from timers1.config import TrainConfig


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for _, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: list[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(modules, cfg.weight_decay)
    if cfg.optimizer == "deepspeed_cpu_adam":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except ImportError as exc:  # optional extra
            raise RuntimeError("train.optimizer='deepspeed_cpu_adam' needs the 'offload' extra: pip install --no-build-isolation -e '.[offload]' (and g++)") from exc
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **adamw_implementation(groups))


def adamw_implementation(groups: list[dict]) -> dict[str, bool]:
    """``fused`` where PyTorch has the kernel for these parameters, else ``foreach``.

    On CPU, foreach is a Python-level loop of per-tensor ops that reads and writes every
    parameter and state tensor ~10 times; the fused kernel makes one pass and took a tenth of
    the time for the small model's 5.4M parameters (~30% of its step). Fused handles DTensors
    (FSDP2, TP) on CUDA, not on CPU, where those keep foreach.
    """
    from torch.distributed.tensor import DTensor

    params = [p for group in groups for p in group["params"]]
    distributed = any(isinstance(p, DTensor) for p in params)
    if params and all(p.device.type in ("cpu", "cuda") for p in params) and not (
            distributed and any(p.device.type == "cpu" for p in params)):
        return {"fused": True}
    return {"foreach": True}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr after ``step`` optimizer steps (0-based: step 0 is the first update)."""
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    total = max(cfg.steps, warmup + 1)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # Warmup-stable-decay: flat at the peak, then a linear decay over the last fraction of steps.
    decay_steps = max(1, int(round(cfg.wsd_decay_fraction * total)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1.0 - floor) * max(0.0, (total - step) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class PartOptimizers:
    """One optimizer and LR schedule per model part (pipeline stage held by this rank).

    Parts share fully qualified names (the quantile head is copied into every pipeline stage),
    so state dicts use DCP's flattened form keyed by FQN: the parts' dicts merge into one that
    is independent of the layout and loads into any other (DCP reshards the tensors).
    """

    def __init__(self, parts: list[nn.Module], cfg: TrainConfig):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self.parts = parts
        self.optimizers = [build_optimizer([part], cfg) for part in parts]
        self.schedulers = [build_scheduler(opt, cfg) for opt in self.optimizers]
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def schedule_step(self) -> None:
        """Advance the schedule, also after a skipped (non-finite) update: lr is a function of the step."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for sched in self.schedulers:
                sched.step()

    @property
    def lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def model_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_model_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        for part in self.parts:
            keys = set(part.state_dict().keys())
            set_model_state_dict(part, {k: v for k, v in state.items() if k in keys})

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        merged: dict = {}
        for part, opt in zip(self.parts, self.optimizers):
            merged.update(get_optimizer_state_dict(part, opt, options=self._options))
        return merged

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        for part, opt in zip(self.parts, self.optimizers):
            set_optimizer_state_dict(part, opt, state, options=self._options)

    def scheduler_state(self) -> list[dict]:
        return [s.state_dict() for s in self.schedulers]

    def load_scheduler_state(self, states: list[dict]) -> None:
        for sched in self.schedulers:
            sched.load_state_dict(states[0])  # all parts follow one schedule
