#!/usr/bin/env bash
# The first command to run on a GPU machine: every stage trained, resumed, reloaded and exported there, with
# throughput, memory, kernels and host syncs per step -> one JSON (--out, default results/gpu_check.json;
# --quick, under 5 minutes on one GPU by estimate: results/gpu_check_quick.json). Exit status 1 if any check
# failed or no usable GPU is there (--device cpu runs it on the CPU). Options: bench/gpu_check.py --help.
set -euo pipefail
# PYTHON, else python, else python3 (a fresh image may have only python3)
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$PY" ]; then
  echo "gpu_check: neither python nor python3 is on PATH (set PYTHON)" >&2
  exit 1
fi
exec "$PY" "$(dirname "$0")/gpu_check.py" "$@"
