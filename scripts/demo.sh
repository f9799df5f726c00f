#!/usr/bin/env bash
# The main job on the embedded default: sets up the CPU environment and runs `vllm-std demo` on the trained
# look-up fixture shipped in the package (extra arguments go to it; see `vllm-std demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
exec "${VLLM_STD_VENV:-.venv}/bin/vllm-std" demo "$@"
