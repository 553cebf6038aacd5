"""Memory plan: per-GPU bytes of parameters, gradients, optimizer states, FSDP working buffers
and activations for a config and a layout, from the meta-device model plus analytic activations.

Precision model (``precision='bf16'``, the GPU default; FSDP2 MixedPrecisionPolicy with
param_dtype=bf16, reduce_dtype=fp32):
  * parameters: fp32 master shards, 4 B per parameter of this rank's shard;
  * gradients: fp32 shards (reduce-scattered in fp32), 4 B;
  * optimizer: AdamW exp_avg + exp_avg_sq in fp32, 8 B;
  * working: unsharded bf16 copies FSDP all-gathers (2 B) and their unsharded gradients
    before the reduce-scatter (4 B): without PP two blocks in flight (current + prefetch) plus
    the root (embedding, head, norm: kept gathered); with PP the whole stage stays gathered
    (``reshard_after_forward=False``);
  * activations: what autograd saves, 2 B per element (bf16 autocast), see ``activation_elems``.
With ``precision='fp32'`` (CPU) everything is 4 B and there is no working copy beyond FSDP's.

Shard arithmetic per rank: a dense weight is divided by tp if it is column/row-parallel
(q/k/v/gate/o) and by dp_shard (FSDP); an expert weight by ep and by efsdp = dp_shard*tp/ep;
replicas over dp_replicate cost the same again on every replica. With PP a rank holds its
stages' blocks (embedding on the first, a copy of the head on every stage).

``fits``: total <= 90% of the GPU memory (the rest: allocator fragmentation, NCCL buffers,
CUDA context).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from timers1.config import Config
from timers1.parallel.dims import LayoutError, ParallelDims
from timers1.parallel.pipeline import split_units

GIB = 1024 ** 3
TP_SHARDED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "o_proj.weight",
              "q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias")
EXPERT = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")
HEADROOM = 0.9


@dataclass
class ParamGroups:
    """Parameter counts by where they live, read from the meta-device model."""

    embed: int
    norm: int
    head: int
    block_tp: int       # per main block: TP-sharded weights
    block_rep: int      # per main block: replicated over tp (norms, router, QK scales)
    block_expert: int   # per main block: experts
    stp_extra: int      # per STP block on top of its TimeMoE block (projection, norms)
    total: int
    tensors: dict[str, int]  # the same groups counted in parameter tensors


def param_groups(cfg: Config) -> ParamGroups:
    from timers1.model import build_model

    model = build_model(cfg.model, cfg.moe, device="meta")
    g = dict(embed=0, norm=0, head=0, block_tp=0, block_rep=0, block_expert=0, stp_extra=0)
    tensors = dict.fromkeys(g, 0)
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        key = None
        if name.startswith(("embed.", "norm.", "head.")):
            key = name.split(".", 1)[0]
        elif name.startswith("layers.0."):
            key = "block_expert" if name.endswith(EXPERT) else "block_tp" if name.endswith(TP_SHARDED) else "block_rep"
        elif name.startswith("stp_blocks.0.") and not name.startswith("stp_blocks.0.block."):
            key = "stp_extra"
        if key is not None:
            g[key] += p.numel()
            tensors[key] += 1
    return ParamGroups(total=total, tensors=tensors, **g)


def activation_elems(cfg: Config, tp: int, kind: str) -> float:
    """Saved-for-backward elements per patch token for one unit (``main``/``stp`` block,
    ``head`` prediction + loss, ``embed``), in units of activation elements.

    Counted from the forward code: norms save their input and output; attention saves the
    all-gathered input (full sequence, not divided by tp), q/k/v/gate outputs, q and k after
    RoPE and QK-norm, the SDPA output and the gated product (per head: divided by tp); the MoE
    saves the permuted rows (K D), the expert gate/up outputs (2 K F), the expert outputs for
    the weighted unpermute (K D), the EP receive buffer (K D) and fp32 router logits/probs
    (2 E at 4 B = 4 E bf16 elements). STP blocks add their two input norms, the concat and the
    projection; the head saves its input, hidden, SiLU and Q*P outputs plus fp32 loss terms.
    """
    m, moe = cfg.model, cfg.moe
    d, k, e = m.hidden_size, moe.top_k, moe.num_experts
    f = m.intermediate_size // k
    qp = len(m.quantiles) * m.patch_points
    if kind in ("main", "stp"):
        attn = d + (1 + 10 + 2) * d / tp
        moe_ = (3 * k * d + 2 * k * f + 4 * e) / tp
        extra = 6 * d / tp if kind == "stp" else 0.0
        return attn + moe_ + extra
    if kind == "head":
        return 3 * d / tp + 2 * qp / tp + 10 * qp
    if kind == "embed":
        return (2 * m.intermediate_size + d + 2 * m.patch_points) / tp
    raise ValueError(kind)


@dataclass
class MemoryPlan:
    layout: dict
    gpus: int
    gpu_mem_gib: float
    precision: str
    activation_checkpointing: bool
    microbatch_windows: float
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    working_gib: float
    activations_gib: float
    total_gib: float
    fits: bool

    def line(self) -> str:
        lay = ",".join(f"{k}={v}" for k, v in self.layout.items())
        return (f"{lay:<58} params {self.params_gib:6.2f}  grads {self.grads_gib:6.2f}  optim {self.optimizer_gib:6.2f}  "
                f"working {self.working_gib:6.2f}  activations {self.activations_gib:6.2f}  total {self.total_gib:6.2f} GiB  "
                f"{'fits' if self.fits else 'DOES NOT FIT'}")


def plan_memory(cfg: Config, dims: ParallelDims, gpu_mem_gib: float, precision: str = "bf16",
                groups: ParamGroups | None = None) -> MemoryPlan:
    """Per-GPU memory of the worst rank (the first pipeline stage) for ``dims``."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    g = groups or param_groups(cfg)
    tp, ep, pp = dims.tp, dims.ep, dims.pp
    virtual = 2 if (pp > 1 and p.pp_schedule == "interleaved_1f1b") else 1
    splits = split_units(m.num_layers, m.num_stp_blocks, pp * virtual)
    stage_units = [u for k in range(virtual) for u in splits[k * pp]]  # pp rank 0: stages 0, pp, ...

    def unit_params(kind: str):
        dense = g.block_tp / tp + g.block_rep + (g.stp_extra if kind == "stp" else 0)
        return dense, g.block_expert / ep
    dense_local = expert_local = 0.0
    for kind, _ in stage_units:
        dd, ee = unit_params(kind)
        dense_local += dd
        expert_local += ee
    root_local = g.embed + g.head * virtual + (g.norm if ("main", str(m.num_layers - 1)) in stage_units else 0)
    dense_local += root_local
    shard = dense_local / dims.dp_shard + expert_local / dims.efsdp
    pb = 4.0
    params = shard * pb
    grads = shard * 4.0
    optim = shard * 8.0
    wb = 2.0 if precision == "bf16" else 4.0
    if pp > 1:
        gathered = dense_local + expert_local
    else:
        blk_dense, blk_exp = unit_params("stp")
        gathered = 2 * (blk_dense + blk_exp) + root_local
    working = 0.0 if (dims.dp_shard == 1 and dims.efsdp == 1 and precision == "fp32") else gathered * (wb + 4.0)

    # Activations: windows per microbatch on this rank, and microbatches alive at once.
    windows = t.batch_size / (dims.dp * t.grad_accum_steps)
    in_flight = 1
    if pp > 1:
        windows /= p.pp_microbatches
        in_flight = min(p.pp_microbatches, pp * virtual)
    tokens = windows * cfg.data.context_points / m.patch_points
    ab = 2.0 if precision == "bf16" else 4.0
    per_token = 0.0
    predicting = 0
    block_units = []
    for kind, name in stage_units:
        block_units.append(activation_elems(cfg, tp, kind))
        if kind == "stp" or name == str(m.num_layers - 1):
            predicting += 1
    if p.activation_checkpointing:
        # Block inputs only (h, plus h0 for STP: D / tp each) and one block recomputed.
        per_token = sum(2 * m.hidden_size / tp for _ in block_units) + (max(block_units) if block_units else 0)
    else:
        per_token = sum(block_units)
    per_token += predicting * activation_elems(cfg, tp, "head")
    if ("main", "0") in stage_units:
        per_token += activation_elems(cfg, tp, "embed")
    activations = per_token * tokens * in_flight * ab
    total = params + grads + optim + working + activations
    layout = dict(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, tp=tp, pp=pp, ep=ep)
    if pp > 1:
        layout["pp_schedule"] = p.pp_schedule
    return MemoryPlan(layout, dims.world_size, gpu_mem_gib, precision, p.activation_checkpointing, windows,
                      params / GIB, grads / GIB, optim / GIB, working / GIB, activations / GIB, total / GIB,
                      total <= HEADROOM * gpu_mem_gib * GIB)


def candidate_layouts(cfg: Config, gpus: int):
    """Every valid (dp_shard, tp, pp, ep) for ``gpus`` GPUs with dp_replicate = 1."""
    m, moe = cfg.model, cfg.moe
    blocks = m.num_layers + m.num_stp_blocks
    for tp, pp in itertools.product([1, 2, 4, 8], [1, 2, 4, 8, 16]):
        if gpus % (tp * pp) or m.num_heads % tp or pp > blocks:
            continue
        dp_shard = gpus // (tp * pp)
        if (cfg.train.batch_size // cfg.train.grad_accum_steps) % dp_shard:
            continue
        for ep in [1, 2, 4, 8, 16, 32, 64]:
            if moe.num_experts % ep or (dp_shard * tp) % ep:
                continue
            try:
                dims = ParallelDims(1, dp_shard, tp, pp, ep, gpus)
                dims.check_model(moe.num_experts, m.num_heads, m.hidden_size, blocks, cfg.parallel.pp_schedule,
                                 cfg.parallel.pp_microbatches)
            except LayoutError:
                continue
            yield dims


def suggest(cfg: Config, gpus: int, gpu_mem_gib: float, precision: str = "bf16") -> list[MemoryPlan]:
    """Layouts that fit, best first: no PP, then least TP (cheapest communication), then the
    EP that keeps all-to-alls inside one 8-GPU node and shards experts most; then the rest."""
    groups = param_groups(cfg)
    plans = [plan_memory(cfg, d, gpu_mem_gib, precision, groups) for d in candidate_layouts(cfg, gpus)]

    def key(pl: MemoryPlan):
        lay = pl.layout
        return (not pl.fits, lay["pp"], lay["tp"], -min(lay["ep"], 8), lay["ep"], pl.total_gib)
    return sorted(plans, key=key)


def parse_layout(text: str, gpus: int) -> ParallelDims:
    """'dp_shard=8,tp=1,pp=1,ep=8' (missing fields: defaults, dp_shard inferred)."""
    fields = dict(dp_replicate=1, dp_shard=-1, tp=1, pp=1, ep=1)
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise LayoutError(f"--layout item {item!r} is not NAME=VALUE")
        k, v = item.split("=", 1)
        if k not in fields:
            raise LayoutError(f"--layout field {k!r} unknown; known: {', '.join(fields)}")
        try:
            fields[k] = int(v)
        except ValueError:
            raise LayoutError(f"--layout {k}={v!r}: expected an integer") from None
    return ParallelDims(world_size=gpus, **fields)


def plan_dict(pl: MemoryPlan) -> dict:
    return asdict(pl)
