"""``ParallelDims``: validate a layout and build every DeviceMesh from it; ``init_distributed``.

Rank order (outermost first) of the **dense** mesh, as in Megatron and torchtitan, so that the
most talkative dimension (tp) spans neighbouring ranks (one NVLink domain)::

    dense  = (pp, dp_replicate, dp_shard, tp)
    sparse = (pp, dp_replicate, efsdp, ep)      with efsdp * ep == dp_shard * tp

The **sparse** (expert) mesh re-splits the same ``dp_shard x tp`` block of ranks into
``efsdp x ep`` ("parallel folding"): experts are sharded ep ways (ep innermost, so an EP group
is a set of neighbouring ranks) and the expert shards are FSDP-sharded over the remaining
``efsdp`` ranks. EP is therefore bounded by ``dp_shard * tp``, not by dp. Both meshes are
unflattened from one 1-D world mesh, so FSDP can combine the expert-FSDP mesh with the EP mesh
of the expert DTensors (FSDP requires both to share a root mesh).

ep does not multiply the world size: ``world = pp * dp_replicate * dp_shard * tp``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from timers1.errors import InputError


class LayoutError(InputError):
    """A parallel layout that cannot work; the message names the field and what to change."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    """Degrees of each parallel dimension; ``dp_shard=-1`` takes what the others leave."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    world_size: int = 1
    _meshes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        w = self.world_size
        for name in ("dp_replicate", "tp", "pp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"parallel.{name}={v!r}: must be an integer >= 1")
        if w < 1:
            raise LayoutError(f"world_size={w}: must be >= 1")
        others = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if w % others:
                raise LayoutError(
                    f"parallel.dp_shard=-1 cannot be inferred: dp_replicate*tp*pp = "
                    f"{self.dp_replicate}*{self.tp}*{self.pp} = {others} does not divide world size {w}; "
                    f"choose dp_replicate, tp and pp whose product divides {w}"
                )
            self.dp_shard = w // others
        if self.dp_shard < 1:
            raise LayoutError(f"parallel.dp_shard={self.dp_shard}: must be >= 1 or -1 (infer)")
        prod = others * self.dp_shard
        if prod != w:
            raise LayoutError(
                f"parallel.dp_replicate*dp_shard*tp*pp = {self.dp_replicate}*{self.dp_shard}*{self.tp}*{self.pp} "
                f"= {prod} != world size {w}; set parallel.dp_shard=-1 to infer it, or change the degrees "
                f"so that their product is {w} (ep does not count: it is carved out of dp_shard*tp)"
            )
        fold = self.dp_shard * self.tp
        if fold % self.ep:
            ok = [d for d in _divisors(fold)]
            raise LayoutError(
                f"parallel.ep={self.ep}: must divide dp_shard*tp = {self.dp_shard}*{self.tp} = {fold} "
                f"(experts are carved out of the dp_shard x tp ranks); use one of {ok}"
            )

    def check_model(self, num_experts: int, num_heads: int, hidden_size: int, num_blocks: int,
                    pp_schedule: str = "1f1b", pp_microbatches: int = 1, intermediate_size: int | None = None) -> None:
        """Layout constraints that depend on the model; each error says what to change."""
        if num_experts % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep}: must divide moe.num_experts={num_experts}; use one of "
                f"{[d for d in _divisors(num_experts) if (self.dp_shard * self.tp) % d == 0]}"
            )
        if num_heads % self.tp or hidden_size % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp}: must divide model.num_heads={num_heads} (column-parallel q/k/v "
                f"split whole heads); use one of {_divisors(num_heads)}"
            )
        stages = self.pp * (2 if pp_schedule == "interleaved_1f1b" and self.pp > 1 else 1)
        if self.pp > 1 and num_blocks < stages:
            raise LayoutError(
                f"parallel.pp={self.pp} with parallel.pp_schedule={pp_schedule!r} needs {stages} stages but the "
                f"model has only {num_blocks} blocks (num_layers + num_stp_blocks); lower parallel.pp"
                + (" or use pp_schedule '1f1b'" if stages > self.pp else "")
            )
        if self.pp > 1 and pp_microbatches < self.pp and pp_schedule == "interleaved_1f1b":
            raise LayoutError(
                f"parallel.pp_microbatches={pp_microbatches}: interleaved 1F1B needs at least pp={self.pp} "
                f"microbatches; raise it"
            )

    # ------------------------------------------------------------------------------ derived
    @property
    def dp(self) -> int:
        """Ranks holding different data: dp_replicate * dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Expert-FSDP degree: the dp_shard x tp ranks left over after ep."""
        return self.dp_shard * self.tp // self.ep

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    # ------------------------------------------------------------------------------ meshes
    def build_meshes(self, device_type: str) -> None:
        """Create the dense and sparse meshes (collective; every rank must call it)."""
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        dense = world._unflatten(0, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                 ("pp", "dp_replicate", "dp_shard", "tp"))
        sparse = world._unflatten(0, (self.pp, self.dp_replicate, self.efsdp, self.ep),
                                  ("pp_e", "dp_replicate_e", "efsdp", "ep"))
        # The ranks that hold different tokens of one pipeline stage (dp x tp): the group over
        # which router statistics are summed, and the loss averaged for reporting.
        batch = dense["dp_replicate", "dp_shard", "tp"]._flatten("batch")
        self._meshes = {"world": world, "dense": dense, "sparse": sparse, "batch": batch}

    def mesh(self, name: str) -> DeviceMesh:
        """'pp', 'tp', 'dp' (1-D dp_shard, or 2-D dp_replicate x dp_shard for HSDP), 'ep',
        'efsdp' (1-D, or 2-D with dp_replicate), 'batch' (dp x tp flattened), 'world'."""
        if not self._meshes:
            raise RuntimeError("ParallelDims.build_meshes() has not been called")
        d, s = self._meshes["dense"], self._meshes["sparse"]
        if name in ("pp", "tp"):
            return d[name]
        if name == "dp":
            return d["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else d["dp_shard"]
        if name == "ep":
            return s["ep"]
        if name == "efsdp":
            return s["dp_replicate_e", "efsdp"] if self.dp_replicate > 1 else s["efsdp"]
        if name == "batch":
            return self._meshes["batch"]
        if name == "world":
            return self._meshes["world"]
        raise KeyError(name)

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard in [0, dp): the trainer loads batch shard dp_rank."""
        if self.world_size == 1:
            return 0
        d = self._meshes["dense"]
        return d["dp_replicate"].get_local_rank() * self.dp_shard + d["dp_shard"].get_local_rank()

    @property
    def layout(self) -> str:
        """The degrees as text (``dp_replicate=1 dp_shard=2 tp=1 pp=1 ep=1``): equal text, equal layout."""
        return " ".join(f"{name}={getattr(self, name)}" for name in ("dp_replicate", "dp_shard", "tp", "pp", "ep"))

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int | None = None) -> "ParallelDims":
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        return cls(parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp, parallel_cfg.pp,
                   parallel_cfg.ep, world_size)


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Initialise the default process group from torchrun's env:// variables; return the device.

    NCCL when CUDA is available (one GPU per local rank), gloo on CPU. Idempotent. Without
    torchrun's variables a single-process group is started (world size 1) so the same engine
    code runs in a plain ``python`` process.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return device
