"""The evaluation that closes a training run, through the GIFT-Eval harness and the forecast API.

With ``eval.data_dir`` set (a GIFT-8 directory, or a dataset YAML as ``timers1 eval`` reads),
the run is scored there. Otherwise it is scored on a held-out synthetic set: series from the
corpus generators under a seed the training corpus never uses, grouped by family and
frequency, scored with the same protocol (MASE on the median, 9-quantile CRPS, relative to
seasonal naive). That needs no download, so the README's main job can always evaluate.

Either way the run is also scored on the sanity suite (``timers1.eval.sanity``: obvious
patterns such as a trend with a weekly season; a second or two): ``sanity.json`` and the plot
``sanity.png`` beside ``eval.json``, and its table printed after the main one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from timers1.config import Config

# Added to data.seed for the held-out series: the training corpus is built from data.seed.
HELDOUT_SEED_OFFSET = 1_000_003
# (family, freq when the generator gives none, horizon in points)
HELDOUT_FAMILIES = [("hourly", "H", 48), ("seasonal", None, None), ("trend", "D", 30),
                    ("intermittent", "D", 30), ("random_walk", "D", 30), ("arma", "D", 30),
                    ("canonical", "D", 30), ("kernelsynth", "D", 30)]
DEFAULT_HORIZON = {"H": 48, "D": 30, "W": 8, "M": 12, "Q": 8, "Y": 6, "T": 48}


def heldout_specs(out_dir: str | Path, seed: int, series_per_family: int = 24, length_points: int = 768):
    """Write the held-out set as long-format CSVs and return their dataset specs."""
    from timers1.data.synthetic import generate
    from timers1.eval.datasets import DatasetSpec
    from timers1.eval.frequency import parse_frequency

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    for family, default_freq, horizon in HELDOUT_FAMILIES:
        by_freq: dict[str, list[pd.DataFrame]] = {}
        for index in range(series_per_family):
            values, freq = generate(family, seed, index, length_points)
            freq = freq or default_freq or "D"
            stamps = pd.date_range("2000-01-01", periods=len(values), freq=parse_frequency(freq).pandas_offset)
            by_freq.setdefault(freq, []).append(pd.DataFrame(
                {"item_id": f"{family}_{index}", "timestamp": stamps, "target": values.astype(np.float64)}))
        for freq, frames in sorted(by_freq.items()):
            h = horizon or DEFAULT_HORIZON.get(freq, 30)
            spec = DatasetSpec(f"heldout_{family}/{freq}", str(out_dir / f"{family}_{freq}.csv"), freq,
                               horizon=h, windows=1)
            if spec.resolved_seasonality() >= length_points - h:
                continue  # e.g. minutely data (m = 1440): seasonal naive, the reference, is undefined
            pd.concat(frames).to_csv(spec.path, index=False)
            specs.append(spec)
    return specs


def evaluate_run(cfg: Config, model_dir: str | Path, log=None):
    """Score a trained model directory; writes ``<run_dir>/eval.json`` and ``sanity.json`` (and
    ``sanity.png``), printing both tables. Returns the main report."""
    import timers1
    from timers1.eval import evaluate, gift8_specs, load_specs_yaml
    from timers1.eval.sanity import evaluate_sanity, plot_sanity

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    run_dir = Path(cfg.train.run_dir)
    context = cfg.eval.context_points or cfg.model.max_context_points
    forecaster = timers1.load_forecaster(model_dir, max_context_points=context, batch_size=cfg.eval.batch_size,
                                         mirror=cfg.eval.mirror, ensemble_contexts=cfg.eval.ensemble_contexts)
    if cfg.eval.data_dir:
        source = Path(cfg.eval.data_dir)
        specs = load_specs_yaml(source) if source.suffix in (".yaml", ".yml") else gift8_specs(source)
        name = f"GIFT ({source})"
    else:
        log(f"writing the held-out synthetic set to {run_dir / 'heldout_data'}")
        specs = heldout_specs(run_dir / "heldout_data", cfg.data.seed + HELDOUT_SEED_OFFSET)
        name = "held-out synthetic set"
    ensemble = "".join([", mirrored" if cfg.eval.mirror else "",
                        f", with contexts {cfg.eval.ensemble_contexts}" if cfg.eval.ensemble_contexts else ""])
    log(f"evaluating {model_dir} on the {name} ({len(specs)} configurations), context {context} points{ensemble}")
    # A bar per configuration on a terminal; a line as each one ends everywhere.
    report = evaluate(forecaster, specs, model_name=str(model_dir), batch_size=cfg.eval.batch_size,
                      max_context_points=context, log=log, progress=True)
    report.save(run_dir / "eval.json")
    log(report.format_table())
    sanity = evaluate_sanity(forecaster, model_name=str(model_dir), batch_size=cfg.eval.batch_size,
                             max_context_points=context)
    sanity.save(run_dir / "sanity.json")
    plot_sanity(sanity, run_dir / "sanity.png")
    log(sanity.format_table())
    log(f"wrote {run_dir / 'eval.json'}, {run_dir / 'sanity.json'} and {run_dir / 'sanity.png'}")
    return report
