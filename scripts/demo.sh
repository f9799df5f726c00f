#!/usr/bin/env bash
# The main job on the embedded default: sets up the CPU environment, builds the tiny Qwen2-VL fixture and a
# synthetic video, and runs `vllm-std demo` (extra arguments go to it; see `vllm-std demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
exec "${VLLM_STD_VENV:-.venv}/bin/vllm-std" demo "$@"
