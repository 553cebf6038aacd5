#!/usr/bin/env bash
# One per node (launched by srun): torchrun with c10d rendezvous on the first node.
# --max-restarts lets torchrun restart crashed workers in place; they resume from the newest
# complete checkpoint, so a transient failure costs at most one checkpoint interval.
set -euo pipefail
exec torchrun \
  --nnodes="${SLURM_NNODES:-1}" \
  --nproc-per-node="${NPROC_PER_NODE:-8}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv-id="${SLURM_JOB_ID:-local}" \
  --max-restarts="${MAX_RESTARTS:-2}" \
  -m timers1.cli "$@"
