"""The training loop: one process per rank (torchrun), or a single process on a laptop.

Order of a step (each rank):
  1. ``grad_accum_steps`` microbatches of windows -> forward + backward (the engine hides
     pipeline/tensor/expert parallelism);
  2. gradient norm (clipped when ``train.grad_clip_norm`` > 0); the step guard skips the
     update (counted, logged) when the loss or norm is not finite or spikes above a multiple
     of its running median, and aborts after too many skipped steps in a row;
  3. optimizer and LR-schedule step; metrics line (steps count from 1, in messages too);
     checkpoint at the interval;
  4. before the next step: a pending SIGUSR1/SIGTERM or STOP file turns into "save now, exit
     with REQUEUE_EXIT_CODE", and a failed asynchronous save is raised.

Validation (``eval.val_interval_steps`` > 0): every that many steps and at the last one, the
fixed windows of the corpus's held-out series (``timers1.data.loader.validation_windows``;
never trained on; with ``eval.val_context_points``, also the same windows cut to short contexts,
``val_loss`` then being the mean over these views; ``val_loss_real`` the same over the windows of
real sources alone) are scored with the training objective in
eval mode without gradients (``Engine.forward_only``): ``val_loss``, ``val_loss_ntp``, ... join
that step's metrics line, with the best validation loss so far and its step, which
``<run_dir>/val_best.json`` also holds (with ``eval.val_keep_best``, that step's weights are
kept for ``<run_dir>/model_best``). With ``train.ema_decay`` the averaged weights
(``timers1.train.averaging``) are scored too (``val_ema_*``), and whichever of the two scores
better can be the best. Where the full view's windows come from, by source and real
or synthetic, is printed at start-up and written to ``<run_dir>/val_sources.json`` (the short
views cut the same windows).
The RNG state is restored afterwards, so validating changes no training batch or draw.

A checkpoint is never written from weights that produced a skipped step: the interval save
is held back (written, not committed) until the next step is applied, dropped if it is
skipped, and postponed while the current weights are the ones that produced a skipped step.

Resume is automatic: the newest checkpoint in ``<run_dir>/checkpoints`` that is complete and
loads is used (newer ones that are not are named, with the reason, and skipped), including
optimizer, schedule, data-loader position, guard and RNG states, so the loss sequence
continues exactly as if the run had not stopped. At another parallel layout the tensors are
resharded by DCP and the loader restarts at the same global sample position.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from timers1 import rundir
from timers1.config import Config, ConfigError, save_config
from timers1.errors import CheckpointError, InputError, TrainingDiverged
from timers1.host_memory import keep_freed_host_memory
from timers1.model import build_model
from timers1.model.flops import train_flops_per_patch
from timers1.parallel.engine import build_engine, uses_bf16
from timers1.train.averaging import CHECKPOINT_KEY as EMA_KEY
from timers1.train.averaging import WeightAverage
from timers1.train.budget import TimeBudget
from timers1.train.checkpoint import CheckpointManager, checkpoint_keys, rng_state, set_rng_state
from timers1.train.faults import REQUEUE_EXIT_CODE, PreemptionSignals, StepGuard
from timers1.train.metrics import MetricsLogger, PeakFlops, expert_load_stats, memory_stats
from timers1.train.optim import PartOptimizers


# Files in the run dir that talk to the launcher (launch/common.sh, which clears both before
# starting): STOP asks every rank to checkpoint and exit; REQUEUE (holding the step the next
# start resumes from) says the run stopped on purpose and wants to be requeued. The trainer
# clears REQUEUE, and a STOP older than its signal handlers, at start.
STOP_FILE = "STOP"
REQUEUE_FILE = "REQUEUE"
# What the time budget reads (tests replace it with a scripted clock).
budget_clock = time.monotonic

# The best validation loss so far ({"step", "val_loss", ...}) and, with eval.val_keep_best, the
# checkpoint of its weights; checkpoints, not GIFT or any evaluation set, are chosen on these.
VAL_BEST_FILE = "val_best.json"
# The validation windows by source (``timers1.data.validation_sources``); fit writes it.
VAL_SOURCES_FILE = "val_sources.json"
BEST_CHECKPOINT_DIR = "checkpoints_best"
BEST_MODEL_DIR = "model_best"
# The averaged weights of the last step (train.ema_decay), beside the trained ones in <run_dir>/model.
EMA_MODEL_DIR = "model_ema"

CORPUS_HINT = "check data.corpus_dir (rebuild it with `timers1 data build`), or leave it empty for the built-in corpus"
NO_CHECKPOINT_LOADS_HINT = ("move the listed checkpoints out of the way to start from step 0, or copy a good "
                            "step_<N> directory into it")


@dataclass
class TrainResult:
    step: int
    exit_code: int
    stopped_for_requeue: bool
    run_dir: Path
    last_loss: float | None
    losses: list[float]


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_device() -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on CUDA, gloo on CPU);
    a single process needs none. Returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from timers1.parallel import init_distributed

        return init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _is_dist() else (0, 1)


class Trainer:
    def __init__(self, cfg: Config, init_from: str | None = None, profile_dir: str | None = None,
                 progress: bool | None = None, max_steps_this_run: int | None = None,
                 signals: PreemptionSignals | None = None):
        # Handlers before anything slow (process group, model build, corpus, resume): a signal
        # during start-up becomes a requeue before the first step instead of killing the process.
        # `timers1 train` installs them even earlier and passes them in; they go at fit()'s end.
        self.signals = signals if signals is not None else PreemptionSignals().__enter__()
        self._own_signals = signals is None
        keep_freed_host_memory()  # also for in-process users (tests, notebooks); see host_memory
        self.cfg = cfg
        self.device = init_device()
        self.rank, self.world_size = _world()
        self.run_dir = Path(cfg.train.run_dir)
        # The budget's clock starts first: model build, corpus open and warm-up count against it.
        self.budget = (TimeBudget(cfg, self.run_dir, self.rank, clock=budget_clock)
                       if cfg.train.time_budget_minutes else None)
        self.profile_dir = profile_dir
        self.max_steps_this_run = max_steps_this_run
        self.progress = sys.stderr.isatty() if progress is None else progress
        # Nothing in the run dir changes before the initial weights, the corpus and the checkpoint
        # to resume from have loaded: config.yaml is written and old control files are cleared
        # in fit(), after resume(). (A bad --init-from used to leave a new run dir behind.)

        t = cfg.train
        self.patch = cfg.model.patch_points
        self.context_points = cfg.data.context_points
        self.window_points = cfg.window_points

        # Same initial weights on every rank: seeded init before any sharding.
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.moe, device="cpu", seed=t.seed)
        init_path = init_from or cfg.checkpoint.init_from
        if init_path:
            from timers1.forecast import load_model

            if not Path(init_path).exists():
                given = "--init-from" if init_from else "checkpoint.init_from"
                raise InputError(f"{given} {init_path}: does not exist",
                                 hint="give a run directory, a checkpoints/step_<N> or model directory, "
                                      "or the released Hugging Face directory")
            _, source = load_model(init_path)
            model.load_state_dict(source.state_dict(), strict=True)
            del source
        self.engine = build_engine(model.to(self.device), cfg, self.world_size, self.device)
        per_rank = self.engine.dp_size * t.grad_accum_steps
        if t.batch_size % per_rank:
            raise ConfigError(
                f"train.batch_size={t.batch_size}: must be divisible by data-parallel degree "
                f"{self.engine.dp_size} x train.grad_accum_steps={t.grad_accum_steps}"
            )
        self.micro_batch = t.batch_size // per_rank
        self.optim = PartOptimizers(self.engine.model_parts, t)
        self.average = WeightAverage(self.engine.model_parts, t.ema_decay) if t.ema_decay > 0 else None
        try:
            self.loader = self._build_loader()
        except InputError as exc:
            exc.hint = exc.hint or CORPUS_HINT
            raise
        self._build_validation()
        self.checkpoints = CheckpointManager(rundir.checkpoints_dir(self.run_dir), cfg.checkpoint.keep_last,
                                             cfg.checkpoint.async_save)
        self.guard = StepGuard(t.max_nonfinite_steps_in_row, t.spike_factor, t.spike_window, t.max_spike_steps_in_row)
        # Control-plane flags travel on gloo even when training runs NCCL (no device sync).
        self._cpu_group = dist.new_group(backend="gloo") if _is_dist() else None
        if self.budget is not None:
            self.budget.group = self._cpu_group
            self.budget.val_windows_per_train_batch = sum(
                len(v) for _, v, _ in self.val_views + self.val_views_real) / t.batch_size * self._weight_sets
        self.step = 0
        self._last_saved_step = -1
        # An interval save that is due but waits for weights that produced an applied step.
        self._save_due = False
        self.flops_per_patch = train_flops_per_patch(cfg.model, cfg.moe, self.context_points // self.patch)
        self.peak = PeakFlops(self.device, torch.bfloat16 if uses_bf16(cfg, self.device) else torch.float32,
                              t.peak_tflops)
        # Seed dropout etc. per rank so ranks differ but runs repeat.
        torch.manual_seed(t.seed * 1000003 + self.rank)

    # ------------------------------------------------------------------------------- data
    def _build_loader(self):
        from timers1.data import ensure_default_corpus, make_loader

        if not self.cfg.data.corpus_dir and self.rank == 0:
            print("opening the built-in corpus (the first run builds it into the cache: a minute or two on "
                  "2 cores)", file=sys.stderr, flush=True)
        corpus = self.cfg.data.corpus_dir or str(ensure_default_corpus(seed=self.cfg.data.seed))
        return make_loader(self.cfg.data, corpus, self.window_points, self.micro_batch,
                           self.engine.dp_rank, self.engine.dp_size,
                           truncate_min_points=self.window_points - self.context_points + self.patch)

    def _build_validation(self) -> None:
        """The fixed validation views (the full windows, then each ``eval.val_context_points``
        cut), each padded cyclically to whole global batches of ``eval.val_batch_size`` (so every
        rank runs the same number of forwards); none when validation is off or the corpus holds
        out nothing."""
        e = self.cfg.eval
        self.val_views: list[tuple[int, np.ndarray, np.ndarray]] = []  # (context points, values, mask)
        self.val_views_real: list[tuple[int, np.ndarray, np.ndarray]] = []  # the same, real windows only
        self.val_sources: list[dict] = []  # timers1.data.validation_sources of the windows scored
        self.val_best: dict[str, Any] | None = None
        self.best_checkpoints: CheckpointManager | None = None
        if e.val_interval_steps <= 0 or e.val_windows <= 0:
            return
        from timers1.data import validation_real_windows, validation_sources, validation_windows

        dp = self.engine.dp_size
        microbatches = self.cfg.parallel.pp_microbatches if self.cfg.parallel.pp > 1 else 1
        if e.val_batch_size % (dp * microbatches):
            raise ConfigError(f"eval.val_batch_size={e.val_batch_size}: must be divisible by data-parallel degree "
                              f"{dp} x pipeline microbatches {microbatches}")
        corpus = self.loader.sampler.corpus
        values_NW, mask_NW = validation_windows(corpus, self.window_points, e.val_windows)
        if len(values_NW) == 0:
            if self.rank == 0:
                print(f"warning: {corpus.directory} holds out no series for validation (built before the split, "
                      f"or with validation_fraction 0); eval.val_interval_steps={e.val_interval_steps} has "
                      f"nothing to score; rebuild the corpus to validate", file=sys.stderr, flush=True)
            return
        self._report_validation_sources(validation_sources(corpus, self.window_points, e.val_windows))
        self.val_views, self.val_windows_distinct = self._validation_views(values_NW, mask_NW)
        # Real windows are a small share of the split; scored apart (val_loss_real) they show what
        # a choice does on real data, which the mean over all windows cannot.
        real_N = validation_real_windows(corpus, self.window_points, e.val_windows)
        if real_N.any() and not real_N.all():
            self.val_views_real, _ = self._validation_views(values_NW[real_N], mask_NW[real_N])
        if e.val_keep_best:
            self.best_checkpoints = CheckpointManager(self.run_dir / BEST_CHECKPOINT_DIR, keep_last=1,
                                                      async_save=False)

    def _validation_views(self, values_NW: np.ndarray, mask_NW: np.ndarray) -> tuple[list, int]:
        """([(context points, values, mask)], distinct windows): the full windows, then each
        ``eval.val_context_points`` cut, each padded cyclically to whole global batches."""
        from timers1.data import cut_context

        e = self.cfg.eval
        views = [(self.context_points, values_NW, mask_NW)]
        target_points = self.window_points - self.context_points
        views += [(n, *cut_context(values_NW, mask_NW, n, target_points)) for n in sorted(e.val_context_points)]
        padded = []
        for context, values, mask in views:
            if len(values) == 0:
                continue  # no held-out window observes more than this context: nothing to cut
            num_batches = -(-len(values) // e.val_batch_size)
            # np.resize repeats the windows from the first: the same padding at every evaluation.
            shape = (num_batches * e.val_batch_size, self.window_points)
            padded.append((context, np.resize(values, shape), np.resize(mask, shape)))
        return padded, sum(len(values) for _, values, _ in views)

    def _report_validation_sources(self, sources: list[dict]) -> None:
        """What validation chooses on, by source: one line at start-up (rank 0), and
        ``val_sources.json`` in the run dir once ``fit`` writes there. A split of synthetic
        families with a handful of real series scores something other than real data, and
        choices made on it inherit that."""
        self.val_sources = sources
        if self.rank != 0:
            return
        kinds = {kind: [e for e in sources if e["kind"] == kind] for kind in ("real", "synthetic")}
        parts = []
        for kind, entries in kinds.items():
            series, windows = sum(e["series"] for e in entries), sum(e["windows"] for e in entries)
            parts.append(f"{kind} {series} series / {windows} windows"
                         + (f" ({', '.join(e['source'] for e in entries[:3])}{', ...' if len(entries) > 3 else ''})"
                            if kind == "real" and entries else ""))
        print(f"validation split: {'; '.join(parts)} (by source: {VAL_SOURCES_FILE})", file=sys.stderr, flush=True)

    def _validate_view(self, values_NW: np.ndarray, mask_NW: np.ndarray) -> dict[str, float]:
        """The training loss parts on one view: the mean over its global batches. Every rank
        scores a disjoint share of each batch; the engine reduces the report as in training."""
        global_batch = self.cfg.eval.val_batch_size
        share = global_batch // self.engine.dp_size
        totals: dict[str, float] = {}
        num_batches = len(values_NW) // global_batch
        for b in range(num_batches):
            first = b * global_batch + self.engine.dp_rank * share
            rows = slice(first, first + share)
            result = self.engine.forward_only(torch.from_numpy(values_NW[rows]), torch.from_numpy(mask_NW[rows]))
            for key, value in result.loss_floats.items():
                totals[key] = totals.get(key, 0.0) + value / num_batches
        return totals

    def validate(self) -> dict[str, float]:
        """The training loss parts on the validation views, prefixed ``val_``: each the mean over
        the views (every rank gets the same numbers), and with more than one view each view's
        loss as ``val_loss_ctx<N>``; where the split mixes real and synthetic series, the loss of
        the real windows alone (the same views) as ``val_loss_real``."""
        started = time.perf_counter()
        training_rng = rng_state()  # eval mode draws nothing today; this keeps it so
        per_view = [(context, self._validate_view(values, mask)) for context, values, mask in self.val_views]
        set_rng_state(training_rng)
        out = {f"val_{key}": sum(totals[key] for _, totals in per_view) / len(per_view) for key in per_view[0][1]}
        if len(per_view) > 1:
            out.update({f"val_loss_ctx{context}": totals["loss"] for context, totals in per_view})
        if self.val_views_real:
            real = [self._validate_view(values, mask)["loss"] for _, values, mask in self.val_views_real]
            out["val_loss_real"] = sum(real) / len(real)
        out["val_windows"] = self.val_windows_distinct
        out["val_seconds"] = time.perf_counter() - started
        return out

    @property
    def _weight_sets(self) -> int:
        """Weights each validation scores: the trained ones, and their average when kept."""
        return 2 if self.average is not None else 1

    def _record_validation(self, record: dict[str, Any]) -> None:
        """Validate (the trained weights, and their average as ``val_ema_*``), keep the best of
        either (file, checkpoint) and add the numbers to this step's record."""
        scores = self.validate()
        seconds = scores["val_seconds"]
        candidates = {"trained": {k: v for k, v in scores.items() if k.startswith("val_loss")}}
        if self.average is not None:
            with self.average.swapped_in():
                averaged = self.validate()
            seconds += averaged["val_seconds"]
            candidates["ema"] = {k: v for k, v in averaged.items() if k.startswith("val_loss")}
            scores.update({f"val_ema_{k[len('val_'):]}": v for k, v in candidates["ema"].items()})
        if self.budget is not None:
            self.budget.validation_timed(seconds)
        weights, losses = min(candidates.items(), key=lambda item: _finite_or_inf(item[1]["val_loss"]))
        val_loss = losses["val_loss"]
        if math.isfinite(val_loss) and (self.val_best is None or val_loss < self.val_best["val_loss"]):
            self.val_best = {"step": self.step, "weights": weights, **losses}
            if self.best_checkpoints is not None:
                chosen = self.average.state_dict() if weights == "ema" else self.optim.model_state_dict()
                self.best_checkpoints.save(self.step, {"model": chosen}, blocking=True)
                if self.rank == 0:  # one best: earlier ones, and later ones of a run redone from a checkpoint, go
                    for step, path in rundir.step_dirs(self.best_checkpoints.directory):
                        if step != self.step:
                            shutil.rmtree(path, ignore_errors=True)
            if self.rank == 0:
                rundir.write_json(self.run_dir / VAL_BEST_FILE, self.val_best)
        record.update(scores)
        if self.val_best is not None:
            record["val_best_loss"], record["val_best_step"] = self.val_best["val_loss"], self.val_best["step"]
            record["val_best_weights"] = self.val_best.get("weights", "trained")
        if self.rank == 0:
            real = f", real {scores['val_loss_real']:.5f}" if "val_loss_real" in scores else ""
            ema = f"; averaged weights {scores['val_ema_loss']:.5f}" if "val_ema_loss" in scores else ""
            best_weights = " (averaged)" if record.get("val_best_weights") == "ema" else ""
            print(f"step {self.step}: val_loss {scores['val_loss']:.5f} (ntp {scores['val_loss_ntp']:.5f}{real}){ema} "
                  f"on {scores['val_windows']} held-out windows in {seconds:.1f} s; best "
                  f"{record.get('val_best_loss', float('nan')):.5f} at step {record.get('val_best_step')}{best_weights}",
                  file=sys.stderr, flush=True)

    def _load_val_best(self) -> None:
        """The best validation of the steps kept (a run redoing steps past its checkpoint finds
        their scores again)."""
        try:
            best = json.loads((self.run_dir / VAL_BEST_FILE).read_text())
        except (OSError, ValueError):
            return
        if isinstance(best, dict) and isinstance(best.get("step"), int) and best["step"] <= self.step:
            self.val_best = best

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_batches"):
            self._batches = iter(self.loader)
        batch = next(self._batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _clear_control_files(self) -> None:
        """REQUEUE describes an earlier process; so does a STOP older than our signal handlers
        (one touched since is a request made during start-up and is honoured)."""
        (self.run_dir / REQUEUE_FILE).unlink(missing_ok=True)
        stop = self.run_dir / STOP_FILE
        try:
            if stop.stat().st_mtime < self.signals.installed_at:
                stop.unlink()
                print(f"removed {stop} left by an earlier run", file=sys.stderr)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------- checkpoints
    @property
    def layout(self) -> str:
        return self.engine.dims.layout

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.optim.model_state_dict(),
            "optim": self.optim.state_dict(),
            "train": {
                "step": self.step,
                "layout": self.layout,
                "scheduler": pickle.dumps(self.optim.scheduler_state()),
                "guard": pickle.dumps(self.guard.state_dict()),
            },
            f"rank_{self.rank}": {
                "rng": pickle.dumps(rng_state()),
                "loader": pickle.dumps(self.loader.state_dict()),
            },
            **({EMA_KEY: {"weights": self.average.state_dict(), "updates": self.average.updates}}
               if self.average is not None else {}),
        }

    def save(self, blocking: bool = False, hold: bool = False) -> None:
        self.checkpoints.save(self.step, self._state(), blocking=blocking, hold=hold)
        self._last_saved_step = self.step

    def _save_now(self) -> None:
        """A committed checkpoint of this step (end of run, stop request), unless there is nothing
        new (step 0, or the step resumed from) or these weights produced a skipped step."""
        if self.guard.in_row > 0:
            if self.rank == 0:
                print(f"step {self.step}: not saved, its weights produced a skipped step; the newest "
                      f"checkpoint stays step_{self._newest_checkpoint_step()}", file=sys.stderr, flush=True)
        elif self.step not in (0, self._last_saved_step):
            self.save(blocking=True)
        self.checkpoints.wait()  # commits a save of this step that was held

    def _newest_checkpoint_step(self) -> int:
        """Where the next start resumes (0: from scratch)."""
        found = rundir.list_checkpoints(self.checkpoints.directory)
        return found[-1][0] if found else 0

    def resume(self) -> bool:
        """Load the newest checkpoint that is complete and loads; name and skip newer ones.

        Raises ``CheckpointError`` when checkpoints exist but none loads: starting over would
        silently throw their progress away.
        """
        directory = rundir.checkpoints_dir(self.run_dir)
        skipped = []
        for _, path in reversed(rundir.step_dirs(directory)):
            problem = rundir.checkpoint_problem(path)
            if problem is None:
                try:
                    self._load(path)
                    return True
                except CheckpointError as exc:
                    problem = str(exc)
            skipped.append(f"{path.name}: {problem}")
            if self.rank == 0:
                print(f"skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
        if skipped:
            raise CheckpointError(f"no checkpoint under {directory} loads ({'; '.join(skipped)})",
                                  hint=NO_CHECKPOINT_LOADS_HINT)
        return False

    def _load(self, path: Path) -> None:
        keys = checkpoint_keys(path)
        saved_layout = self._saved_layout(path)
        state = self._state()
        own = f"rank_{self.rank}"
        # The same layout restores this rank's own stream and RNG exactly. At another layout the
        # loader state of rank 0 carries the global sample position (every rank consumed the
        # same number of batches), from which the loader continues at the new layout.
        same_layout = saved_layout == self.layout and own in keys
        source = own if same_layout else "rank_0"
        state[source] = state.pop(own)
        # Averaging turned on for a run whose checkpoints hold no average: it starts here.
        start_average = EMA_KEY in state and EMA_KEY not in keys
        if start_average:
            del state[EMA_KEY]
        self.checkpoints.load(path, state)
        self.optim.load_model_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        train = state["train"]
        self.step = int(train["step"])
        self.optim.load_scheduler_state(pickle.loads(train["scheduler"]))
        self.guard.load_state_dict(pickle.loads(train["guard"]))
        self.loader.load_state_dict(pickle.loads(state[source]["loader"]))
        if self.average is not None:
            if start_average:
                self.average.reset()
                if self.rank == 0:
                    print(f"{path} holds no averaged weights (train.ema_decay was 0): the average starts "
                          f"at its weights", file=sys.stderr, flush=True)
            else:
                self.average.updates = int(state[EMA_KEY]["updates"])
        if same_layout:
            set_rng_state(pickle.loads(state[source]["rng"]))
        else:
            torch.manual_seed(self.cfg.train.seed * 1000003 + self.rank + 7919 * self.step)
        self._last_saved_step = self.step
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}"
                  f"{'' if same_layout else f'; resharding from {saved_layout} to {self.layout}'}",
                  file=sys.stderr, flush=True)

    @staticmethod
    def _saved_layout(path: Path) -> str:
        probe = {"train": {"layout": ""}}
        CheckpointManager.load(path, probe)
        return str(probe["train"]["layout"])

    # ------------------------------------------------------------------------------- loop
    def _profiler(self):
        if not self.profile_dir:
            return contextlib.nullcontext(None)
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        return profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(self.profile_dir, worker_name=f"rank{self.rank}"),
                       record_shapes=True)

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        self.optim.zero_grad()
        totals: dict[str, float] = {}
        load = None
        for _ in range(t.grad_accum_steps):
            batch = self._next_batch()
            result = self.engine.forward_backward(batch["values"], batch["mask"], grad_scale=1.0 / t.grad_accum_steps)
            for key, value in result.loss_floats.items():
                totals[key] = totals.get(key, 0.0) + value / t.grad_accum_steps
            load = result.tokens_per_expert_LE if load is None else load + result.tokens_per_expert_LE
        grad_norm = self.engine.clip_grad_norm(t.grad_clip_norm if t.grad_clip_norm > 0 else float("inf"))
        loss = totals["loss"]
        # Loss and norm are global (reduced over ranks), so every rank takes the same decision.
        skip_reason = self.guard.check(loss, grad_norm, self.step + 1)
        if skip_reason is None:
            self.optim.step()
            if self.average is not None:
                self.average.update()
        else:
            self.optim.zero_grad()
            if self.rank == 0:
                print(f"step {self.step + 1}: skipped, {skip_reason} ({self.guard.in_row} in a row, "
                      f"{self.guard.skipped_total} in total)", file=sys.stderr, flush=True)
        # A skipped update still advances the schedule (it is a function of the step).
        self.optim.schedule_step()
        record = {**totals, "loss": loss, "grad_norm": grad_norm, "skipped": skip_reason is not None,
                  "skipped_total": self.guard.skipped_total}
        if skip_reason is not None:
            record["skip_reason"] = skip_reason
        if _is_dist():
            dist.all_reduce(load, group=self._cpu_group)  # host counts: gloo also under NCCL
        record.update(expert_load_stats(load))
        return record

    def _stop_requested(self) -> bool:
        """A signal to this process or a STOP file in the run dir; all ranks agree on it.

        Also where a failed asynchronous save surfaces (on every rank): at the first step
        boundary after it failed.
        """
        stop = self.signals.received is not None or (self.run_dir / STOP_FILE).exists()
        save_failed = self.checkpoints.failed()
        if _is_dist():
            flags = torch.tensor([float(stop), float(save_failed)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._cpu_group)
            stop, save_failed = bool(flags[0].item()), bool(flags[1].item())
        if save_failed:
            self.checkpoints.raise_failure()
        return stop

    def _stop_for_requeue(self) -> int:
        """Checkpoint (unless this is the step we started from) and leave REQUEUE for the launcher."""
        self._save_now()
        if self.rank == 0:
            resume_at = self._newest_checkpoint_step()
            (self.run_dir / REQUEUE_FILE).write_text(str(resume_at))
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
            print(f"stop requested: the next start resumes from step {resume_at}; exiting for requeue",
                  file=sys.stderr, flush=True)
        # Under torchrun a non-zero exit would make the agent restart the workers; there the
        # REQUEUE file alone tells the launcher.
        return 0 if os.environ.get("TORCHELASTIC_RUN_ID") else REQUEUE_EXIT_CODE

    def fit(self) -> TrainResult:
        t = self.cfg.train
        logger = bar = None
        losses: list[float] = []
        exit_code = 0
        stopped = finished = False
        try:
            self.resume()
            if self.val_views:
                self._load_val_best()
            if self.budget is not None and self.step > 0:
                self.budget.restore()
            if self.rank == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, rundir.config_file(self.run_dir))
                if self.val_views:
                    rundir.write_json(self.run_dir / VAL_SOURCES_FILE, self.val_sources)
                self._clear_control_files()
            if _is_dist():  # no rank looks for STOP before a stale one is gone
                dist.barrier(group=self._cpu_group)
            # Steps after the checkpoint are redone: their old lines go, so each step appears once.
            logger = MetricsLogger(self.run_dir, enabled=self.rank == 0, after_step=self.step)
            start_step = self.step
            invocation_end = math.inf if self.max_steps_this_run is None else self.step + self.max_steps_this_run
            stop_at = min(t.steps, invocation_end)
            if self.rank == 0 and self.progress:
                from tqdm import tqdm

                bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
            elif self.rank == 0 and self.step < stop_at:
                print(f"training steps {self.step + 1}-{stop_at} of {t.steps}, a line every {t.log_interval_steps} "
                      f"step(s); MFU against {self.peak.tflops:.3g} TFLOP/s ({self.peak.source} peak)",
                      file=sys.stderr, flush=True)
            if self.budget is not None:
                self.budget.start()
            with self._profiler() as profiler:
                while True:
                    # Before every step, the first included: a signal during start-up stops here.
                    if self._stop_requested():
                        exit_code, stopped = self._stop_for_requeue(), True
                        break
                    if self.step >= stop_at:
                        break
                    started = time.perf_counter()
                    record = self.train_step()
                    self.step += 1
                    applied = not record["skipped"]
                    # A held checkpoint of the previous step: its weights just trained on, or not.
                    self.checkpoints.resolve(keep=applied)
                    elapsed = time.perf_counter() - started
                    losses.append(record["loss"])
                    points = t.batch_size * self.context_points
                    patches = points // self.patch
                    record.update({
                        "step": self.step,
                        "lr": self.optim.lr,
                        "step_time_s": elapsed,
                        "points_per_s": points / elapsed,
                        "tokens_per_s": patches / elapsed,
                        "mfu": self.peak.mfu(self.flops_per_patch * patches / elapsed / self.world_size),
                        "peak_tflops": self.peak.tflops,
                        "peak_source": self.peak.source,
                        **memory_stats(self.device),
                    })
                    if self.budget is not None:
                        steps, why = self.budget.after_step(self.step)
                        if why is not None:
                            stop_at = min(steps, invocation_end)
                            record["planned_steps"] = steps
                            if self.rank == 0:
                                save_config(self.cfg, rundir.config_file(self.run_dir))
                                if bar is not None:
                                    bar.total = steps
                                    bar.refresh()
                                print(why, file=sys.stderr, flush=True)
                    val_every = self.cfg.eval.val_interval_steps
                    validating = bool(self.val_views) and (self.step % val_every == 0 or self.step == stop_at)
                    if validating:
                        self._record_validation(record)
                    if self.step % t.log_interval_steps == 0 or self.step == stop_at or not applied or validating:
                        logger.log(record)
                        if bar is not None:
                            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                        elif self.rank == 0:
                            print(f"step {self.step}/{t.steps} loss {record['loss']:.5f} "
                                  f"grad_norm {record['grad_norm']:.3f} lr {record['lr']:.3e} "
                                  f"points/s {record['points_per_s']:.0f}", file=sys.stderr, flush=True)
                    if bar is not None:
                        bar.update(1)
                    if profiler is not None:
                        profiler.step()
                    interval = self.cfg.checkpoint.save_interval_steps
                    self._save_due |= bool(interval) and self.step % interval == 0
                    if self._save_due and applied and self.step < stop_at:
                        self.save(hold=True)
                        self._save_due = False
                # The end of the run, or of this invocation (--max-steps): the next one resumes here.
                if not stopped and self.step > start_step:
                    self._save_now()
            self.checkpoints.wait()
            finished = True
        except TrainingDiverged:
            # The held checkpoint's weights produced the steps that were skipped up to the abort.
            self.checkpoints.resolve(keep=False)
            raise
        finally:
            if not finished:
                with contextlib.suppress(Exception):  # the error in flight is the one to report
                    self.checkpoints.wait()
            if logger is not None:
                logger.close()
            if bar is not None:
                bar.close()
            if self._own_signals:
                self.signals.__exit__(None, None, None)
        return TrainResult(self.step, exit_code, stopped, self.run_dir, losses[-1] if losses else None, losses)

    def export_model(self, out_dir: str | Path, checkpoint: str | Path | None = None, weights: str = "model") -> Path:
        """Write the newest checkpoint's weights (or ``checkpoint``'s; its averaged ones with
        ``weights="ema"``) as a model directory (config.yaml + model.safetensors).

        Rank 0 reads the sharded checkpoint whole, so every layout (pipeline stages included)
        exports the same full model.
        """
        from timers1.forecast import load_model
        from timers1.hf import write_model_dir

        self.checkpoints.wait()
        if self.rank == 0:
            cfg, model = load_model(checkpoint or self.checkpoints.latest(), weights=weights)
            write_model_dir(out_dir, self.cfg, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
        if _is_dist():
            dist.barrier()
        return Path(out_dir)

    def export_best_model(self) -> Path | None:
        """``<run_dir>/model_best`` from the checkpoint of the best validation loss (with
        ``eval.val_keep_best``); None when there is none."""
        if self.best_checkpoints is None or self.val_best is None:
            return None
        checkpoint = self.best_checkpoints.directory / rundir.step_dir_name(self.val_best["step"])
        if not checkpoint.is_dir():
            return None
        return self.export_model(self.run_dir / BEST_MODEL_DIR, checkpoint)

    def export_averaged_model(self) -> Path | None:
        """``<run_dir>/model_ema`` from the newest checkpoint's averaged weights; None without
        ``train.ema_decay``."""
        if self.average is None:
            return None
        return self.export_model(self.run_dir / EMA_MODEL_DIR, weights=EMA_KEY)
