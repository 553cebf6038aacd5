"""``timers1 train``: train (or resume) a run; also under ``torchrun -m timers1.cli train``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from timers1.train.faults import PreemptionSignals

    # timers1.cli.main installed the handlers before anything else (entering again keeps them);
    # they go once training is over, so that a signal during export or evaluation ends the process.
    with getattr(args, "signals", None) or PreemptionSignals() as signals:
        from timers1 import rundir
        from timers1.config import load_config
        from timers1.train import Trainer

        overrides = list(args.set)
        if args.run_dir:
            overrides.append(f"train.run_dir={args.run_dir}")
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg, init_from=args.init_from, profile_dir=args.profile,
                          max_steps_this_run=args.max_steps, signals=signals)
        result = trainer.fit()
    if result.stopped_for_requeue:
        return result.exit_code
    if result.step >= cfg.train.steps:
        if trainer.rank == 0:
            print(f"exporting the model of step {result.step} to {rundir.model_dir(cfg.train.run_dir)}",
                  file=sys.stderr, flush=True)
        started = time.perf_counter()
        model_dir = trainer.export_model(rundir.model_dir(cfg.train.run_dir))
        if trainer.rank == 0:
            print(f"final model: {model_dir} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
        averaged_dir = trainer.export_averaged_model()
        if trainer.rank == 0 and averaged_dir is not None:
            print(f"averaged weights of step {result.step}: {averaged_dir}", file=sys.stderr, flush=True)
        best_dir = trainer.export_best_model()
        if trainer.rank == 0:
            if best_dir is not None:
                averaged = ", averaged weights" if trainer.val_best.get("weights") == "ema" else ""
                print(f"model of the best validation loss (step {trainer.val_best['step']}{averaged}): {best_dir}",
                      file=sys.stderr, flush=True)
            if not args.no_eval:
                from timers1.train.final_eval import evaluate_run

                evaluate_run(cfg, model_dir)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train or resume a Timer-S1 run",
        description="Train a Timer-S1 model, or resume its run from the newest checkpoint that loads; after "
                    "the last step export the model to RUN_DIR/model and score it (unless --no-eval). "
                    "Without data.corpus_dir it trains on the built-in corpus, built once into ~/.cache/timers1.",
        epilog="examples:\n"
               "  timers1 train --config configs/small_cpu.yaml\n"
               "  timers1 train --config configs/small_cpu.yaml --set train.steps=500 --run-dir runs/short\n"
               "  torchrun --nproc-per-node 2 -m timers1.cli train --config configs/tiny.yaml")
    p.add_argument("--config", type=Path, required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of a config field (e.g. train.lr=1e-3), repeatable")
    p.add_argument("--run-dir", help="where config, metrics and checkpoints go; shortcut for --set train.run_dir=DIR")
    p.add_argument("--init-from", help="initial weights: a timers1 checkpoint/model dir or the released HF dir")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of a few steps to DIR")
    p.add_argument("--max-steps", type=int, help="stop this invocation after N more steps (resume later)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after the last step")
    p.set_defaults(func=_train)
