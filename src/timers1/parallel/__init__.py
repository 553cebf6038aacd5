"""The training engine: PyTorch-native parallelism applied to Timer-S1 from outside.

Entry points for the trainer::

    from timers1.parallel import build_engine, init_distributed

    device = init_distributed()                       # env:// (torchrun); NCCL on CUDA, gloo on CPU
    model = build_model(cfg.model, cfg.moe, device="meta")  # or a real model, same on every rank
    engine = build_engine(model, cfg, world_size, device)   # PP split -> TP -> EP -> AC -> FSDP
    optimizer = torch.optim.AdamW([p for part in engine.model_parts for p in part.parameters()])
    ...
    batch = loader(shard=engine.dp_rank, num_shards=engine.dp_size)  # same batch on the tp/pp ranks of a dp group
    result = engine.forward_backward(values_BW, mask_BW, grad_scale=1 / grad_accum)  # StepResult
    engine.clip_grad_norm(max_norm); optimizer.step(); optimizer.zero_grad()

One process is the 1x1x1x1 layout of the same engine (no process group needed). See
``engine.py`` for the step (stage hooks, the one loss function, schedules), ``dims.py`` for the
meshes, ``parallelize.py`` (TP -> EP -> AC -> FSDP order), ``tensor_parallel.py`` and
``expert_parallel.py`` (the styles), ``pipeline.py`` (stages, what travels), ``plan.py``
(memory plan).

``engine.model_parts``: the modules this rank holds, one per pipeline stage it runs (one
without PP, two per rank with interleaved 1F1B). Each is the Timer-S1 module tree with the
units of other stages removed, so parameter names are those of the full model; with more than
one rank all parameters are DTensors. Checkpoints (DCP)::

    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model_sd = {k: v for part in engine.model_parts for k, v in get_model_state_dict(part).items()}
    optim_sd = get_optimizer_state_dict(engine.model_parts[0], optimizer)   # one part, or one optimizer per part
    # set_model_state_dict / set_optimizer_state_dict load them back, also into another layout.

The quantile head is shared by all predicting blocks: every stage keeps a copy and the engine
sums their gradients (so copies stay identical, and DCP keeps one); ``clip_grad_norm`` counts
each copy once.

Layout: ``ParallelDims(dp_replicate, dp_shard, tp, pp, ep)``.
"""

from timers1.parallel.dims import LayoutError, ParallelDims, init_distributed
from timers1.parallel.engine import Engine, build_engine
from timers1.parallel.parallelize import parallelize

__all__ = ["Engine", "LayoutError", "ParallelDims", "build_engine", "init_distributed", "parallelize"]
