#!/usr/bin/env bash
# The prepared single-GPU check (issue 13): `timers1 bench gpu` on one H100/H200 in <= 8 minutes,
# with the machine's own PyTorch (>= 2.11) and Triton (>= 3.6); nothing is installed from a network.
#
#   launch/gpu_check.sh [OUT_DIR] [ARGS...]     ARGS go to `timers1 bench gpu` (default: --quick)
#   launch/gpu_check.sh "$OUT"                  on the device machine: the files come back
#   launch/gpu_check.sh runs/gpu_check --device cpu --quick     the CPU dry run, same script
#
# OUT_DIR receives results.jsonl (every JSON line), summary.md (the table) and log.txt. Pure-Python
# wheels the image lacks (megatron-core, for the peer section) are taken from .whl/*.whl if
# present: README.md, "The GPU check", says how to fetch them.
set -uo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$REPO_DIR/runs/gpu_check}"
[ $# -gt 0 ] && shift
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--quick)
PYTHON="${PYTHON:-python3}"

# timers1 from this checkout without installing it: src/timers1, plus kernels/ as timers1.kernels
# (what setup.py's package_dir does for an installed copy).
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
mkdir -p "$SITE/timers1"
for entry in "$REPO_DIR"/src/timers1/*; do
  ln -s "$entry" "$SITE/timers1/$(basename "$entry")"
done
[ -e "$SITE/timers1/kernels" ] || ln -s "$REPO_DIR/kernels" "$SITE/timers1/kernels"
if compgen -G "$REPO_DIR/.whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/deps" \
    "$REPO_DIR"/.whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Compiled Triton kernels and autotuning results stay in the checkout: a rerun on a warm machine
# skips compiling.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$REPO_DIR/.cache/triton}"

mkdir -p "$OUT_DIR"
cd "$REPO_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/log.txt"
# The per-section limits end the check in time; this outer limit only catches a hang.
timeout "${GPU_CHECK_TIMEOUT_S:-570}" "$PYTHON" -m timers1.bench.gpu --out "$OUT_DIR" "${ARGS[@]}" 2>&1 \
  | tee -a "$OUT_DIR/log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc; results in $OUT_DIR (results.jsonl, summary.md, log.txt)"
exit "$rc"
