#!/usr/bin/env bash
# The first command to run on a GPU machine: every stage trained, resumed, reloaded and exported there, with
# throughput, kernels and host syncs per step, in a few minutes -> one JSON (--out, default
# results/gpu_check.json). Exit status 1 if any check failed. Options: python bench/gpu_check.py --help.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
