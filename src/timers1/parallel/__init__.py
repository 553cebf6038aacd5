"""The distributed engine: PyTorch-native parallelism applied to Timer-S1 from outside.

Entry points for the trainer::

    from timers1.parallel import ParallelDims, build_engine, init_distributed

    device = init_distributed()                       # env:// (torchrun); NCCL on CUDA, gloo on CPU
    dims = ParallelDims.from_config(cfg.parallel)     # validates; errors say what to change
    model = build_model(cfg.model, cfg.moe, device="meta")  # or a real model, same on every rank
    engine = build_engine(model, dims, cfg, device)   # PP split -> TP -> EP -> AC -> FSDP
    optimizer = torch.optim.AdamW([p for part in engine.model_parts for p in part.parameters()])
    ...
    batch = loader(shard=dims.dp_rank, num_shards=dims.dp)  # same batch on the tp/pp ranks of a dp group
    parts = engine.forward_backward(values_BW, mask_BW, grad_scale=1 / grad_accum)  # LossParts
    optimizer.step(); optimizer.zero_grad()

``engine.forward_backward(values_BW, mask_BW, grad_scale=1.0) -> LossParts`` runs forward and
backward of this rank's batch, pipelined (1F1B or interleaved 1F1B over
``parallel.pp_microbatches``) or not, and leaves reduced gradients in the (sharded, DTensor)
``.grad`` of ``engine.model_parts``. The returned ``LossParts`` (total, ntp, stp_per_horizon,
aux, z) are the same on every rank (all-reduced; the mean over dp ranks and microbatches of the
per-batch loss that ``timer_s1_loss`` defines, router losses over the global microbatch).
Call it several times before the optimizer step to accumulate.

``engine.model_parts``: the modules this rank holds, one per pipeline stage it runs (one
without PP, two per rank with interleaved 1F1B). Each is the Timer-S1 module tree with the
units of other stages removed, so parameter names are those of the full model; all
parameters are DTensors. Checkpoints (DCP)::

    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model_sd = {k: v for part in engine.model_parts for k, v in get_model_state_dict(part).items()}
    optim_sd = get_optimizer_state_dict(engine.model_parts[0], optimizer)   # one part, or one optimizer per part
    # set_model_state_dict / set_optimizer_state_dict load them back, also into another layout.

The quantile head is shared by all predicting blocks: every stage keeps a copy and the engine
sums their gradients (so copies stay identical, and DCP keeps one). Gradient clipping over PP
must count each copy once (compute the norm on ``model_parts`` and all-reduce over pp).

Layout: ``ParallelDims(dp_replicate, dp_shard, tp, pp, ep)``; see ``dims.py`` for the meshes,
``parallelize.py`` (TP -> EP -> AC -> FSDP order), ``tensor_parallel.py``,
``expert_parallel.py`` (all-to-all dispatcher), ``pipeline.py`` (stages, what travels),
``losses.py`` (per-stage loss terms and the aux-loss gradient trick), ``plan.py`` (memory plan).
"""

from timers1.parallel.dims import LayoutError, ParallelDims, init_distributed
from timers1.parallel.engine import Engine, build_engine
from timers1.parallel.parallelize import parallelize

__all__ = ["Engine", "LayoutError", "ParallelDims", "build_engine", "init_distributed", "parallelize"]
