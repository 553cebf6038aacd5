"""`timers1 plan` against what a real (CPU, fp32, single-process) run holds."""

from __future__ import annotations

import torch

from timers1.cli import main as cli_main
from timers1.config import load_config
from timers1.parallel import ParallelDims
from timers1.parallel.plan import GIB, plan_memory

ACT_FACTOR = 2.0  # the activation estimate must be within this factor of the measured saved bytes


def _tiny(tmp_overrides=()):
    from tests.conftest import CONFIGS_DIR

    return load_config(CONFIGS_DIR / "tiny.yaml", ["train.batch_size=8", "train.grad_accum_steps=1",
                                                   "parallel.activation_checkpointing=false", "model.dropout=0.0",
                                                   "moe.kernel_backend=torch", *tmp_overrides])


def test_plan_matches_measured_single_process():
    from timers1.losses import LossConfig, stage_loss
    from timers1.model import build_model, instance_normalize

    torch.set_num_threads(1)
    cfg = _tiny()
    plan = plan_memory(cfg, ParallelDims(world_size=1), gpu_mem_gib=1.0, precision="fp32")
    model = build_model(cfg.model, cfg.moe, seed=0)
    c = cfg.data.context_points
    width = c + (cfg.model.num_stp_blocks + 1) * cfg.model.patch_points
    values = torch.randn(cfg.train.batch_size, width).cumsum(-1)
    mask = torch.ones_like(values)

    saved: dict[int, int] = {}

    def pack(t):
        if t.is_floating_point() and t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    params = {id(p) for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        normed, _, _ = instance_normalize(values[:, :c], mask[:, :c])
        out = model(normed, mask[:, :c])
        objective, _ = stage_loss(out, values, mask, LossConfig.from_config(cfg))
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    act_bytes = sum(n for ptr, n in saved.items() if ptr not in param_ptrs)
    objective.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optim_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert len(params) > 0
    assert round(plan.params_gib * GIB) == param_bytes
    assert round(plan.grads_gib * GIB) == grad_bytes
    assert round(plan.optimizer_gib * GIB) == optim_bytes
    ratio = plan.activations_gib * GIB / act_bytes
    print(f"activation estimate {plan.activations_gib * GIB:.0f} B, measured saved {act_bytes} B, ratio {ratio:.2f}")
    assert 1 / ACT_FACTOR <= ratio <= ACT_FACTOR, f"activation estimate / measured = {ratio:.2f}"


def test_plan_cli_answers_flagship(capsys):
    from tests.conftest import CONFIGS_DIR

    for gpus in (8, 32, 128):
        assert cli_main(["plan", "--config", str(CONFIGS_DIR / "timer_s1_8b.yaml"), "--gpus", str(gpus),
                         "--gpu-mem-gib", "80"]) == 0
        out = capsys.readouterr().out
        assert "answer: fits" in out and "params" in out and "activations" in out
    assert cli_main(["plan", "--config", str(CONFIGS_DIR / "timer_s1_8b.yaml"), "--gpus", "8",
                     "--layout", "dp_shard=8,ep=3"]) == 2
    assert "parallel.ep=3" in capsys.readouterr().err
