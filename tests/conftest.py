"""Shared fixtures. vLLM engines take 20-70 s to start on CPU, so tests share them per module."""

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from vllm_std.fixtures.models import tiny_model


@pytest.fixture(scope="session")
def qwen2_vl_path() -> str:
    return str(tiny_model("qwen2_vl"))


@pytest.fixture(scope="session")
def llava_ov_path() -> str:
    return str(tiny_model("llava_onevision"))


# The tests read the drafter's state from the worker process with `LLM.collective_rpc(callable)`.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
