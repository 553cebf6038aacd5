"""Step-time model: predicted seconds per optimizer step of a config on a layout and a cluster.

A step on the slowest rank (the pipeline rank with the most work) is

    step = compute + exposed_fsdp + (1 + bubble_fraction) * (tp + ep + pp_p2p)
           + bubble_fraction * compute
    bubble_fraction = (pp - 1) / (v * m)      (1F1B: v = 1; interleaved 1F1B: v = 2; m microbatches)

and the report splits it into **compute** (matmuls, the non-matmul share, optimizer), **exposed
communication** (FSDP, TP, EP, PP transfers) and **bubble** (the pipeline fill and drain:
``bubble_fraction`` times everything a microbatch does on the critical path).

Compute: the FLOPs of ``timers1.model.flops.forward_flops_parts`` for the units (blocks, head,
embedding) this rank runs, on its tokens (``batch / dp`` windows, divided by tp: attention
heads, sequence-parallel positions and the MoE's local tokens all split tp ways), times 3 for
forward + backward, plus one more forward of the blocks under activation checkpointing. Experts
run at the routed load (K slots per token, times ``expert_load_factor`` >= 1 for imbalance: the
busiest rank sets the pace) at ``grouped_gemm_ratio`` of the dense GEMM speed; everything runs
at ``peak_tflops * gemm_efficiency``, and the non-matmul work (norms, softmax, routing,
permutation) costs ``other_fraction`` of the matmul time. The optimizer streams 32 B per local
parameter (AdamW reads p, g, m, v and writes p, m, v; the clip reads g) at ``memory_gb_s``.

Host overhead (``HostOverhead``): seconds that do not depend on the batch, for a rank that runs
the whole model. Per forward + backward pass (a pipeline rank makes one per microbatch):
``step_s`` (dispatching the ~2000 small ops), plus ``sharded_s`` once the parameters are FSDP
DTensors (FSDP's pre/post hooks and collective calls per unit; with PP once per step, as the
gathers and the gradient sync are), ``ep_s`` once the experts are
EP DTensors (with EP or TP: ``parallelize`` applies the expert style for both) and ``tp_s``
once the dense weights are TP DTensors (DTensor's host dispatch and sharding propagation on
every op). Per step: ``update_s`` (clip + optimizer beyond the optimizer's memory traffic: the
fused AdamW kernel on plain tensors) plus ``sharded_update_s`` for DTensor parameters (on CPU
AdamW's foreach per-tensor loop, see ``train.optim.adamw_implementation``). A rank that runs a
share of the units (PP) pays that share. Where the figures come from: on GPU profiles
``host_overhead_ms`` in the profile (0 there: kernel launches are asynchronous and hide behind
the GPU's work while the host runs ahead; a measured intercept would go there); on ``cpu_gloo``
``timers1 bench plan`` measures them in its run (``calibrate_host``, nothing else is fitted):
one-rank steps at the full and half batch give ``step = fixed + per_window * windows`` (the
intercept less the timed update is ``step_s``; the update less the optimizer's traffic is
``update_s``; the slope sets ``other_fraction``), and the same model wrapped on one-rank meshes
(FSDP; FSDP + EP; FSDP + TP + EP) at the half batch gives the wrappings' extra costs.
On the CPU profile, ranks beyond ``compute_slots_per_node`` cores share them: the matmuls, the
optimizer and the host overhead all slow down by ranks / cores.

Communication (``Collective``: bytes and counts per step, costed by the alpha-beta formulas
below, with ring algorithms over a group of n ranks; on gloo a reduce-scatter costs an all-reduce
of its input, which is how torch's gloo backend runs it):
  * FSDP: every unit's local (post-TP/EP) parameters are all-gathered in the compute dtype and
    their gradients reduce-scattered in fp32, one call per unit (alpha and sync wait each), dense
    over dp_shard, experts over efsdp; a one-rank group costs nothing. Without PP twice per
    step (forward, and backward: ``reshard_after_forward``), with PP once (kept gathered over
    the microbatches; the gradient sync runs at the last one). The root
    (embedding, norm, head) once. HSDP adds an fp32 all-reduce of the shard over dp_replicate.
  * TP/SP: per block and pass an all-gather of the sequence before attention and a
    reduce-scatter after o_proj (full local activations), mirrored in backward; one
    all-gather of the predictions per predicting unit; per step one fp32 all-reduce per
    weight tensor replicated over tp (its gradient: DTensor reduces each in its own call).
  * EP: per MoE block and pass a dispatch and a combine all-to-all of ``tokens/tp * K * D``
    elements per rank (the forward, the backward, and the recompute under checkpointing).
  * PP: per microbatch and stage boundary, h (and h0 when there are STP blocks) forward and
    their gradients backward, plus the raw windows forward.

Overlap assumptions: FSDP collectives are prefetched behind the compute of neighbouring
blocks, so only what exceeds the compute is exposed (and at least the first all-gather), when
the profile says communication overlaps compute (NCCL on its own streams); on ``cpu_gloo`` it
does not (gloo copies on the cores that compute). TP and EP collectives sit on the critical
path of every block (no async TP, our dispatcher is synchronous): always exposed. PP
transfers are exposed. The count exchange of the dispatcher (alpha only, included in the
all-to-all's alphas) is left out of the bytes. Every collective call also costs the profile's ``sync_s``: the expected
wait for the slowest rank (0 on dedicated GPUs; on a shared CPU ranks are descheduled at random).

Link classes: a group of n ranks whose rank stride is s spans ``min(n, gpus_per_node // s)``
ranks per node (dense ranks are ordered (pp, dp_replicate, dp_shard, tp); expert ranks
(pp, dp_replicate, efsdp, ep), see dims.py). A ring collective inside one node runs on
``intra`` (NVLink), otherwise at the ``inter`` (InfiniBand) bottleneck. An all-to-all sends
the share for ranks on the same node over ``intra`` and the rest over ``inter``, in parallel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from timers1.config import Config
from timers1.errors import InputError
from timers1.parallel.dims import ParallelDims
from timers1.parallel.pipeline import split_units

CLUSTERS_YAML = Path(__file__).resolve().parents[3] / "configs" / "clusters.yaml"
DEFAULT_CLUSTER = "h100_sxm"
ADAMW_BYTES_PER_PARAM = 32


# ------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class Link:
    """alpha-beta cost of one link class: ``alpha_s + bytes / bandwidth_B_s``."""

    alpha_s: float
    bandwidth_B_s: float


@dataclass(frozen=True)
class HostOverhead:
    """Batch-independent seconds of a rank running the whole model (module docstring).

    ``step_s``, ``sharded_s``, ``ep_s``, ``tp_s``: per forward + backward pass (a pipeline rank
    makes one per microbatch); ``update_s``, ``sharded_update_s``: per step (clip + optimizer).
    """

    step_s: float = 0.0
    sharded_s: float = 0.0
    ep_s: float = 0.0
    tp_s: float = 0.0
    update_s: float = 0.0
    sharded_update_s: float = 0.0

    def seconds(self, dims: ParallelDims, unit_share: float = 1.0, passes: int = 1) -> float:
        """This layout's rank: the wrappings ``parallelize`` applies for ``dims``, times its share
        of units, its passes (microbatches) for the forward + backward part."""
        per_pass, per_step = self.step_s, self.update_s
        if dims.world_size > 1:
            per_step += self.sharded_update_s
            # FSDP's per-unit gathers and reductions: every pass without PP; with PP once per
            # step (the weights stay gathered over the microbatches and torch's pipeline
            # schedules turn the gradient sync off until the last backward).
            if dims.pp > 1:
                per_step += self.sharded_s
            else:
                per_pass += self.sharded_s
        if dims.ep > 1 or dims.tp > 1:
            per_pass += self.ep_s
        if dims.tp > 1:
            per_pass += self.tp_s
        return (per_pass * passes + per_step) * unit_share

    def scaled(self, factor: float) -> "HostOverhead":
        return HostOverhead(**{k: factor * v for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    description: str
    gpus_per_node: int
    gpu_mem_gib: float
    peak_tflops: float
    memory_gb_s: float
    precision: str
    backend: str
    gemm_efficiency: float
    grouped_gemm_ratio: float
    other_fraction: float
    alltoall_efficiency: float
    comm_overlaps_compute: bool
    intra: Link
    inter: Link
    compute_slots_per_node: int = 0
    """Cores the ranks of a node share (CPU profile); 0: every rank has its own device."""
    sync_s: float = 0.0
    """Expected wait at each collective for the slowest rank beyond the wire time: 0 on dedicated
    devices; on a shared, loaded CPU ranks are descheduled at random (bench plan measures it)."""
    host: HostOverhead = HostOverhead()
    """Per-step host overhead (see the module docstring): profile ``host_overhead_ms`` or bench plan."""
    sources: dict = field(default_factory=dict, compare=False)
    """Where each calibrated figure came from (field -> text); absent fields are the profile's."""

    def slowdown(self, ranks_on_node: int) -> float:
        """How much slower each rank computes when ``ranks_on_node`` ranks share the node's cores."""
        if not self.compute_slots_per_node:
            return 1.0
        return max(1.0, ranks_on_node / self.compute_slots_per_node)

    def figures_used(self) -> dict[str, str]:
        """Every efficiency figure with its value and where it came from."""
        out = {}
        for name in ("peak_tflops", "memory_gb_s", "gemm_efficiency", "grouped_gemm_ratio", "other_fraction",
                     "alltoall_efficiency"):
            out[name] = f"{getattr(self, name):g} ({self.sources.get(name, 'profile ' + self.name)})"
        host = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.host.__dict__.items())
        out["host_overhead"] = f"{host} ({self.sources.get('host', 'profile ' + self.name)})"
        links = "; ".join(f"{name} alpha {link.alpha_s * 1e6:g} us, {link.bandwidth_B_s / 1e9:g} GB/s"
                          for name, link in (("intra", self.intra), ("inter", self.inter)))
        out["links"] = f"{links} ({self.sources.get('link', 'profile ' + self.name)})"
        return out


_REQUIRED = {"description": str, "gpus_per_node": int, "gpu_mem_gib": float, "peak_tflops": float,
             "memory_gb_s": float, "precision": str, "backend": str, "gemm_efficiency": float,
             "grouped_gemm_ratio": float, "other_fraction": float, "alltoall_efficiency": float,
             "comm_overlaps_compute": bool, "intra": dict, "inter": dict}
_OPTIONAL = {"compute_slots_per_node": int, "sync_s": float, "host_overhead_ms": dict}
_HOST_KEYS = ("step", "sharded", "ep", "tp", "update", "sharded_update")


def _field(name: str, key: str, value, kind):
    where = f"cluster profile {name}: {key}={value!r}"
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise InputError(f"{where}: expected {'an integer' if kind is int else 'a number'}")
        if value < 0 or (value == 0 and key not in ("compute_slots_per_node", "other_fraction", "sync_s")
                         and not key.startswith("host_overhead_ms.")):
            raise InputError(f"{where}: must be positive")
        return kind(value)
    if not isinstance(value, kind):
        raise InputError(f"{where}: expected a {kind.__name__}")
    return value


def _link(name: str, key: str, data: dict) -> Link:
    unknown = set(data) - {"alpha_us", "bandwidth_gb_s"}
    if unknown or len(data) != 2:
        raise InputError(f"cluster profile {name}: {key} needs exactly alpha_us and bandwidth_gb_s, got {sorted(data)}")
    alpha = _field(name, f"{key}.alpha_us", data["alpha_us"], float)
    bw = _field(name, f"{key}.bandwidth_gb_s", data["bandwidth_gb_s"], float)
    return Link(alpha * 1e-6, bw * 1e9)


def _host(name: str, data: dict) -> HostOverhead:
    unknown = sorted(set(data) - set(_HOST_KEYS))
    if unknown:
        raise InputError(f"cluster profile {name}: host_overhead_ms takes {', '.join(_HOST_KEYS)}, got {unknown}")
    return HostOverhead(**{f"{k}_s": _field(name, f"host_overhead_ms.{k}", data[k], float) * 1e-3
                           for k in _HOST_KEYS if k in data})


def load_clusters(path: str | Path = CLUSTERS_YAML) -> dict[str, ClusterProfile]:
    """Every profile of a clusters YAML; errors name the profile and the field."""
    from timers1.config import read_yaml

    data = read_yaml(path, what="cluster profiles file", error=InputError) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: top level must map profile names to profiles")
    profiles = {}
    for name, body in data.items():
        if not isinstance(body, dict):
            raise InputError(f"{path}: cluster profile {name} must be a mapping")
        missing = sorted(set(_REQUIRED) - set(body))
        unknown = sorted(set(body) - set(_REQUIRED) - set(_OPTIONAL))
        if missing or unknown:
            raise InputError(f"{path}: cluster profile {name}: missing {missing}, unknown {unknown}; "
                             f"fields: {', '.join(sorted(_REQUIRED) + sorted(_OPTIONAL))}")
        values = {k: _field(name, k, body[k], t) for k, t in {**_REQUIRED, **_OPTIONAL}.items()
                  if k in body and t is not dict}
        if values["precision"] not in ("bf16", "fp32"):
            raise InputError(f"{path}: cluster profile {name}: precision={values['precision']!r}: use bf16 or fp32")
        if not isinstance(body.get("host_overhead_ms", {}), dict):
            raise InputError(f"{path}: cluster profile {name}: host_overhead_ms must map {', '.join(_HOST_KEYS)} to ms")
        profiles[name] = ClusterProfile(name=name, intra=_link(name, "intra", body["intra"]),
                                        inter=_link(name, "inter", body["inter"]),
                                        host=_host(name, body.get("host_overhead_ms", {})), **values)
    return profiles


def cluster_profile(name: str, path: str | Path = CLUSTERS_YAML) -> ClusterProfile:
    profiles = load_clusters(path)
    if name not in profiles:
        raise InputError(f"unknown cluster profile {name!r}; known: {', '.join(sorted(profiles))} (in {path})")
    return profiles[name]


# ------------------------------------------------------------------------------------ collectives
def ranks_per_node(profile: ClusterProfile, group: int, stride: int) -> int:
    """Members of a group (size ``group``, rank stride ``stride``) that share one node."""
    if stride >= profile.gpus_per_node:
        return 1
    return max(1, min(group, profile.gpus_per_node // stride))


def ring_link(profile: ClusterProfile, group: int, stride: int) -> Link:
    return profile.intra if ranks_per_node(profile, group, stride) >= group else profile.inter


def all_gather_s(link: Link, group: int, total_bytes: float) -> float:
    """Ring all-gather of ``total_bytes`` (the gathered size): (n-1) alpha + (n-1)/n bytes / bw."""
    if group <= 1:
        return 0.0
    return (group - 1) * link.alpha_s + (group - 1) / group * total_bytes / link.bandwidth_B_s


reduce_scatter_s = all_gather_s  # the same ring, run the other way (``total_bytes``: the input)


def all_reduce_s(link: Link, group: int, total_bytes: float) -> float:
    """Ring all-reduce = reduce-scatter + all-gather."""
    return 2 * all_gather_s(link, group, total_bytes)


def all_to_all_s(profile: ClusterProfile, group: int, stride: int, bytes_per_rank: float) -> float:
    """Each rank sends ``bytes_per_rank`` spread evenly over the group ((n-1)/n of it leaves):
    the same-node share over intra and the rest over inter at once, one alpha per peer."""
    if group <= 1:
        return 0.0
    local = ranks_per_node(profile, group, stride)
    intra_b = bytes_per_rank * (local - 1) / group
    inter_b = bytes_per_rank * (group - local) / group
    alphas = (local - 1) * profile.intra.alpha_s + (group - local) * profile.inter.alpha_s
    wire = max(intra_b / profile.intra.bandwidth_B_s, inter_b / profile.inter.bandwidth_B_s)
    return alphas + wire / profile.alltoall_efficiency


def send_s(link: Link, nbytes: float) -> float:
    return link.alpha_s + nbytes / link.bandwidth_B_s


@dataclass(frozen=True)
class Collective:
    """One kind of transfer a rank makes ``count`` times per step."""

    what: str     # fsdp | tp | ep | pp
    op: str       # all_gather | reduce_scatter | all_reduce | all_to_all | send
    group: int
    stride: int
    nbytes: float  # gathered / reduced size (ring ops), bytes sent per rank (all_to_all, send)
    count: float

    def seconds(self, profile: ClusterProfile) -> float:
        if self.group <= 1:  # a one-rank group moves nothing and waits for no one
            return 0.0
        if self.op == "all_to_all":
            one = all_to_all_s(profile, self.group, self.stride, self.nbytes)
        elif self.op == "send":
            one = send_s(profile.inter if self.stride >= profile.gpus_per_node else profile.intra, self.nbytes)
        else:
            op = self.op
            if op == "reduce_scatter" and profile.backend == "gloo":
                # gloo has no reduce-scatter: torch's gloo backend all-reduces the whole buffer
                # and keeps its shard (a profiled dp2 step: all 13 of them ran as gloo all-reduces).
                op = "all_reduce"
            fn = {"all_gather": all_gather_s, "reduce_scatter": reduce_scatter_s, "all_reduce": all_reduce_s}[op]
            one = fn(ring_link(profile, self.group, self.stride), self.group, self.nbytes)
        return (one + profile.sync_s) * self.count


# ------------------------------------------------------------------------------------ work
@dataclass
class RankWork:
    """What one rank does in one optimizer step: FLOPs, optimizer bytes and its collectives."""

    dense_flops: float
    expert_flops: float
    optimizer_bytes: float
    collectives: list[Collective]
    bubble_fraction: float
    unit_share: float = 1.0  # of the model's units (blocks, STP blocks) this rank runs: its share of the ops
    passes: int = 1          # forward + backward passes per step: the microbatches of a pipeline rank

    def comm_bytes(self, what: str) -> float:
        return sum(c.nbytes * c.count for c in self.collectives if c.what == what)


def _rank_units(cfg: Config, dims: ParallelDims, pp_rank: int) -> tuple[list[tuple[str, str]], int]:
    m, p = cfg.model, cfg.parallel
    virtual = 2 if (dims.pp > 1 and p.pp_schedule == "interleaved_1f1b") else 1
    splits = split_units(m.num_layers, m.num_stp_blocks, dims.pp * virtual)
    return [u for k in range(virtual) for u in splits[pp_rank + k * dims.pp]], virtual


def rank_work(cfg: Config, dims: ParallelDims, precision: str, pp_rank: int = 0, groups=None,
              expert_load_factor: float = 1.0) -> RankWork:
    """FLOPs, optimizer bytes and collectives of pipeline rank ``pp_rank`` (see the module docstring)."""
    from timers1.model.flops import forward_flops_parts
    from timers1.parallel.plan import param_groups

    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    g = groups or param_groups(cfg)
    tp, ep, pp = dims.tp, dims.ep, dims.pp
    patches = cfg.data.context_points // m.patch_points
    f = forward_flops_parts(m, moe, patches)
    units, virtual = _rank_units(cfg, dims, pp_rank)
    num_stages = pp * virtual
    stage_ids = [pp_rank + k * pp for k in range(virtual)]
    windows = cfg.train.batch_size / dims.dp          # per rank per step, all microbatches together
    tokens = windows * patches / tp                   # patch tokens this rank computes
    act_b = 2.0 if precision == "bf16" else 4.0
    passes = 2 if p.activation_checkpointing else 1   # block forwards per step
    microbatches = p.pp_microbatches if pp > 1 else 1

    blocks = len(units)
    stp = sum(1 for kind, _ in units if kind == "stp")
    predicting = sum(1 for kind, name in units if kind == "stp" or name == str(m.num_layers - 1))
    first = ("main", "0") in units
    block_dense = f.attention_proj + f.attention_scores + f.router
    dense_fwd = blocks * block_dense + stp * f.stp_extra
    dense = tokens * ((2 + passes) * dense_fwd + 3 * (predicting * f.head + (f.embed if first else 0.0)))
    experts = tokens * (2 + passes) * blocks * f.experts * expert_load_factor

    # Parameters: dense local (after TP) per unit, expert local (after EP), root.
    unit_dense = g.block_tp / tp + g.block_rep
    dense_params = blocks * unit_dense + stp * g.stp_extra
    expert_params = blocks * g.block_expert / ep
    last_main = ("main", str(m.num_layers - 1)) in units
    root_params = (g.embed if first else 0) + g.head + (g.norm if last_main else 0)
    shard_params = (dense_params + root_params) / dims.dp_shard + expert_params / dims.efsdp

    gather_b = act_b  # FSDP gathers in the compute dtype, reduces in fp32
    colls: list[Collective] = []
    if dims.world_size > 1:
        gathers = 2 if pp == 1 else 1
        dp_stride, efsdp_stride = tp, ep
        # One call per FSDP unit (every block, every block's experts): the bytes per call are a
        # unit's average, so the bytes add up to the rank's and the alphas to one per unit.
        colls += [
            Collective("fsdp", "all_gather", dims.dp_shard, dp_stride, dense_params / blocks * gather_b, gathers * blocks),
            Collective("fsdp", "reduce_scatter", dims.dp_shard, dp_stride, dense_params / blocks * 4.0, blocks),
            Collective("fsdp", "all_gather", dims.efsdp, efsdp_stride, expert_params / blocks * gather_b,
                       gathers * blocks),
            Collective("fsdp", "reduce_scatter", dims.efsdp, efsdp_stride, expert_params / blocks * 4.0, blocks),
            Collective("fsdp", "all_gather", dims.dp_shard, dp_stride, root_params * gather_b, 1),
            Collective("fsdp", "reduce_scatter", dims.dp_shard, dp_stride, root_params * 4.0, 1),
        ]
        if dims.dp_replicate > 1:
            colls.append(Collective("fsdp", "all_reduce", dims.dp_replicate, tp * dims.dp_shard,
                                    shard_params * 4.0, 1))
    if tp > 1:
        seq_b = windows * patches * m.hidden_size * act_b          # the gathered sequence
        preds_b = windows * patches * len(m.quantiles) * m.patch_points * act_b
        for op in ("all_gather", "reduce_scatter"):
            colls.append(Collective("tp", op, tp, 1, seq_b, blocks * (passes + 1)))
        colls.append(Collective("tp", "all_gather", tp, 1, preds_b, predicting))
        # DTensor all-reduces the gradient of every weight replicated over tp (norms, router,
        # QK scales, STP projection, embedding, head) in a call of its own: few bytes, but each
        # call pays alpha and the wait for the other ranks.
        # How many of each group this rank holds (the head's gradient exists where a unit predicts).
        held = {"block_rep": blocks, "stp_extra": stp, "embed": int(first), "head": int(predicting > 0),
                "norm": int(last_main)}
        rep_tensors = sum(n * g.tensors[k] for k, n in held.items())
        rep_b = 4.0 * sum(n * getattr(g, k) for k, n in held.items())
        colls.append(Collective("tp", "all_reduce", tp, 1, rep_b / max(rep_tensors, 1), rep_tensors))
    if ep > 1:
        colls.append(Collective("ep", "all_to_all", ep, 1, tokens * moe.top_k * m.hidden_size * act_b,
                                blocks * 2 * (passes + 1)))
    if pp > 1:
        mb_tokens = windows / microbatches * patches / tp
        h_b = mb_tokens * m.hidden_size * act_b * (2 if m.num_stp_blocks else 1)
        window_b = 2 * windows / microbatches * cfg.window_points * 4
        sends_fwd = sum(1 for s in stage_ids if s < num_stages - 1)
        sends_bwd = sum(1 for s in stage_ids if s > 0)
        pp_stride = dims.dp * tp
        if sends_fwd:
            colls.append(Collective("pp", "send", 2, pp_stride, h_b + window_b, sends_fwd * microbatches))
        if sends_bwd:
            colls.append(Collective("pp", "send", 2, pp_stride, h_b, sends_bwd * microbatches))
    bubble = (pp - 1) / (virtual * microbatches) if pp > 1 else 0.0
    return RankWork(dense, experts, shard_params * ADAMW_BYTES_PER_PARAM, colls, bubble,
                    blocks / (m.num_layers + m.num_stp_blocks), microbatches)


# ------------------------------------------------------------------------------------ time
@dataclass
class StepTime:
    layout: dict
    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    bubble_s: float
    comm_s: dict            # seconds per kind (fsdp total, tp, ep, pp), before overlap
    tokens_per_s: float
    mfu: float
    host_s: float = 0.0     # the batch-independent host overhead inside compute_s


def predict_step(cfg: Config, dims: ParallelDims, profile: ClusterProfile, groups=None,
                 expert_load_factor: float = 1.0) -> StepTime:
    """Predicted step time on the slowest pipeline rank (see the module docstring)."""
    from timers1.model.flops import train_flops_per_patch

    m = cfg.model
    patches = cfg.data.context_points // m.patch_points
    ranks_on_node = min(dims.world_size, profile.gpus_per_node)
    rate = profile.peak_tflops * 1e12 * profile.gemm_efficiency / profile.slowdown(ranks_on_node)
    best = None
    for pp_rank in range(dims.pp):
        w = rank_work(cfg, dims, profile.precision, pp_rank, groups, expert_load_factor)
        matmul = (w.dense_flops + w.expert_flops / profile.grouped_gemm_ratio) / rate
        host = profile.host.seconds(dims, w.unit_share, w.passes) * profile.slowdown(ranks_on_node)
        compute = matmul * (1 + profile.other_fraction) + host + w.optimizer_bytes / (profile.memory_gb_s * 1e9) \
            * profile.slowdown(ranks_on_node)
        comm = {k: sum(c.seconds(profile) for c in w.collectives if c.what == k) for k in ("fsdp", "tp", "ep", "pp")}
        first_gather = next((c.seconds(profile) / c.count for c in w.collectives
                             if c.what == "fsdp" and c.op == "all_gather" and c.count), 0.0)
        fsdp_exposed = (max(first_gather, comm["fsdp"] - compute) if profile.comm_overlaps_compute
                        else comm["fsdp"])
        critical = compute + comm["tp"] + comm["ep"] + comm["pp"]
        bubble = w.bubble_fraction * critical
        step = critical + bubble + fsdp_exposed
        if best is None or step > best[0]:
            best = (step, compute, step - compute - bubble, bubble, comm, host)
    step, compute, exposed, bubble, comm, host = best
    global_tokens = cfg.train.batch_size * patches
    model_flops = train_flops_per_patch(m, cfg.moe, patches) * global_tokens
    mfu = model_flops / step / (dims.world_size * profile.peak_tflops * 1e12)
    layout = dict(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, tp=dims.tp, pp=dims.pp, ep=dims.ep)
    if dims.pp > 1:
        layout["pp_schedule"] = cfg.parallel.pp_schedule
        layout["pp_microbatches"] = cfg.parallel.pp_microbatches
    return StepTime(layout, step, compute, exposed, bubble, comm, global_tokens / step, mfu, host)


# ------------------------------------------------------------------------------------ ranking
@dataclass
class LayoutPlan:
    """One layout: its predicted step and its memory."""

    step: StepTime
    memory: object  # plan.MemoryPlan

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def as_dict(self) -> dict:
        s = self.step
        return {"layout": s.layout, "fits": self.fits, "step_time_s": s.step_time_s, "mfu": s.mfu,
                "memory_gib": self.memory.total_gib, "compute_s": s.compute_s, "exposed_comm_s": s.exposed_comm_s,
                "bubble_s": s.bubble_s, "tokens_per_s": s.tokens_per_s,
                "comm_s_before_overlap": s.comm_s}


def rank_layouts(cfg: Config, gpus: int, profile: ClusterProfile, gpu_mem_gib: float | None = None,
                 expert_load_factor: float = 1.0) -> list[LayoutPlan]:
    """Every candidate layout, those that fit first, each group by predicted step time.

    Ties (equal times to 1e-9 relative) break on the layout's degrees, so the order depends only
    on the layouts, not on the order they were generated in.
    """
    from timers1.parallel.plan import candidate_layouts, param_groups, plan_memory

    groups = param_groups(cfg)
    mem = gpu_mem_gib or profile.gpu_mem_gib
    plans = []
    for dims in candidate_layouts(cfg, gpus):
        plans.append(LayoutPlan(predict_step(cfg, dims, profile, groups, expert_load_factor),
                                plan_memory(cfg, dims, mem, profile.precision, groups)))

    def key(pl: LayoutPlan):
        s = pl.step
        return (not pl.fits, float(f"{s.step_time_s:.9e}"), s.layout["pp"], s.layout["tp"], s.layout["ep"],
                s.layout["dp_shard"])
    return sorted(plans, key=key)


# ------------------------------------------------------------------------------------ calibration
def calibrate(profile: ClusterProfile, paths: list[str | Path], cfg: Config | None = None) -> ClusterProfile:
    """``profile`` with the figures that ``timers1 bench`` JSON lines in ``paths`` measured.

    Read (only lines whose device/backend matches the profile: cuda + nccl for GPU profiles,
    cpu + gloo for the CPU one):
      * ``bench gpu`` baseline ``dense_gemm_tflops``  -> gemm_efficiency = measured / peak_tflops;
      * ``bench gpu`` throughput ``grouped_gemm_fwd`` ratio -> grouped_gemm_ratio;
      * ``bench gpu`` train ``mfu`` or ``bench train`` ``mfu`` (against the measured GEMM peak)
        -> other_fraction, solving 1/mfu = (1 - x + x/grouped_gemm_ratio)(1 + other_fraction)
        for the expert share x of the FLOPs of ``cfg`` (the planned config);
      * ``bench dispatch`` lines -> alltoall_efficiency = the alpha-beta prediction for that
        shape at efficiency 1 over the measured dispatch + combine time (median over lines);
      * ``bench plan``'s first line (CPU profile only) -> peak_tflops, memory_gb_s,
        other_fraction, the host overhead its one-rank steps measured (``calibrate_host``) and
        the loopback link it measured (alpha, bandwidth: both link classes, one machine).
    """
    on_gpu = profile.backend == "nccl"
    values, sources = {}, dict(profile.sources)
    dispatch = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--calibration {path}: no such file")
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip().startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--calibration {path}:{i}: not a JSON line ({exc.msg})") from None
            where = f"{path.name}:{i} (bench {rec.get('bench')})"
            bench = rec.get("bench")
            if bench == "gpu" and on_gpu:
                if rec.get("section") == "baseline" and rec.get("dense_gemm_tflops") and "bfloat16" in str(rec.get("dtype")):
                    values["gemm_efficiency"] = min(1.0, rec["dense_gemm_tflops"] / profile.peak_tflops)
                    sources["gemm_efficiency"] = f"measured {rec['dense_gemm_tflops']:.0f} TFLOP/s, {where}"
                elif rec.get("metric") == "grouped_gemm_fwd" and rec.get("ratio") and rec.get("dtype") == "bfloat16":
                    values["grouped_gemm_ratio"] = rec["ratio"]
                    sources["grouped_gemm_ratio"] = f"measured, {where}"
                elif rec.get("metric") == "mfu" and rec.get("ratio"):
                    values["_mfu"] = (rec["ratio"], where)
            elif bench == "train" and rec.get("mfu") and (rec.get("device", "").startswith("cuda") == on_gpu):
                values["_mfu"] = (rec["mfu"], where)
            elif bench == "plan" and "calibration" in rec and not on_gpu:
                cal = rec["calibration"]
                values.update(peak_tflops=cal["peak_tflops"], memory_gb_s=cal["memory_gb_s"],
                              other_fraction=cal["other_fraction"],
                              host=HostOverhead(**{k: v * 1e-3 for k, v in cal["host_overhead_ms"].items()}))
                sources.update({k: f"measured, {where}" for k in ("peak_tflops", "memory_gb_s", "other_fraction", "host")})
                if "link" in cal:  # bench plan lines from before it recorded the link have none
                    values["intra"] = values["inter"] = Link(**cal["link"])
                    sources["link"] = f"measured, {where}"
            elif bench == "dispatch" and (rec.get("backend") == profile.backend):
                dispatch.append((rec, where))
    out = replace(profile, **{k: v for k, v in values.items() if not k.startswith("_")}, sources=sources)
    if "_mfu" in values and cfg is not None:
        from timers1.model.flops import forward_flops_parts

        mfu, where = values["_mfu"]
        f = forward_flops_parts(cfg.model, cfg.moe, cfg.data.context_points // cfg.model.patch_points)
        x = f.experts / f.block
        other = max(0.0, 1 / (mfu * (1 - x + x / out.grouped_gemm_ratio)) - 1)
        out = replace(out, other_fraction=other, sources={**out.sources, "other_fraction": f"from MFU {mfu:.3f}, {where}"})
    if dispatch:
        ratios = []
        for rec, _ in dispatch:
            ideal = replace(out, alltoall_efficiency=1.0)
            b = rec["tokens_per_rank"] * rec["top_k"] * rec["hidden"] * (2 if on_gpu else 4)
            ratios.append(2 * all_to_all_s(ideal, rec["ep"], 1, b) / (rec["dispatch_combine_ms"] * 1e-3))
        ratios.sort()
        eff = min(1.0, ratios[len(ratios) // 2])
        out = replace(out, alltoall_efficiency=eff, sources={
            **out.sources, "alltoall_efficiency": f"measured, median of {len(ratios)} bench dispatch lines ({dispatch[0][1]})"})
    return out


@dataclass(frozen=True)
class OneRankSteps:
    """Measured seconds of one-rank training steps (``timers1 bench plan``'s calibration).

    ``plain_*``: the unwrapped model at ``full_batch`` and ``half_batch`` windows; ``fsdp``,
    ``fsdp_ep``, ``fsdp_tp``: the model wrapped on one-rank meshes (FSDP; FSDP + EP; FSDP + TP
    + EP, as ``parallelize`` wraps it for those layouts) at ``half_batch``. ``*_update_s``: the
    clip + optimizer part of the plain and the FSDP-wrapped steps (in the step times too).
    """

    full_batch: int
    half_batch: int
    plain_full_s: float
    plain_half_s: float
    fsdp_s: float
    fsdp_ep_s: float
    fsdp_tp_s: float
    plain_update_s: float = 0.0
    fsdp_update_s: float = 0.0

    def fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per window) of the straight line through the two plain steps."""
        per_window = (self.plain_full_s - self.plain_half_s) / (self.full_batch - self.half_batch)
        return self.plain_full_s - per_window * self.full_batch, per_window


def calibrate_host(profile: ClusterProfile, cfg: Config, steps: OneRankSteps, where: str) -> ClusterProfile:
    """``profile`` with ``host`` and ``other_fraction`` from one-rank steps measured at its peak.

    The plain steps' intercept less their update (clip + optimizer) is ``host.step_s``, the
    per-pass part; the update, less the optimizer's memory traffic that ``predict_step`` charges
    separately, is ``update_s``; the slope, over the matmul seconds per window this profile
    predicts, is ``1 + other_fraction``. The FSDP-wrapped step minus the plain one at the same
    batch gives ``sharded_update_s`` (update part) and ``sharded_s`` (the rest); the EP and TP
    wrappings minus the previous one give ``ep_s`` and ``tp_s`` (all per pass). A negative
    difference (noise on a shared machine) counts as 0.
    """
    single = ParallelDims(1, 1, 1, 1, 1, 1)
    fixed, per_window = steps.fit()
    work = rank_work(replace(cfg, train=replace(cfg.train, batch_size=steps.full_batch)), single, profile.precision)
    rate = profile.peak_tflops * 1e12 * profile.gemm_efficiency
    matmul_per_window = (work.dense_flops + work.expert_flops / profile.grouped_gemm_ratio) / rate / steps.full_batch
    optimizer = work.optimizer_bytes / (profile.memory_gb_s * 1e9)
    sharded_update = steps.fsdp_update_s - steps.plain_update_s
    host = HostOverhead(step_s=max(0.0, fixed - steps.plain_update_s),
                        update_s=max(0.0, steps.plain_update_s - optimizer),
                        sharded_update_s=max(0.0, sharded_update),
                        sharded_s=max(0.0, steps.fsdp_s - steps.plain_half_s - sharded_update),
                        ep_s=max(0.0, steps.fsdp_ep_s - steps.fsdp_s),
                        tp_s=max(0.0, steps.fsdp_tp_s - steps.fsdp_ep_s))
    other = max(0.0, per_window / matmul_per_window - 1)
    return replace(profile, host=host, other_fraction=other, sources={
        **profile.sources, "host": f"one-rank steps, {where}",
        "other_fraction": f"slope {per_window * 1e3:.2f} ms/window of one-rank steps, {where}"})
