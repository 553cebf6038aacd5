"""The averaged weights (``train.ema_decay``, ``timers1.train.averaging``): the average itself,
its validation beside the trained weights, model_best and model_ema, exact and resharded resume,
and runs whose checkpoints hold no average."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from timers1.config import ConfigError, load_config
from timers1.data import build_default_corpus
from timers1.forecast import load_model
from timers1.hf import CheckpointFormatError
from timers1.train import Trainer
from timers1.train.averaging import WeightAverage
from tests.conftest import CONFIGS_DIR

TRAIN = ["data.context_points=64", "train.batch_size=4", "train.warmup_steps=2", "train.lr=0.003",
         "checkpoint.async_save=false", "checkpoint.save_interval_steps=0", "train.peak_tflops=1.0",
         "data.flip_probability=0.5", "model.dropout=0.1", "eval.val_windows=48", "eval.val_batch_size=16"]
EMA = ["train.ema_decay=0.8", "eval.val_interval_steps=3", "eval.val_keep_best=true"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    build_default_corpus(out, num_synthetic_series=48, include_real=False, progress=False, validation_fraction=0.25)
    return out


def _cfg(corpus_dir, run_dir, extra=()):
    return load_config(CONFIGS_DIR / "tiny.yaml", TRAIN + [f"data.corpus_dir={corpus_dir}",
                                                           f"train.run_dir={run_dir}", *extra])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_average_follows_the_decay_ramp_and_swaps_in_and_out_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    average = WeightAverage([model], decay=0.3)
    expected = _weights(model)
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an optimizer step, in place
        decay = min(0.3, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25, then the cap
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in _weights(model).items()}
        average.update()
    assert average.updates == 4 and average.current_decay() == 0.3
    for k, v in average.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)

    trained = _weights(model)
    x = torch.randn(5, 3)
    with average.swapped_in():
        for k, v in model.state_dict().items():
            assert torch.equal(v, average.state_dict()[k])
        inside = model(x)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    reference = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reference.load_state_dict(average.state_dict())
    torch.testing.assert_close(inside, reference(x), rtol=0, atol=0)

    average.reset()
    assert average.updates == 0 and all(torch.equal(v, trained[k]) for k, v in average.state_dict().items())


def test_a_swap_restores_the_trained_weights_when_the_block_raises():
    model = nn.Linear(2, 2)
    average = WeightAverage([model], decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = _weights(model)
    with pytest.raises(RuntimeError, match="inside"):
        with average.swapped_in():
            raise RuntimeError("inside")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_validation_scores_both_weights_and_keeps_the_better(corpus_dir, tmp_path):
    run = tmp_path / "a"
    trainer = Trainer(_cfg(corpus_dir, run, ["train.steps=10", *EMA]), progress=False)
    result = trainer.fit()
    scored = [r for r in _records(run) if "val_loss" in r]
    assert [r["step"] for r in scored] == [3, 6, 9, 10]
    for r in scored:
        assert math.isfinite(r["val_ema_loss"]) and math.isfinite(r["val_ema_loss_ntp"])
        assert r["val_ema_loss"] != r["val_loss"]
    # The last record's averaged score is the model's score with the average swapped in.
    with trainer.average.swapped_in():
        assert trainer.validate()["val_loss"] == scored[-1]["val_ema_loss"]
    assert trainer.validate()["val_loss"] == scored[-1]["val_loss"]

    candidates = [(r["val_loss"], r["step"], "trained") for r in scored] + \
                 [(r["val_ema_loss"], r["step"], "ema") for r in scored]
    loss, step, weights = min(candidates)
    best = json.loads((run / "val_best.json").read_text())
    assert (best["val_loss"], best["step"], best["weights"]) == (loss, step, weights)
    assert scored[-1]["val_best_weights"] == weights

    # model_ema holds the average of the last step; model_best the chosen weights.
    averaged = {k: v.clone() for k, v in trainer.average.state_dict().items()}
    model_ema = trainer.export_averaged_model()
    assert model_ema == run / "model_ema"
    _, exported = load_model(model_ema)
    assert all(torch.equal(v, averaged[k]) for k, v in exported.state_dict().items())
    _, from_checkpoint = load_model(run, weights="ema")
    assert all(torch.equal(v, averaged[k]) for k, v in from_checkpoint.state_dict().items())
    assert weights == "trained" and step == 10  # ten steps of a tiny model: the average lags behind
    _, best_model = load_model(trainer.export_best_model())
    trained = trainer.optim.model_state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in best_model.state_dict().items())

    # Where the average scores better (a later validation, its scores given), it becomes the best.
    inside = []
    real_validate = trainer.validate

    key = next(k for k in averaged if not torch.equal(averaged[k], trained[k]))

    def validate():
        scores = real_validate()
        swapped = torch.equal(trainer.optim.model_state_dict()[key], averaged[key])
        inside.append(swapped)
        return {**scores, "val_loss": 0.5 if swapped else 0.6}

    trainer.validate = validate
    record = {}
    trainer._record_validation(record)
    assert inside == [False, True]
    assert (record["val_loss"], record["val_ema_loss"], record["val_best_weights"]) == (0.6, 0.5, "ema")
    assert json.loads((run / "val_best.json").read_text())["weights"] == "ema"
    _, best_model = load_model(trainer.export_best_model())
    assert all(torch.equal(v, averaged[k]) for k, v in best_model.state_dict().items())

    # Averaging changes no training step.
    plain = Trainer(_cfg(corpus_dir, tmp_path / "b", ["train.steps=10"]), progress=False).fit()
    assert plain.losses == result.losses


def test_resume_restores_the_average_exactly(corpus_dir, tmp_path):
    sets = ["train.steps=8", *EMA]
    straight = Trainer(_cfg(corpus_dir, tmp_path / "a", sets), progress=False)
    straight.fit()
    Trainer(_cfg(corpus_dir, tmp_path / "b", sets), progress=False, max_steps_this_run=5).fit()
    resumed = Trainer(_cfg(corpus_dir, tmp_path / "b", sets), progress=False)
    resumed.fit()
    assert resumed.average.updates == straight.average.updates == 8
    for k, v in straight.average.state_dict().items():
        assert torch.equal(v, resumed.average.state_dict()[k]), k
    scores = {r["step"]: r["val_ema_loss"] for r in _records(tmp_path / "a") if "val_ema_loss" in r}
    again = {r["step"]: r["val_ema_loss"] for r in _records(tmp_path / "b") if "val_ema_loss" in r and r["step"] != 5}
    assert again == scores


def test_averaging_turned_on_at_resume_starts_from_the_checkpoint(corpus_dir, tmp_path, capsys):
    run = tmp_path / "a"
    Trainer(_cfg(corpus_dir, run, ["train.steps=6"]), progress=False, max_steps_this_run=3).fit()
    with pytest.raises(CheckpointFormatError, match="holds no 'ema' weights"):
        load_model(run, weights="ema")
    trainer = Trainer(_cfg(corpus_dir, run, ["train.steps=6", "train.ema_decay=0.5"]), progress=False)
    assert trainer.resume() and trainer.step == 3
    assert "holds no averaged weights" in capsys.readouterr().err
    assert trainer.average.updates == 0
    trained = trainer.optim.model_state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in trainer.average.state_dict().items())


def test_only_training_checkpoints_hold_averaged_weights(corpus_dir, tmp_path):
    trainer = Trainer(_cfg(corpus_dir, tmp_path / "a", ["train.steps=2"]), progress=False)
    trainer.fit()
    model_dir = trainer.export_model(tmp_path / "a" / "model")
    with pytest.raises(CheckpointFormatError, match="only a training checkpoint"):
        load_model(model_dir, weights="ema")


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_bad_decay_names_the_field(value):
    with pytest.raises(ConfigError, match=r"train\.ema_decay"):
        load_config(CONFIGS_DIR / "tiny.yaml", [f"train.ema_decay={value}"])


def test_sharded_average_follows_the_sharded_weights_and_reshards_on_resume(corpus_dir, tmp_path):
    """dp_shard=2 (FSDP2): each rank averages its own shard. Every step's checkpoint, gathered,
    holds average_n = d average_(n-1) + (1 - d) weights_n of that step's weights; resumed on one
    process, the run continues from the sharded average."""
    from tests.test_train_dist import COMMON, train

    sets = ["train.steps=4", "train.lr=0.01", "train.ema_decay=0.8", "model.dropout=0.0",
            "data.resample_probability=0.0", "checkpoint.save_interval_steps=1"]
    train(tmp_path / "two", corpus_dir, 2, sets + ["parallel.dp_shard=2"])
    steps = tmp_path / "two" / "checkpoints"
    previous = load_model(steps / "step_1", weights="ema")[1].state_dict()
    for n in (2, 3, 4):
        averaged = load_model(steps / f"step_{n}", weights="ema")[1].state_dict()
        trained = load_model(steps / f"step_{n}")[1].state_dict()
        decay = min(0.8, n / (9 + n))  # the n-th update: (1 + (n - 1)) / (10 + (n - 1))
        moved = max((averaged[k] - previous[k]).abs().max().item() for k in averaged)
        assert moved > 1e-4
        for k, v in averaged.items():
            torch.testing.assert_close(v, decay * previous[k] + (1 - decay) * trained[k], rtol=0, atol=1e-6)
        previous = averaged

    # The two-rank run's step-2 checkpoint, resumed on one process: its average is the sharded one.
    shutil.rmtree(steps / "step_4")
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", COMMON + [f"data.corpus_dir={corpus_dir}",
                                                           f"train.run_dir={tmp_path / 'two'}", *sets])
    resumed = Trainer(cfg, progress=False)
    assert resumed.resume() and resumed.step == 3 and resumed.average.updates == 3
    _, at_two = load_model(steps / "step_3", weights="ema")
    at_two_state = at_two.state_dict()
    for k, v in resumed.average.state_dict().items():
        assert torch.equal(v, at_two_state[k]), k
