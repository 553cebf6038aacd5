"""`timers1 eval` (GIFT-Eval protocol, or the sanity suite) and `timers1 forecast` (quantile
forecasts of a file).

Both score or run a forecaster: a checkpoint through ``timers1.forecast.load_forecaster`` or,
for eval, a named baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from timers1.errors import InputError


def _load_checkpoint_forecaster(path: str, context_points: int = 0, **ensemble):
    """The model's forecaster; imported lazily so baselines work without the model stack.

    ``context_points`` (0: the model's own ``max_context_points``) also sets how much history
    the model reads, so a context sweep can go past the length it trained at. ``ensemble``:
    ``mirror`` and ``ensemble_contexts``, the ensemble at inference (``_ensemble_options``)."""
    if not Path(path).exists():
        raise InputError(f"--checkpoint {path}: does not exist")
    try:
        from timers1.forecast import load_forecaster
    except ImportError as exc:
        raise InputError(f"--checkpoint needs timers1.forecast.load_forecaster, which is not "
                         f"available here ({exc}); use --baseline instead") from None
    return load_forecaster(path, max_context_points=context_points or None, **ensemble)


def _ensemble_options(args: argparse.Namespace) -> dict:
    """The ensemble-at-inference options given on the command line (none: the plain forecaster)."""
    options = {}
    if args.mirror:
        options["mirror"] = True
    if args.ensemble_contexts:
        options["ensemble_contexts"] = list(args.ensemble_contexts)
    return options


def _add_ensemble_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mirror", action="store_true",
                        help="average with the forecasts of the negated series (an ensemble at inference)")
    parser.add_argument("--ensemble-contexts", nargs="+", type=_positive_int, metavar="N",
                        help="average with the forecasts from these context lengths too (an ensemble at inference)")


def _resolve_specs(data: str, configs: list[str] | None):
    """``--data`` is a GIFT-8 folder (built-in configurations) or a dataset YAML."""
    from timers1.eval.datasets import DatasetError, gift8_specs, load_specs_yaml

    path = Path(data)
    if path.is_dir():
        specs = gift8_specs(path)
        missing = sorted({Path(s.path).name for s in specs if not Path(s.path).is_file()})
        if missing:
            raise DatasetError(f"--data {path}: not a GIFT-8 folder, missing {', '.join(missing)} "
                               "(or pass a dataset YAML)")
    elif path.suffix.lower() in (".yaml", ".yml"):
        specs = load_specs_yaml(path)
    else:
        raise DatasetError(f"--data {path}: expected a GIFT-8 data folder or a dataset .yaml")
    if configs:
        known = {s.name: s for s in specs}
        unknown = [c for c in configs if c not in known]
        if unknown:
            raise DatasetError(f"--configs: unknown configuration(s) {', '.join(unknown)}; "
                               f"known: {', '.join(known)}")
        specs = [known[c] for c in configs]
    return specs


def _check_eval_options(args: argparse.Namespace) -> None:
    """--data, --sanity and --validation each take their own options; name the one that does not belong."""
    if bool(args.checkpoint) == bool(args.baseline):
        raise InputError("give exactly one of --checkpoint DIR or --baseline NAME")
    if args.baseline and _ensemble_options(args):
        raise InputError("--mirror and --ensemble-contexts are ensembles of a model's forecasts: only with --checkpoint")
    if sum(map(bool, (args.data, args.sanity, args.validation))) != 1:
        raise InputError("give exactly one of --data PATH (GIFT-Eval protocol), --sanity (the sanity suite) or "
                         "--validation CONFIG (the held-out series of a run config's training corpus)")
    if args.validation:
        given = [flag for flag, value in (("--configs", args.configs), ("--compare", args.compare),
                                          ("--plot", args.plot)) if value]
        if given:
            raise InputError(f"{', '.join(given)}: only with --data or --sanity, not with --validation")
        if args.output and Path(args.output).suffix.lower() != ".json":
            raise InputError(f"--output {args.output}: validation scores are written as .json")
    elif args.sanity:
        given = [flag for flag, value in (("--configs", args.configs), ("--compare", args.compare)) if value]
        if given:
            raise InputError(f"{', '.join(given)}: only with --data, not with --sanity")
        if args.output and Path(args.output).suffix.lower() != ".json":
            raise InputError(f"--output {args.output}: the sanity suite writes .json")
    else:
        if not args.output:
            raise InputError("--output FILE (.json or .csv) is required with --data")
        if args.plot:
            raise InputError(f"--plot {args.plot}: only with --sanity (timers1 forecast --plot draws forecasts)")


def _eval_source(args: argparse.Namespace):
    """(forecaster or baseline factory, model name for the report)."""
    from timers1.eval.baselines import baseline_factory

    if args.baseline:
        return baseline_factory(args.baseline, n_jobs=args.jobs), args.baseline
    # runs/x/model, not "model": the run it came from
    forecaster = _load_checkpoint_forecaster(args.checkpoint, args.context_points, **_ensemble_options(args))
    return forecaster, str(args.checkpoint)


def run_sanity(args: argparse.Namespace, source, name: str) -> int:
    from timers1.eval.sanity import evaluate_sanity, plot_sanity

    report = evaluate_sanity(source, model_name=args.name or name, batch_size=args.batch_size,
                             max_context_points=args.context_points or None)
    if args.checkpoint:
        report.settings["checkpoint"] = str(args.checkpoint)
    print(report.format_table())
    written = []
    if args.output:
        report.save(args.output)
        written.append(args.output)
    if args.plot:
        plot_sanity(report, args.plot)
        written.append(args.plot)
    if written:
        print(f"\nwrote {' and '.join(written)}")
    return 0


def run_validation(args: argparse.Namespace, source, name: str) -> int:
    from timers1.config import load_config
    from timers1.eval.validation import score_validation

    cfg = load_config(args.validation)
    if not hasattr(source, "predict"):
        # A baseline is built per seasonality; corpus windows carry no frequency, so none.
        source = source(1)
        name = f"{name} (seasonality 1)"
    report = score_validation(source, cfg, model_name=args.name or name, batch_size=args.batch_size)
    print(report.format_table())
    if args.output:
        report.save(args.output)
        print(f"\nwrote {args.output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from timers1.eval.baselines import ForecastCache
    from timers1.eval.runner import compare_with_leaderboard, evaluate, format_comparison

    _check_eval_options(args)
    if args.sanity:
        return run_sanity(args, *_eval_source(args))
    if args.validation:
        return run_validation(args, *_eval_source(args))
    specs = _resolve_specs(args.data, args.configs)
    cache = None if args.no_cache else ForecastCache(args.cache_dir)
    source, name = _eval_source(args)
    report = evaluate(source, specs, model_name=args.name or name, batch_size=args.batch_size,
                      max_context_points=args.context_points or None, cache=cache,
                      log=lambda line: print(line, file=sys.stderr), progress=True)
    if args.checkpoint:
        report.settings["checkpoint"] = str(args.checkpoint)
    print(report.format_table())
    if args.compare:
        report.comparison = compare_with_leaderboard(report, args.compare)
        print()
        print(format_comparison(report.comparison))
    report.save(args.output)
    print(f"\nwrote {args.output}")
    return 0


def run_forecast(args: argparse.Namespace) -> int:
    from timers1.eval.datasets import frame_to_series, read_long_format
    from timers1.eval.forecasting import check_output_path, forecast_series, plot_forecasts, write_frame

    # Validate the paths and read the input before loading the model: bad input fails fast.
    check_output_path(args.output)
    series = frame_to_series(read_long_format(args.input))
    forecaster = _load_checkpoint_forecaster(args.checkpoint, args.context_points, **_ensemble_options(args))
    frame = forecast_series(forecaster, series, args.horizon, freq=args.freq, source=str(args.input),
                            batch_size=args.batch_size, max_context_points=args.context_points or None)
    write_frame(frame, args.output)
    if args.plot:
        plot_forecasts(series, frame, args.plot, args.max_series_plotted)
    print(f"wrote {frame['item_id'].nunique()} series x {args.horizon} steps to {args.output}"
          + (f"; plot {args.plot}" if args.plot else ""))
    return 0


def _int_at_least(minimum: int):
    """argparse type: an integer >= minimum, with a message naming the bad value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def register(sub) -> None:
    from timers1.eval.baselines import BASELINE_NAMES

    p = sub.add_parser("eval", help="score a checkpoint or a baseline with the GIFT-Eval protocol or the sanity suite",
                       description="Score a checkpoint or a baseline with the GIFT-Eval protocol "
                                   "(per-configuration MASE and CRPS, geometric means relative to "
                                   "seasonal naive), or on the sanity suite (--sanity: obvious "
                                   "patterns, each passed when the median beats seasonal naive "
                                   "against the noise-free truth and the 10-90%% band holds the "
                                   "truth on most of the horizon).",
                       epilog="examples:\n"
                              "  timers1 eval --checkpoint runs/small_cpu --data ../shared/data/gift8 --output gift8.json\n"
                              "  timers1 eval --baseline auto_ets --data configs/eval_extra.yaml --output extra.csv\n"
                              "  timers1 eval --checkpoint runs/small_cpu/model --sanity --output s.json --plot s.png")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint, loaded by timers1.forecast.load_forecaster")
    src.add_argument("--baseline", choices=BASELINE_NAMES, help="score a baseline instead of a checkpoint")
    p.add_argument("--data",
                   help="GIFT-8 folder (e.g. ../shared/data/gift8) or a dataset YAML (configs/eval_extra.yaml)")
    p.add_argument("--sanity", action="store_true",
                   help="score the built-in sanity suite (trend, level shift, growth, ...) instead of --data")
    p.add_argument("--validation", metavar="CONFIG.yaml",
                   help="score the held-out series of this run config's training corpus instead of --data "
                        "(where inference choices such as --mirror are made)")
    p.add_argument("--configs", nargs="+", metavar="NAME", help="only these configurations (e.g. m4_hourly/H/short)")
    p.add_argument("--output", help="results file: .json or .csv (required with --data; optional .json with --sanity)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="with --sanity: a grid of history, truth, median and 10-90%% band per pattern and seed")
    p.add_argument("--compare", metavar="CSV", help="leaderboard_per_config.csv: rank among published models")
    p.add_argument("--name", help="model name in the results (default: the checkpoint path or the baseline)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="series per predict call")
    p.add_argument("--context-points", type=_non_negative_int, default=0,
                   help="truncate contexts to the most recent N points (0: whole history)")
    _add_ensemble_options(p)
    p.add_argument("--jobs", type=_positive_int, default=1, help="processes for statsforecast baselines")
    p.add_argument("--cache-dir", help="baseline forecast cache (default $TIMERS1_CACHE_DIR or ~/.cache/timers1)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the baseline cache")
    p.set_defaults(func=run_eval)

    f = sub.add_parser("forecast", help="quantile forecasts of a long-format file",
                       description="Forecast every series of a long-format file (item_id, timestamp, "
                                   "target; CSV or Parquet): quantiles 0.1..0.9 per future step, "
                                   "non-decreasing in every row.",
                       epilog="example:\n  timers1 forecast --checkpoint runs/small_cpu --input series.csv "
                              "--horizon 48 --output forecast.csv --plot forecast.png")
    f.add_argument("--checkpoint", required=True, help="model checkpoint (timers1.forecast.load_forecaster)")
    f.add_argument("--input", required=True, help="long-format .csv/.csv.gz/.parquet")
    f.add_argument("--horizon", required=True, type=_positive_int, help="steps to forecast")
    f.add_argument("--output", required=True, help="forecasts: .csv/.csv.gz/.parquet")
    f.add_argument("--plot", metavar="FILE.png", help="draw history, median and 10-90%% band")
    f.add_argument("--max-series-plotted", type=_positive_int, default=4, help="series in the plot")
    f.add_argument("--freq", help="frequency of every series (default: inferred per series)")
    f.add_argument("--batch-size", type=_positive_int, default=64, help="series per predict call")
    f.add_argument("--context-points", type=_non_negative_int, default=0,
                   help="truncate contexts to the most recent N points (0: whole history)")
    _add_ensemble_options(f)
    f.set_defaults(func=run_forecast)
