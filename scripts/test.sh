#!/usr/bin/env bash
# The test command: sets up the CPU environment, then runs the default suite (about 50 minutes on 2 cores).
#   bash scripts/test.sh            default suite
#   bash scripts/test.sh --slow     only the slow suites (long videos, load)
#   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
python="${VLLM_STD_VENV:-.venv}/bin/python"
if [ "${1:-}" = "--slow" ]; then
  shift
  exec "$python" -m pytest -m slow "$@"
fi
exec "$python" -m pytest "$@"
