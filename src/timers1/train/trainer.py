"""The training loop: one process per rank (torchrun), or a single process on a laptop.

Order of a step (each rank):
  1. ``grad_accum_steps`` microbatches of windows -> forward + backward (the engine hides
     pipeline/tensor/expert parallelism);
  2. gradient norm (clipped when ``train.grad_clip_norm`` > 0); a non-finite loss or norm
     skips the update (counted) and aborts after ``train.max_nonfinite_steps_in_row``;
  3. optimizer and LR-schedule step; metrics line; checkpoint at the interval;
  4. a pending SIGUSR1/SIGTERM turns into "save now, exit with REQUEUE_EXIT_CODE".

Resume is automatic: the latest complete checkpoint in ``<run_dir>/checkpoints`` is loaded,
including optimizer, schedule, data-loader position and RNG states, so the loss sequence
continues exactly as if the run had not stopped. At another parallel layout the tensors are
resharded by DCP and the loader restarts at the same global sample position.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from timers1 import rundir
from timers1.config import Config, ConfigError, save_config
from timers1.model import build_model
from timers1.model.flops import train_flops_per_patch
from timers1.parallel.engine import build_engine
from timers1.train.checkpoint import CheckpointManager, checkpoint_keys, rng_state, set_rng_state
from timers1.train.faults import REQUEUE_EXIT_CODE, NonFiniteGuard, PreemptionSignals
from timers1.train.metrics import MetricsLogger, expert_load_stats, measure_peak_tflops, memory_stats
from timers1.train.optim import PartOptimizers


# Files in the run dir that talk to the launcher (launch/common.sh, which clears both before
# starting): STOP asks every rank to checkpoint and exit; REQUEUE (holding the step) says the
# run stopped on purpose and wants to be requeued.
STOP_FILE = "STOP"
REQUEUE_FILE = "REQUEUE"


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


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _is_dist() else (0, 1)


class Trainer:
    def __init__(self, cfg: Config, init_from: str | None = None, profile_dir: str | None = None,
                 progress: bool | None = None, max_steps_this_run: int | None = None):
        self.cfg = cfg
        self.device = init_device()
        self.rank, self.world_size = _world()
        self.run_dir = Path(cfg.train.run_dir)
        self.profile_dir = profile_dir
        self.max_steps_this_run = max_steps_this_run
        self.progress = sys.stderr.isatty() if progress is None else progress
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, rundir.config_file(self.run_dir))

        t = cfg.train
        self.patch = cfg.model.patch_points
        self.context_points = cfg.data.context_points
        self.window_points = self.context_points + (cfg.model.num_stp_blocks + 1) * self.patch

        # Same initial weights on every rank: seeded init before any sharding.
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.moe, device="cpu", seed=t.seed)
        init_path = init_from or cfg.checkpoint.init_from
        if init_path:
            from timers1.forecast import load_model

            _, source = load_model(init_path)
            missing = model.load_state_dict(source.state_dict(), strict=True)
            del source, missing
        self.engine = build_engine(model.to(self.device), cfg, self.world_size, self.device)
        per_rank = self.engine.dp_size * t.grad_accum_steps
        if t.batch_size % per_rank:
            raise ConfigError(
                f"train.batch_size={t.batch_size}: must be divisible by data-parallel degree "
                f"{self.engine.dp_size} x train.grad_accum_steps={t.grad_accum_steps}"
            )
        self.micro_batch = t.batch_size // per_rank
        self.optim = PartOptimizers(self.engine.model_parts, t)
        self.loader = self._build_loader()
        self.checkpoints = CheckpointManager(rundir.checkpoints_dir(self.run_dir), cfg.checkpoint.keep_last,
                                             cfg.checkpoint.async_save)
        self.guard = NonFiniteGuard(t.max_nonfinite_steps_in_row)
        # Control-plane flags travel on gloo even when training runs NCCL (no device sync).
        self._cpu_group = dist.new_group(backend="gloo") if _is_dist() else None
        self.step = 0
        self._last_saved_step = -1
        self.flops_per_patch = train_flops_per_patch(cfg.model, cfg.moe, self.context_points // self.patch)
        self.peak_tflops = t.peak_tflops or measure_peak_tflops(self.device)
        # Seed dropout etc. per rank so ranks differ but runs repeat.
        torch.manual_seed(t.seed * 1000003 + self.rank)

    # ------------------------------------------------------------------------------- data
    def _build_loader(self):
        from timers1.data import ensure_default_corpus, make_loader

        corpus = self.cfg.data.corpus_dir or str(ensure_default_corpus(seed=self.cfg.data.seed))
        return make_loader(self.cfg.data, corpus, self.window_points, self.micro_batch,
                           self.engine.dp_rank, self.engine.dp_size,
                           truncate_min_points=self.window_points - self.context_points + self.patch)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_batches"):
            self._batches = iter(self.loader)
        batch = next(self._batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.optim.model_state_dict(),
            "optim": self.optim.state_dict(),
            "train": {
                "step": self.step,
                "world_size": self.world_size,
                "scheduler": pickle.dumps(self.optim.scheduler_state()),
                "nonfinite_skipped": self.guard.skipped_total,
            },
            f"rank_{self.rank}": {
                "rng": pickle.dumps(rng_state()),
                "loader": pickle.dumps(self.loader.state_dict()),
            },
        }

    def save(self, blocking: bool = False) -> None:
        self.checkpoints.save(self.step, self._state(), blocking=blocking)
        self._last_saved_step = self.step

    def resume(self) -> bool:
        path = self.checkpoints.latest()
        if path is None:
            return False
        keys = checkpoint_keys(path)
        state = self._state()
        own = f"rank_{self.rank}"
        # The same layout restores this rank's own stream and RNG exactly. At another layout the
        # loader state of rank 0 carries the global sample position (every rank consumed the
        # same number of batches), from which the loader continues at the new layout.
        same_layout = int(self._saved_world_size(path)) == self.world_size and own in keys
        source = own if same_layout else "rank_0"
        state[source] = state.pop(own)
        self.checkpoints.load(path, state)
        self.optim.load_model_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        train = state["train"]
        self.step = int(train["step"])
        self.optim.load_scheduler_state(pickle.loads(train["scheduler"]))
        self.guard.skipped_total = int(train["nonfinite_skipped"])
        self.loader.load_state_dict(pickle.loads(state[source]["loader"]))
        if same_layout:
            set_rng_state(pickle.loads(state[source]["rng"]))
        else:
            torch.manual_seed(self.cfg.train.seed * 1000003 + self.rank + 7919 * self.step)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}"
                  f"{'' if same_layout else f' (resharded to {self.world_size} ranks)'}", file=sys.stderr)
        return True

    @staticmethod
    def _saved_world_size(path: Path) -> int:
        probe = {"train": {"world_size": 0}}
        CheckpointManager.load(path, probe)
        return int(probe["train"]["world_size"])

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
        applied = self.guard.check(loss, grad_norm, self.step)
        if applied:
            self.optim.step()
        else:
            self.optim.zero_grad()
        # A skipped update still advances the schedule (it is a function of the step).
        self.optim.schedule_step()
        record = {**totals, "loss": loss, "grad_norm": grad_norm, "skipped": not applied}
        if _is_dist():
            dist.all_reduce(load, group=self._cpu_group)  # host counts: gloo also under NCCL
        record.update(expert_load_stats(load))
        return record

    def _stop_requested(self, signals: PreemptionSignals) -> bool:
        """A signal to this process or a STOP file in the run dir; all ranks agree on it."""
        stop = signals.received is not None or (self.run_dir / STOP_FILE).exists()
        if _is_dist():
            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group)
            stop = bool(flag.item())
        return stop

    def fit(self) -> TrainResult:
        t = self.cfg.train
        self.resume()
        logger = MetricsLogger(self.run_dir, enabled=self.rank == 0)
        losses: list[float] = []
        exit_code = 0
        stopped = False
        start_step = self.step
        stop_at = t.steps if self.max_steps_this_run is None else min(t.steps, self.step + self.max_steps_this_run)
        bar = None
        if self.rank == 0 and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            with PreemptionSignals() as signals, self._profiler() as profiler:
                while self.step < stop_at:
                    started = time.perf_counter()
                    record = self.train_step()
                    self.step += 1
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
                        "mfu": self.flops_per_patch * patches / elapsed / (self.peak_tflops * 1e12 * self.world_size),
                        **memory_stats(self.device),
                    })
                    if self.step % t.log_interval_steps == 0 or self.step == stop_at:
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
                    if self._stop_requested(signals):
                        self.save(blocking=True)
                        # Under torchrun a non-zero exit would make the agent restart the
                        # workers; there the REQUEUE file alone tells the launcher.
                        exit_code = 0 if os.environ.get("TORCHELASTIC_RUN_ID") else REQUEUE_EXIT_CODE
                        stopped = True
                        if self.rank == 0:
                            (self.run_dir / REQUEUE_FILE).write_text(str(self.step))
                            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
                            print(f"stop requested: saved step {self.step}, exiting for requeue",
                                  file=sys.stderr, flush=True)
                        break
                    if interval and self.step % interval == 0 and self.step < t.steps:
                        self.save()
                # The end of the run, or of this invocation (--max-steps): the next one resumes here.
                if not stopped and self.step > start_step and self.step != self._last_saved_step:
                    self.save(blocking=True)
        finally:
            self.checkpoints.wait()
            logger.close()
            if bar is not None:
                bar.close()
        return TrainResult(self.step, exit_code, stopped, self.run_dir, losses[-1] if losses else None, losses)

    def export_model(self, out_dir: str | Path) -> Path:
        """Write the newest checkpoint's weights as a model directory (config.yaml + model.safetensors).

        Rank 0 reads the sharded checkpoint whole, so every layout (pipeline stages included)
        exports the same full model.
        """
        from timers1.forecast import load_model
        from timers1.hf import write_model_dir

        self.checkpoints.wait()
        if self.rank == 0:
            cfg, model = load_model(self.checkpoints.latest())
            write_model_dir(out_dir, self.cfg, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
        if _is_dist():
            dist.barrier()
        return Path(out_dir)
