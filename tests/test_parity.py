"""Our model against the released implementation (sktime.libs.timer_s1) on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

reference = pytest.importorskip("sktime.libs.timer_s1.modeling_TimerS1")
from sktime.libs.timer_s1.configuration_TimerS1 import TimerS1Config  # noqa: E402

import timers1  # noqa: E402
from timers1 import hf  # noqa: E402
from timers1.forecast import load_model  # noqa: E402

# Several architectures: patch counts, expert counts, top-k 1 and 2, STP depth 0..3.
CONFIGS = {
    "base": dict(input_token_len=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_experts=4, num_experts_per_token=2, num_mtp_tokens=2),
    "top1_deep_stp": dict(input_token_len=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_experts=8, num_experts_per_token=1, num_mtp_tokens=3),
    "patch8_no_stp": dict(input_token_len=8, output_token_lens=[8], hidden_size=48, intermediate_size=96,
                          num_hidden_layers=3, num_attention_heads=6, num_experts=6, num_experts_per_token=2,
                          num_mtp_tokens=0),
}


def make_reference(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TimerS1Config(max_position_embeddings=256, **CONFIGS[name])
    model = reference.TimerS1ForPrediction(cfg).eval()
    # Released init is N(0, 0.02): so small that routing is near-uniform and norms are 1.
    # Larger random weights make every parameter (norm gains, QK scales, router) matter.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in pname or "scale" in pname):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    model = make_reference(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path)
    return request.param, model, path


def _cases(patch: int):
    # (input length, horizon): multiples of P and not; inside one pass and needing roll-out.
    return [(4 * patch, 10), (5 * patch + 3, 2 * patch), (7 * patch - 5, 5 * patch + 7), (3 * patch, 11 * patch)]


def test_predict_matches_reference_generate(pair):
    name, ref, path = pair
    forecaster = timers1.load_forecaster(path)
    patch = CONFIGS[name]["input_token_len"]
    gen = torch.Generator().manual_seed(1)
    for length, horizon in _cases(patch):
        x = torch.randn(3, length, generator=gen) + torch.linspace(-1, 1, length)
        with torch.no_grad():
            expected = ref.generate(x, max_new_tokens=horizon, revin=True).numpy()
        got = forecaster.predict([row.numpy() for row in x], horizon)
        assert got.shape == (3, 9, horizon)
        assert np.abs(got - expected).max() <= 1e-5, (name, length, horizon)


def test_mixed_lengths_equal_single_series(pair):
    """A batch of different lengths gives each series exactly what it gets alone."""
    _, _, path = pair
    forecaster = timers1.load_forecaster(path)
    rng = np.random.default_rng(0)
    series = [rng.normal(size=n).cumsum() for n in (20, 33, 64, 64, 90)]
    together = forecaster.predict(series, 40)
    for i, s in enumerate(series):
        np.testing.assert_allclose(forecaster.predict([s], 40)[0], together[i], atol=1e-5, rtol=0)


def test_round_trip_ours_hf_ours_is_bit_exact(pair, tmp_path):
    _, ref, path = pair
    cfg, model = load_model(path)
    hf.write_model_dir(tmp_path / "ours", cfg, model.state_dict())
    cfg2, model2 = load_model(tmp_path / "ours")
    hf.write_hf_dir(tmp_path / "hf_again", cfg2.model, cfg2.moe, model2.state_dict())
    _, model3 = load_model(tmp_path / "hf_again")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, model3.state_dict()[key]), key
    # And the released code loads what we wrote, with identical weights.
    back = reference.TimerS1ForPrediction.from_pretrained(tmp_path / "hf_again")
    for key, tensor in ref.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[key]), key


def test_convert_cli_both_ways(pair, tmp_path):
    from timers1.cli import main

    _, ref, path = pair
    assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    back = reference.TimerS1ForPrediction.from_pretrained(tmp_path / "hf")
    for key, tensor in ref.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[key]), key


def test_sharded_hf_checkpoint_loads(tmp_path):
    ref = make_reference("base")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf.HF_INDEX).is_file()
    x = torch.randn(2, 48)
    expected = ref.generate(x, max_new_tokens=20, revin=True).numpy()
    got = timers1.load_forecaster(tmp_path / "sharded").predict(list(x.numpy()), 20)
    assert np.abs(got - expected).max() <= 1e-5


def test_training_forward_matches_reference_hidden_states():
    """Dense training predictions at every position equal the released modules applied by hand."""
    ref = make_reference("base", seed=3)
    cfg_model, cfg_moe = hf.model_config_from_hf(ref.config.to_dict())
    from timers1.model import build_model

    ours = build_model(cfg_model, cfg_moe, device="meta")
    ours.load_state_dict(hf.hf_state_to_ours(ref.state_dict(), cfg_model, cfg_moe), assign=True)
    ours.eval()
    x = torch.randn(2, 80)
    mask = torch.ones_like(x)
    out = ours(x, mask)
    with torch.no_grad():
        embeds = ref.model.embed_layer(x)
        h = ref.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        expected = [ref.output_patch_embedding(h)]
        for block in ref.mtp_modules:
            h = block(hidden_states=h, inputs_embeds=embeds, use_cache=False)[0]
            expected.append(ref.output_patch_embedding(h))
    expected = torch.stack(expected, 1).view(2, 3, 5, 9, 16)
    assert torch.allclose(out.quantiles_BJNQP, expected, atol=1e-5)
