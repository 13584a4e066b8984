#!/usr/bin/env bash
# The first run on a GPU, in one command: tests/test_gpu.py, the 1B- and 8B-shape top-half runs
# with --device cuda (exact and Sinkhorn), an `opt-deus train` step-time probe on CUDA in bf16;
# every figure to bench-out/gpu-check/gpu_check.json and summary.md (benchmarks/gpu_check.py).
#   benchmarks/gpu_check.sh [--dry-run] [--work DIR] [--skip-8b]
# Fails at once, with one line, where CUDA is missing. PYTHON overrides the interpreter
# (default: the project's .venv, made by `make install TORCH_SPEC=<a CUDA build of torch>`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "error: no Python at $python; run \`make install\` in $root first (or set PYTHON)" >&2
    exit 1
fi
cd "$root"
export HF_HUB_OFFLINE=1
exec "$python" -m benchmarks.gpu_check "$@"
