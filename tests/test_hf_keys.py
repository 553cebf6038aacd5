"""Every released parameter name of the flagship maps onto ours and back (meta device, no memory)."""

from __future__ import annotations

import pytest
import torch

reference = pytest.importorskip("sktime.libs.timer_s1.modeling_TimerS1")
from sktime.libs.timer_s1.configuration_TimerS1 import TimerS1Config  # noqa: E402

from timers1 import hf  # noqa: E402
from timers1.config import load_config  # noqa: E402
from timers1.model import build_model  # noqa: E402


def test_flagship_names_map_both_ways(tmp_path):
    cfg = load_config("configs/timer_s1_8b.yaml")
    with torch.device("meta"):
        released = reference.TimerS1ForPrediction(TimerS1Config(**hf.model_config_to_hf(cfg.model, cfg.moe)))
    released_shapes = {k: v.shape for k, v in released.state_dict().items()}
    ours = build_model(cfg.model, cfg.moe, device="meta")
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}

    # released -> ours: every key maps, each of our keys is hit, shapes agree after stacking.
    hit: dict[str, set[int]] = {}
    for key, shape in released_shapes.items():
        mapped = hf.hf_key_to_ours(key)
        assert mapped is not None, key
        if isinstance(mapped, tuple):
            name, expert, _ = mapped
            assert our_shapes[name][1:] == shape, key
            hit.setdefault(name, set()).add(expert)
        else:
            assert our_shapes[mapped] == shape, key
            hit.setdefault(mapped, set())
    assert set(hit) == set(our_shapes)
    for name, experts in hit.items():
        if experts:
            assert experts == set(range(cfg.moe.num_experts)), name

    # ours -> released covers exactly the released key set.
    back = set()
    for key, shape in our_shapes.items():
        for hf_key in hf.our_key_to_hf(key):
            back |= {hf_key.format(e=e) for e in range(shape[0])} if "{e}" in hf_key else {hf_key}
    assert back == set(released_shapes)
    assert sum(v.numel() for v in released.state_dict().values()) == 8303654176


def test_unknown_and_missing_keys_are_listed():
    cfg = load_config("configs/tiny.yaml")
    model = build_model(cfg.model, cfg.moe)
    hf_state = hf.ours_state_to_hf(model.state_dict())
    hf_state["model.layers.0.self_attn.rotary_emb.bogus"] = torch.zeros(1)
    with pytest.raises(hf.CheckpointFormatError, match="unknown keys.*rotary_emb.bogus"):
        hf.hf_state_to_ours(hf_state, cfg.model, cfg.moe)
    del hf_state["model.layers.0.self_attn.rotary_emb.bogus"]
    del hf_state["model.norm.weight"]
    with pytest.raises(hf.CheckpointFormatError, match="missing keys.*norm.weight"):
        hf.hf_state_to_ours(hf_state, cfg.model, cfg.moe)
    hf_state = hf.ours_state_to_hf(model.state_dict())
    del hf_state["mtp_modules.1.layer.ffn_layer.experts.2.up_proj.weight"]
    with pytest.raises(hf.CheckpointFormatError, match="experts of .*mtp|incomplete"):
        hf.hf_state_to_ours(hf_state, cfg.model, cfg.moe)


def test_bad_checkpoint_directories(tmp_path):
    import timers1

    with pytest.raises(FileNotFoundError):
        timers1.load_forecaster(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointFormatError, match="not a timers1 model directory"):
        timers1.load_forecaster(tmp_path / "empty")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{nope")
    with pytest.raises(hf.CheckpointFormatError, match="config.json: not valid JSON"):
        timers1.load_forecaster(tmp_path / "badjson")
    (tmp_path / "noweights").mkdir()
    cfg = load_config("configs/tiny.yaml")
    import json

    (tmp_path / "noweights" / "config.json").write_text(json.dumps(hf.model_config_to_hf(cfg.model, cfg.moe)))
    with pytest.raises(hf.CheckpointFormatError, match="neither model.safetensors"):
        timers1.load_forecaster(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(hf.CheckpointFormatError, match="model.safetensors: not a readable safetensors"):
        timers1.load_forecaster(tmp_path / "noweights")
