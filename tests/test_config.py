"""Config loading, overrides and validation errors that name the field and value."""

from __future__ import annotations

import pytest

from timers1.cli import main
from timers1.config import Config, ConfigError, load_config
from tests.conftest import CONFIGS_DIR


def test_shipped_configs_load():
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        if path.name.startswith(("data_", "eval_", "clusters")):
            continue  # builder, evaluation and cluster-profile files have their own schemas
        load_config(path)


def test_defaults_are_the_flagship():
    cfg = Config()
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_stp_blocks) == (1024, 24, 16)
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (32, 2)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", ["moe.top_k=1", "train.lr=3e-4", "moe.renormalize_weights=true",
                                                 "data.mixture_weights={synthetic: 2.0}"])
    assert cfg.moe.top_k == 1 and cfg.train.lr == pytest.approx(3e-4) and cfg.moe.renormalize_weights is True
    assert cfg.data.mixture_weights == {"synthetic": 2.0}


@pytest.mark.parametrize("override, message", [
    ("moe.top_k=0", r"moe.top_k=0: must be between 1 and moe.num_experts=4"),
    ("moe.top_k=two", r"moe.top_k: expected an integer, got 'two'"),
    ("model.num_heads=5", r"model.num_heads=5: must divide model.hidden_size=64"),
    ("model.quantiles=[0.1, 0.9]", r"model.quantiles=\[0.1, 0.9\]: must contain 0.5"),
    ("data.context_points=100", r"data.context_points=100: must be a positive multiple of model.patch_points=16"),
    ("train.schedule=linear", r"train.schedule='linear': must be 'cosine' or 'wsd'"),
    ("moe.nonsense=1", r"unknown field\(s\) moe.nonsense"),
    ("parallel.ep=3", r"parallel.ep=3: must divide moe.num_experts=4"),
    ("train.lr", r"not of the form section.field=value"),
])
def test_bad_values_name_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS_DIR / "tiny.yaml", [override])


def test_compile_is_refused_with_tensor_parallelism():
    assert load_config(CONFIGS_DIR / "tiny.yaml", ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train.compile=True: not supported with parallel.tp=2"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["train.compile=true", "parallel.tp=2"])


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: -3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.hidden_size=-3: must be >= 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_params_cli(capsys):
    assert main(["params", "--config", str(CONFIGS_DIR / "timer_s1_8b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "total_params: 8303654176" in out and "active_params: 753906976" in out
    assert main(["params", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--set", "moe.top_k=3"]) == 2
    assert "moe.top_k=3" in capsys.readouterr().err


def test_bad_override_is_blamed_on_set_not_on_the_file(capsys, monkeypatch):
    """Issue 14.7: a bad --set value names the --set, a bad file value names the file."""
    assert main(["params", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--set", "train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("timers1 params: error: --set train.steps=abc: train.steps: expected an integer, "
                           "got 'abc'")
    with pytest.raises(ConfigError, match=r"^--set model.quantiles=\[0.1, 0.9\]: model.quantiles="):
        load_config(CONFIGS_DIR / "tiny.yaml", ["model.quantiles=[0.1, 0.9]"])
    with pytest.raises(ConfigError, match=r"tiny.yaml: data.context_points=256: must be a positive multiple"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["model.patch_points=48"])
    monkeypatch.setenv("TIMERS1_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(ConfigError):
        main(["params", "--config", str(CONFIGS_DIR / "tiny.yaml"), "--set", "train.steps=abc"])


def test_retired_fields_of_older_runs_load_only_when_inert(tmp_path):
    # Run directories written before train.min_prefix_fraction was retired hold it at 0.0 (off):
    # their configs (and so their checkpoints) still load. Any other value asked for behaviour
    # that no longer exists, and says what replaced it.
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  min_prefix_fraction: 0.0\nmodel:\n  max_position_embeddings: 4096\n")
    assert load_config(path).train.norm_prefix_min_fraction == 0.0
    path.write_text("train:\n  min_prefix_fraction: 0.5\n")
    with pytest.raises(ConfigError, match="train.min_prefix_fraction: 0.5 is no longer supported.*"
                                          "norm_prefix_min_fraction replaced it") as err:
        load_config(path)
    assert err.value.field == "train.min_prefix_fraction"
