#!/bin/bash
# The GPU check (make gpu-check): on a machine with CUDA, the CUDA-marked tests, a short bf16/fp16
# `dvos train` and `dvos bench --device cuda`, written to one JSON (OUT/gpu-check.json).
#
#   experiments/gpu/check.sh [--out gpu-check] [--train-args "key=value ..."] [--bench-args "..."]
#   experiments/gpu/check.sh --dry-run --out /tmp/check      # the same steps on the CPU, tiny settings
#
# PYTHON picks the interpreter (default: the project's .venv, else python3); it needs a CUDA build of
# torch for a real run. What each step does: experiments/gpu/check.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python3 )}
exec "$PYTHON" experiments/gpu/check.py "$@"
