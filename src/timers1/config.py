"""Typed run configuration: dataclasses, YAML loading, dotted overrides, validation.

One YAML file describes one run. Every section maps onto one dataclass below; every field is
documented where it is declared. Defaults describe the released Timer-S1 flagship (8.3B), so
instantiating ``Config()`` names a real model; CPU-sized runs come from ``configs/tiny.yaml``.

Errors name the field by its dotted path (``moe.top_k``) and the bad value, and the file when
the value came from one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from timers1.errors import InputError


class ConfigError(InputError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``field`` is the dotted path of the culprit when one field is to blame, so that the error
    can name where its value came from (a ``--set`` override or the YAML file).
    """

    def __init__(self, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.field = field


@dataclass
class ModelConfig:
    """The Timer-S1 architecture (released config.json names in brackets)."""

    patch_points: int = 16
    """Points per input patch token [input_token_len]; also the output patch length."""
    hidden_size: int = 1024
    """Model width D [hidden_size]."""
    num_layers: int = 24
    """Main TimeMoE blocks L [num_hidden_layers]."""
    num_stp_blocks: int = 16
    """TimeSTP blocks H, each predicting one patch further ahead [num_mtp_tokens]."""
    num_heads: int = 16
    """Attention heads; head dim = hidden_size / num_heads [num_attention_heads]."""
    intermediate_size: int = 4096
    """Patch-embedding hidden width; each expert's width is this // moe.top_k [intermediate_size]."""
    quantiles: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    """Predicted quantile levels, ascending; the median must be one of them [quantiles]."""
    rope_theta: float = 10000.0
    """RoPE base [rope_theta]."""
    dropout: float = 0.1
    """Dropout in the embedding, head and attention, train mode only [dropout_rate]."""
    init_std: float = 0.02
    """Std of the normal init of Linear weights; biases start at zero [initializer_range]."""
    max_context_points: int = 11520
    """Forecasting truncates contexts to the most recent this-many points."""

    @property
    def points_per_pass(self) -> int:
        """Points one forward pass forecasts: a patch from the main stack and one per TimeSTP block."""
        return (self.num_stp_blocks + 1) * self.patch_points


@dataclass
class MoEConfig:
    """Routing and experts of every TimeMoE block (main and STP)."""

    num_experts: int = 32
    """Experts E per block [num_experts]."""
    top_k: int = 2
    """Experts chosen per token K [num_experts_per_token]."""
    renormalize_weights: bool = False
    """Renormalize the K routing weights to sum to 1 (Timer-S1 does not)."""
    aux_loss_coef: float = 0.02
    """alpha of the Switch load-balancing loss; unpublished for Timer-S1, Time-MoE used 0.02."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (mean squared logsumexp of router logits); 0 disables it."""
    kernel_backend: str = "auto"
    """'auto' (Triton on CUDA tensors, PyTorch elsewhere), 'triton' or 'torch'."""


@dataclass
class DataConfig:
    """Training corpus and window sampling."""

    corpus_dir: str = ""
    """Directory of a compiled corpus (manifest + the memory-mapped series.bin/.idx that
    `timers1 data build` or `timers1 data compile` writes); empty means the built-in corpus."""
    context_points: int = 2880
    """Points the model sees per training window (a multiple of model.patch_points)."""
    seed: int = 0
    """Seed of the window sampler and augmentation."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    mixture_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per domain or source name; names not listed get weight 1."""
    flip_probability: float = 0.0
    """Probability of multiplying a whole window (input and target) by -1."""
    resample_probability: float = 0.0
    """Probability of Fourier-basis resampling a window to another rate."""
    resample_factors: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.5, 2.0])
    """Source points per window point when resampling (< 1 up-samples, > 1 down-samples); one is drawn per window."""
    mixup_probability: float = 0.0
    """Probability that a window becomes a TSMixup blend: a convex combination (Dirichlet weights) of itself and up to mixup_max_series - 1 windows of other series, each standardised first."""
    mixup_max_series: int = 3
    """Most series in one TSMixup blend (>= 2)."""
    truncate_probability: float = 0.0
    """Probability of keeping only a random-length (log-uniform) suffix of a window (at least one context patch), the rest padded: trains short contexts with their own normalisation, as short series meet the model at inference."""


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks; the product must equal the world size."""

    dp_replicate: int = 1
    """Replicated data-parallel groups (HSDP outer dimension)."""
    dp_shard: int = -1
    """FSDP sharding degree; -1 takes whatever the other dimensions leave."""
    tp: int = 1
    """Tensor (and sequence) parallel degree."""
    pp: int = 1
    """Pipeline stages."""
    ep: int = 1
    """Expert-parallel degree, carved out of dp_shard x tp."""
    pp_schedule: str = "1f1b"
    """'1f1b' or 'interleaved_1f1b'."""
    pp_microbatches: int = 4
    """Microbatches per step when pp > 1."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 100000
    """Optimizer steps to run."""
    time_budget_minutes: float = 0.0
    """Wall-clock budget of the run (0: none): after ``time_budget_probe_steps`` steps the trainer
    sets ``steps`` (never above the configured count, the cap) so that training ends within this
    many minutes of its start, validation included, re-estimating as it goes and moving the count
    down or back up as the machine's speed drifts (``timers1.train.budget``)."""
    time_budget_probe_steps: int = 50
    """Steps timed before the first budget decision; inside the warmup, the schedule up to then is unchanged."""
    batch_size: int = 256
    """Global windows per optimizer step (across ranks and accumulation)."""
    grad_accum_steps: int = 1
    """Microbatches accumulated per optimizer step on each rank."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 1000
    """Linear warmup steps."""
    schedule: str = "cosine"
    """'cosine' or 'wsd' (warmup-stable-decay)."""
    wsd_decay_fraction: float = 0.1
    """Fraction of steps spent decaying at the end of a 'wsd' schedule."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    stp_weighting: str = "uniform"
    """'uniform' (pre-training: 1/H sum_j) or 'inv_sqrt' (continued pre-training: 1/sqrt(j))."""
    norm_prefix_min_fraction: float = 0.0
    """0: normalise each window over its whole context and score every position. f > 0: normalise over its first c observed context patches, c uniform in [f n, n], and score only positions from there on, so no scored position sees statistics of its future (the leak teaches a pull to the context mean; see timers1.losses)."""
    wql_denominator: str = "abs_target"
    """wQL denominator per patch: 'abs_target' (the paper: sum of |target|, floored) or 'series_scale' (points x the window's std: equal weight for series far from zero; see timers1.losses)."""
    ema_decay: float = 0.0
    """0: off. d in (0, 1): keep an exponential moving average of the weights (decay min(d, (1 + n) / (10 + n)) after n applied steps; ~1 / (1 - d) steps wide), checkpointed beside them (``ema``), scored by validation beside them (``val_ema_*``) and eligible for ``model_best``; exported to ``<run_dir>/model_ema`` at the end (timers1.train.averaging)."""
    optimizer: str = "adamw"
    """'adamw' (torch) or 'deepspeed_cpu_adam' (host-offloaded states)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."""
    compile: bool = False
    """torch.compile each block's attention half (norms, attention, residual) and the quantile loss (fuses their elementwise work; a few seconds at start-up; needs a C++ compiler on CPU). Not with parallel.tp > 1."""
    max_nonfinite_steps_in_row: int = 5
    """Abort after this many consecutive skipped steps, the last with a non-finite loss or gradient norm."""
    spike_factor: float = 0.0
    """Skip a step whose loss or gradient norm exceeds this multiple of its median over the last train.spike_window applied steps; 0 disables the guard (10 is a reasonable value)."""
    spike_window: int = 20
    """Applied steps whose median the spike guard compares with; it judges once it has this many."""
    max_spike_steps_in_row: int = 5
    """Abort after this many consecutive skipped steps, the last a spike."""
    seed: int = 0
    """Seed of parameter init and dropout."""
    log_interval_steps: int = 1
    """Steps between metric lines."""
    run_dir: str = "runs/default"
    """Where the resolved config, metrics and checkpoints go."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, the denominator of MFU; 0: the peak `timers1 bench peak` cached for this machine, else the best of a few dense matmul measurements at start."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints."""

    save_interval_steps: int = 1000
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 3
    """Complete checkpoints kept on disk."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""
    init_from: str = ""
    """Checkpoint (ours or the released HF format) whose weights start this run."""


@dataclass
class EvalConfig:
    """Forecast evaluation after training."""

    data_dir: str = ""
    """GIFT-8 style data directory; empty skips the evaluation."""
    context_points: int = 0
    """Context used at evaluation; 0 means model.max_context_points."""
    batch_size: int = 64
    """Series per forward pass."""
    mirror: bool = False
    """Evaluate with the mirror ensemble at inference (``timers1.forecast``: each series' forecast
    averaged with its negation's, mapped back); ``timers1 eval --mirror`` elsewhere."""
    ensemble_contexts: list[int] = field(default_factory=list)
    """Average the forecasts from these context lengths in too (``timers1 eval --ensemble-contexts``)."""
    val_interval_steps: int = 0
    """Score the corpus's validation split (its held-out series, never trained on) every this
    many steps and at the last step; 0 turns it off. Where the split holds real and synthetic
    series, the real windows are also scored alone (``val_loss_real``; reported, not chosen on)."""
    val_windows: int = 256
    """Fixed validation windows (``timers1.data.loader.validation_windows``): the last
    context + horizon points of each held-out series first, then earlier windows of long ones."""
    val_context_points: list[int] = field(default_factory=list)
    """Also score the validation windows cut to their last N context points, one view per N
    (``timers1.data.loader.cut_context``): short series meet a forecaster far more often than
    the held-out series' full windows say. With views, ``val_loss`` (what picks the best step)
    is the mean of the views' losses, the full one included, each logged as ``val_loss_ctx<N>``."""
    val_batch_size: int = 32
    """Validation windows per forward pass over all data-parallel ranks (split like
    train.batch_size; must be divisible by the data-parallel degree)."""
    val_keep_best: bool = False
    """Keep the weights of the best validation loss and export them to ``<run_dir>/model_best``
    beside the final ``model`` (costs one model-only checkpoint per new best)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def window_points(self) -> int:
        """Points of one training (and validation) window: the context and what one pass forecasts."""
        return self.data.context_points + self.model.points_per_pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# Construction from plain data, with type checking that names the field.

def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check (and losslessly widen) ``value`` against the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}", field=path)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}", field=path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}", field=path)
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}", field=path)
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}", field=path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}", field=path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}", field=path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}", field=path)
    raise ConfigError(f"{path}: unsupported field type {tp}", field=path)


# Fields that older run directories may still hold: read and ignored so their checkpoints load,
# as long as they hold a value that meant what the code now does (None: any value).
RETIRED_FIELDS: dict[str, tuple[Any, str]] = {
    # RoPE tables are computed per call; only the HF format keeps it.
    "model.max_position_embeddings": (None, ""),
    "train.min_prefix_fraction": (0.0, "it scored late positions but still normalised them with the whole "
                                       "window's statistics; train.norm_prefix_min_fraction replaced it"),
}


def _drop_retired(data: dict[str, Any], path: str) -> dict[str, Any]:
    kept = {}
    for key, value in data.items():
        field = f"{path}.{key}"
        if field not in RETIRED_FIELDS:
            kept[key] = value
            continue
        inert, why = RETIRED_FIELDS[field]
        if inert is not None and value != inert:
            raise ConfigError(f"{field}: {value!r} is no longer supported ({why}); remove it", field=field)
    return kept


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}", field=path or None)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = _drop_retired(data, path)
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown field(s) {', '.join(where + u for u in unknown)}; "
            f"known: {', '.join(sorted(names))}",
            field=where + unknown[0],
        )
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, sub)
        else:
            kwargs[name] = _coerce(value, tp, sub)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML)."""
    return validate(_build(Config, data or {}, ""))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.field=value")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if any(not k for k in keys):
        raise ConfigError(f"override {item!r} has an empty field name")
    # YAML parses the value so that 2 is an int, 1e-3 a float, true a bool, [1,2] a list.
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    # PyYAML reads 1e-3 as a string (YAML 1.1); accept it as the float it obviously is.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to nested plain data, in order."""
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path, what: str = "config file", error: type[InputError] = ConfigError) -> Any:
    """Parse a YAML file; a missing file or bad YAML raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        source = _source_of(exc.field, overrides) or path
        if source is not None:
            raise ConfigError(f"{source}: {exc}", field=exc.field, hint=exc.hint) from None
        raise


def _source_of(field_path: str | None, overrides: list[str] | None) -> str | None:
    """``--set KEY=VALUE`` if the last override touching ``field_path`` gave its value, else None."""
    if field_path is None:
        return None
    for item in reversed(overrides or []):
        key = item.split("=", 1)[0].strip()
        if field_path == key or field_path.startswith((key + ".", key + "[")):
            return f"--set {item}"
    return None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous file, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Validation: every rule names the field and the value.

def _require(ok: bool, field_path: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{field_path}={value!r}: {why}", field=field_path)


def validate(cfg: Config) -> Config:
    m, moe, d, p, t, c = cfg.model, cfg.moe, cfg.data, cfg.parallel, cfg.train, cfg.checkpoint
    for name in ("patch_points", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_context_points"):
        _require(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
    _require(m.num_stp_blocks >= 0, "model.num_stp_blocks", m.num_stp_blocks, "must be >= 0")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
             f"must divide model.hidden_size={m.hidden_size}")
    head_dim = m.hidden_size // m.num_heads
    _require(head_dim % 2 == 0, "model.num_heads", m.num_heads,
             f"gives an odd head dim {head_dim}; RoPE needs an even one")
    q = m.quantiles
    _require(len(q) >= 1 and all(0.0 < x < 1.0 for x in q) and q == sorted(q) and len(set(q)) == len(q),
             "model.quantiles", q, "must be distinct, ascending, strictly between 0 and 1")
    _require(any(math.isclose(x, 0.5) for x in q), "model.quantiles", q, "must contain 0.5 (the median)")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _require(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")

    _require(moe.num_experts >= 1, "moe.num_experts", moe.num_experts, "must be >= 1")
    _require(1 <= moe.top_k <= moe.num_experts, "moe.top_k", moe.top_k,
             f"must be between 1 and moe.num_experts={moe.num_experts}")
    _require(m.intermediate_size % moe.top_k == 0, "moe.top_k", moe.top_k,
             f"must divide model.intermediate_size={m.intermediate_size} (expert width = intermediate_size // top_k)")
    _require(moe.aux_loss_coef >= 0, "moe.aux_loss_coef", moe.aux_loss_coef, "must be >= 0")
    _require(moe.z_loss_coef >= 0, "moe.z_loss_coef", moe.z_loss_coef, "must be >= 0")
    _require(moe.kernel_backend in ("auto", "triton", "torch"), "moe.kernel_backend",
             moe.kernel_backend, "must be 'auto', 'triton' or 'torch'")

    _require(d.context_points >= m.patch_points and d.context_points % m.patch_points == 0,
             "data.context_points", d.context_points,
             f"must be a positive multiple of model.patch_points={m.patch_points}")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    for name in ("flip_probability", "resample_probability", "truncate_probability", "mixup_probability"):
        v = getattr(d, name)
        _require(0.0 <= v <= 1.0, f"data.{name}", v, "must be in [0, 1]")
    _require(d.mixup_max_series >= 2, "data.mixup_max_series", d.mixup_max_series, "must be >= 2")
    for k, v in d.mixture_weights.items():
        _require(v >= 0, f"data.mixture_weights.{k}", v, "must be >= 0")
    _require(len(d.resample_factors) >= 1 and all(f > 0 for f in d.resample_factors),
             "data.resample_factors", d.resample_factors, "must be a non-empty list of numbers > 0")

    for name in ("dp_replicate", "tp", "pp", "ep", "pp_microbatches"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", getattr(p, name), "must be >= 1")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", p.dp_shard, "must be >= 1 or -1 (infer)")
    _require(p.pp_schedule in ("1f1b", "interleaved_1f1b"), "parallel.pp_schedule", p.pp_schedule,
             "must be '1f1b' or 'interleaved_1f1b'")
    _require(moe.num_experts % p.ep == 0, "parallel.ep", p.ep, f"must divide moe.num_experts={moe.num_experts}")

    for name in ("steps", "batch_size", "grad_accum_steps", "log_interval_steps"):
        _require(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "must be >= 1")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _require(t.schedule in ("cosine", "wsd"), "train.schedule", t.schedule, "must be 'cosine' or 'wsd'")
    _require(0.0 <= t.wsd_decay_fraction <= 1.0, "train.wsd_decay_fraction", t.wsd_decay_fraction, "must be in [0, 1]")
    _require(t.wql_denominator in ("abs_target", "series_scale"), "train.wql_denominator", t.wql_denominator,
             "expected 'abs_target' or 'series_scale'")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "must be in [0, 1) (0 turns the average off)")
    _require(0.0 <= t.norm_prefix_min_fraction <= 1.0, "train.norm_prefix_min_fraction",
             t.norm_prefix_min_fraction, "must be in [0, 1]")
    _require(t.stp_weighting in ("uniform", "inv_sqrt"), "train.stp_weighting", t.stp_weighting,
             "must be 'uniform' or 'inv_sqrt'")
    _require(t.optimizer in ("adamw", "deepspeed_cpu_adam"), "train.optimizer", t.optimizer,
             "must be 'adamw' or 'deepspeed_cpu_adam'")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision", t.precision,
             "must be 'auto', 'fp32' or 'bf16'")
    _require(not (t.compile and p.tp > 1), "train.compile", t.compile,
             f"not supported with parallel.tp={p.tp} (the compiled attention would trace DTensor activations, "
             "which no test here covers); turn one of them off")
    _require(t.time_budget_minutes >= 0 and math.isfinite(t.time_budget_minutes), "train.time_budget_minutes",
             t.time_budget_minutes, "must be a finite number of minutes >= 0 (0: no budget)")
    _require(t.time_budget_probe_steps >= 1, "train.time_budget_probe_steps", t.time_budget_probe_steps, "must be >= 1")
    _require(t.grad_clip_norm >= 0, "train.grad_clip_norm", t.grad_clip_norm, "must be >= 0")
    _require(t.max_nonfinite_steps_in_row >= 1, "train.max_nonfinite_steps_in_row",
             t.max_nonfinite_steps_in_row, "must be >= 1")
    _require(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor", t.spike_factor,
             "must be 0 (off) or > 1")
    _require(t.spike_window >= 1, "train.spike_window", t.spike_window, "must be >= 1")
    _require(t.max_spike_steps_in_row >= 1, "train.max_spike_steps_in_row", t.max_spike_steps_in_row, "must be >= 1")

    _require(c.save_interval_steps >= 0, "checkpoint.save_interval_steps", c.save_interval_steps, "must be >= 0")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _require(cfg.eval.context_points >= 0, "eval.context_points", cfg.eval.context_points, "must be >= 0")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    for name in ("val_interval_steps", "val_windows"):
        _require(getattr(cfg.eval, name) >= 0, f"eval.{name}", getattr(cfg.eval, name), "must be >= 0")
    _require(cfg.eval.val_batch_size >= 1, "eval.val_batch_size", cfg.eval.val_batch_size, "must be >= 1")
    for n in cfg.eval.val_context_points:
        _require(cfg.model.patch_points <= n < cfg.data.context_points, "eval.val_context_points", n,
                 f"each must be at least one patch ({cfg.model.patch_points}) and shorter than "
                 f"data.context_points ({cfg.data.context_points})")
    _require(len(set(cfg.eval.val_context_points)) == len(cfg.eval.val_context_points), "eval.val_context_points",
             cfg.eval.val_context_points, "lists a length twice")
    for n in cfg.eval.ensemble_contexts:
        _require(n >= 1, "eval.ensemble_contexts", n, "each must be a positive number of points")
    return cfg
