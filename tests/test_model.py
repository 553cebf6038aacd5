"""Model structure and training forward: causality, MoE equivalence, gradients, parameter counts."""

from __future__ import annotations

import pytest
import torch

import copy
import dataclasses

from timers1.losses import LossConfig, stage_loss
from timers1.model import build_model, instance_normalize
from timers1.model.flops import count_params
from timers1.model.moe import MoE


def _model(cfg, seed=0):
    model = build_model(cfg.model, cfg.moe, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_training_forward_shapes_and_records(tiny_config):
    model = _model(tiny_config)
    values = torch.randn(3, 128)
    out = model(values, torch.ones_like(values))
    # J = 1 + H horizons, N = 8 positions, Q = 9, P = 16.
    assert out.quantiles_BJNQP.shape == (3, 3, 8, 9, 16)
    assert len(out.router_records) == tiny_config.model.num_layers + tiny_config.model.num_stp_blocks
    record = out.router_records[0]
    assert record.routing.tokens_per_expert_E.sum().item() == 3 * 8 * tiny_config.moe.top_k


def test_predictions_are_causal(tiny_config):
    """Changing patch k changes no prediction made at positions before k, at any horizon."""
    model = _model(tiny_config)
    values = torch.randn(2, 128)
    mask = torch.ones_like(values)
    base = model(values, mask).quantiles_BJNQP
    changed = values.clone()
    changed[:, 5 * 16:] += 10.0
    after = model(changed, mask).quantiles_BJNQP
    assert torch.allclose(base[:, :, :5], after[:, :, :5], atol=1e-6)
    assert not torch.allclose(base[:, :, 5:], after[:, :, 5:])


def test_forecast_pass_equals_training_forward_last_position(tiny_config):
    model = _model(tiny_config)
    values = torch.randn(2, 96)
    mask = torch.ones_like(values)
    dense = model(values, mask).quantiles_BJNQP[:, :, -1]  # [B, J, Q, P]
    fc = model.forecast_pass(values, mask, model.points_per_pass)
    assert torch.allclose(fc, dense.permute(0, 2, 1, 3).reshape(2, 9, -1), atol=1e-6)
    # A shorter horizon skips STP blocks but gives the same leading points.
    assert torch.allclose(model.forecast_pass(values, mask, 20), fc[..., :20], atol=1e-6)


def test_instance_normalize_ignores_padding():
    values = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    normed, mean, scale = instance_normalize(values, mask)
    assert mean.item() == pytest.approx(2.0) and scale.item() == pytest.approx(1.0 + 1e-5)
    assert normed[0, :2].tolist() == [0.0, 0.0]
    assert normed[0, 2:].tolist() == pytest.approx([-1 / (1 + 1e-5), 1 / (1 + 1e-5)])


def test_moe_matches_released_expert_loop_values_and_grads():
    released = pytest.importorskip("sktime.libs.timer_s1.modeling_TimerS1")
    from sktime.libs.timer_s1.configuration_TimerS1 import TimerS1Config

    torch.manual_seed(0)
    d, e, k, inter = 16, 6, 2, 48
    ref = released.TimerS1ExpertsLayer(TimerS1Config(hidden_size=d, intermediate_size=inter, num_experts=e,
                                                      num_experts_per_token=k))
    ours = MoE(d, inter // k, e, k)
    with torch.no_grad():
        ours.router.weight.copy_(torch.randn(e, d))
        ref.gate.weight.copy_(ours.router.weight)
        for name in ("gate", "up", "down"):
            stacked = getattr(ours.experts, {"gate": "w_gate_EFD", "up": "w_up_EFD", "down": "w_down_EDF"}[name])
            stacked.copy_(torch.randn_like(stacked) * 0.3)
            for i in range(e):
                getattr(ref.experts[i], f"{name}_proj").weight.copy_(stacked[i])
    x = torch.randn(3, 11, d)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ours, record = ours(x_ours)
    assert torch.allclose(y_ours, y_ref, atol=1e-5)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    assert torch.allclose(x_ours.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(ours.router.weight.grad, ref.gate.weight.grad, atol=1e-5)
    for i in range(e):
        assert torch.allclose(ours.experts.w_up_EFD.grad[i], ref.experts[i].up_proj.weight.grad, atol=1e-5)


def test_loss_backward_reaches_every_parameter(tiny_config):
    model = build_model(tiny_config.model, tiny_config.moe, seed=0).train()
    gen = torch.Generator().manual_seed(0)
    window = torch.randn(4, (8 + 3) * 16, generator=gen).cumsum(-1)
    mask = torch.ones_like(window)
    context = window[:, : 8 * 16]
    normed, _, _ = instance_normalize(context, mask[:, : 8 * 16])
    out = model(normed, mask[:, : 8 * 16])
    loss_cfg = dataclasses.replace(LossConfig.from_config(tiny_config), context_points=8 * 16, aux_loss_coef=0.02)
    objective, _ = stage_loss(out, window, mask, loss_cfg)
    objective.backward()
    assert torch.isfinite(objective)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_param_counts_tiny_match_module_tree(tiny_config):
    total, active = count_params(tiny_config.model, tiny_config.moe)
    model = build_model(tiny_config.model, tiny_config.moe)
    assert total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    assert active == total - experts // 2  # 2 of 4 experts active


def test_fully_padded_patches_are_inert_and_gradients_finite(tiny_config):
    """Short series left-padded by whole patches: finite gradients from a fresh init, and the
    padding changes nothing that the real patches predict."""
    from timers1.parallel import build_engine

    model = build_model(tiny_config.model, tiny_config.moe, seed=0).train()
    gen = torch.Generator().manual_seed(0)
    context = tiny_config.data.context_points
    window = torch.randn(3, context + 48, generator=gen).cumsum(-1)
    mask = torch.ones_like(window)
    mask[0, : context - 40] = 0  # 13 whole padded patches plus a partial one
    window = window * mask
    normed, _, _ = instance_normalize(window[:, :context], mask[:, :context])
    records = model(normed, mask[:, :context]).router_records
    assert records[0].token_valid_T is not None and int((~records[0].token_valid_T).sum()) == 13

    # Predictions at real positions equal those of the same series with its padding dropped.
    model.eval()
    normed, mean, scale = instance_normalize(window[:1, :context], mask[:1, :context])
    padded = model(normed, mask[:1, :context]).quantiles_BJNQP[:, :, 13:]
    short = model(normed[:, 13 * 16:], mask[:1, 13 * 16: context]).quantiles_BJNQP
    assert torch.allclose(padded, short, atol=1e-5)

    # A training step on the batch (the engine takes the model over: its forward becomes a stage).
    tiny_config.moe.aux_loss_coef, tiny_config.moe.z_loss_coef = 0.02, 0.001
    build_engine(model, tiny_config).forward_backward(window, mask)
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_experts_compute_in_the_autocast_dtype(monkeypatch):
    """In one process (no FSDP bf16 parameters) bf16 autocast must reach the grouped GEMMs,
    which autocast itself skips as a custom autograd function; the fp32 weights get fp32 grads."""
    import timers1.model.moe as moe_module

    seen = []
    real = moe_module.swiglu_experts

    def spy(x_SD, counts_E, w_gate_EFD, *rest, **kw):
        seen.append((x_SD.dtype, w_gate_EFD.dtype))
        return real(x_SD, counts_E, w_gate_EFD, *rest, **kw)

    monkeypatch.setattr(moe_module, "swiglu_experts", spy)
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    y.float().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert moe.experts.w_gate_EFD.grad.dtype == torch.float32
    moe(x)  # no autocast: fp32 as before
    assert seen[-1] == (torch.float32, torch.float32)


def test_compiled_step_matches_eager(tiny_config):
    """``train.compile`` (compiled attention halves and loss) changes speed, not the step: same loss and
    gradients as eager on a batch with padded windows (attention-mask path) and the prefix draw."""
    from timers1.parallel.engine import _cpu_compiler_missing, build_engine

    if _cpu_compiler_missing():
        pytest.skip("torch.compile's CPU kernels need the C++ compiler inductor calls")
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, norm_prefix_min_fraction=0.25))
    gen = torch.Generator().manual_seed(1)
    window = torch.randn(4, cfg.data.context_points + 3 * 16, generator=gen).cumsum(-1)
    mask = torch.ones_like(window)
    mask[1, :64] = 0  # a short series, left-padded by whole patches
    window = window * mask
    model = _model(cfg)
    results = []
    for compile_ in (False, True):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=compile_))
        engine = build_engine(copy.deepcopy(model), run_cfg, device="cpu")
        assert engine.loss_cfg.compile is compile_
        assert ("attend" in vars(engine.model_parts[0].layers["0"])) is compile_  # apply_compile ran
        result = engine.forward_backward(window, mask)
        grads = {n: p.grad.clone() for n, p in engine.model_parts[0].named_parameters()}
        results.append((result.loss_floats, grads))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    assert loss_compiled["loss"] == pytest.approx(loss_eager["loss"], rel=1e-5)
    assert grads_compiled.keys() == grads_eager.keys()
    for name, grad in grads_eager.items():
        assert torch.allclose(grads_compiled[name], grad, rtol=1e-4, atol=1e-6), name


def test_compile_falls_back_to_eager_without_a_cpp_compiler(tiny_config, monkeypatch, tmp_path):
    from timers1.parallel import engine as engine_module

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, compile=True))
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    engine_module._cpu_compiler_missing.cache_clear()
    try:
        with pytest.warns(UserWarning, match="train.compile: no C\\+\\+ compiler"):
            engine = engine_module.build_engine(_model(cfg), cfg, device="cpu")
    finally:
        engine_module._cpu_compiler_missing.cache_clear()
    assert engine.loss_cfg.compile is False
    assert "attend" not in vars(engine.model_parts[0].layers["0"])  # apply_compile sets it on each block
