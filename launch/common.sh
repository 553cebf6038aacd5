#!/usr/bin/env bash
# Shared by every sbatch script: rendezvous, NCCL settings, preemption and requeue.
#
# Preemption protocol: Slurm sends SIGUSR1 to this batch shell (#SBATCH --signal=B:USR1@N)
# some minutes before the time limit. We do not rely on signals crossing srun -> torchrun ->
# workers (torchrun kills workers 30 s after forwarding a signal, too soon for an 8B save);
# instead the trap touches <run_dir>/STOP, which every rank polls each step (agreeing by an
# all-reduce), saves a checkpoint and exits. The trainer leaves <run_dir>/REQUEUE behind when
# it stopped early on purpose; then this script requeues the job, which resumes automatically
# from the newest complete checkpoint.
set -euo pipefail

: "${SLURM_JOB_ID:?run this under sbatch}"
REPO_DIR="${TIMERS1_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO_DIR"

export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# NCCL: fail fast on a hung collective instead of burning the allocation; IB if present.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"

# timers1_launch RUN_DIR ARGS...: run `timers1 ARGS` on every node, then requeue if asked.
timers1_launch() {
  local run_dir="$1"; shift
  mkdir -p "$run_dir"
  rm -f "$run_dir/STOP" "$run_dir/REQUEUE"
  trap 'echo "timers1: preemption warning, asking ranks to checkpoint"; touch "'"$run_dir"'/STOP"' USR1 TERM
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash launch/torchrun.sh "$@" &
  local srun_pid=$! rc=0
  # `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
  while true; do
    set +e; wait "$srun_pid"; rc=$?; set -e
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  if [[ -f "$run_dir/REQUEUE" ]]; then
    echo "timers1: checkpoint saved at step $(cat "$run_dir/REQUEUE"); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}
