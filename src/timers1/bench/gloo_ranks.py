"""Spawned gloo ranks on this machine, for the benchmarks that measure collectives on CPU.

``spawn(fn, world, *fn_args)`` starts ``world`` processes running
``fn(rank, world, port, *fn_args, queue)``; each calls ``init_rank(rank, world, port)`` first,
and rank 0 puts its result on ``queue``, which ``spawn`` returns.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, port: int) -> None:
    """Join the gloo group of ``spawn``: one torch thread per rank, so ranks share the cores
    by process count as a cluster's GPUs would not."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn(fn, world: int, *fn_args):
    """Run ``fn`` on ``world`` spawned ranks; returns what rank 0 put on the queue."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(fn, args=(world, free_port(), *fn_args, queue), nprocs=world, join=True,
                       start_method="spawn")
    return queue.get()
