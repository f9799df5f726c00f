"""vLLM's FlashInfer backend (FLASHINFER), on its XQA (SM90, SM120) and trtllm-gen (SM100) decode path.

A draft step is a batch of one-token decodes. On that path the builder plans nothing on the host:
`FlashInferMetadata.decode` is a `FlashInferTrtllmAPIDecode` holding `block_tables`, `seq_lens` and
`max_seq_len`, which the kernel reads at call time as FlashAttention reads its fields. So one drafting build
serves every layer, each with a copy whose decode table is its own. FlashInfer's native decode path (GPUs
or models without XQA/trtllm-gen) instead plans its page indices on the host, per builder and step
(`BatchDecodeWithPagedKVCacheWrapper.plan`): a view per layer would take a plan per layer per step, so STD
refuses that path at start-up. The layer cache has the other GPU backends' logical `[blocks, Hkv,
block_size, 2 * D]` view. The metadata is checked on the CPU with vLLM's own builder and dataclasses
(tests/test_gpu_backends.py); the kernels need a GPU, where the start-up self-check runs them."""

import dataclasses
from typing import Any

import torch

from vllm_std.backends.base import SplitKVCacheAdapter
from vllm_std.config import unsupported

NATIVE_DECODE = (
    "FlashInfer's native decode path (this GPU or model has no XQA or trtllm-gen decode; the native path "
    "plans one page table per step on the host, not one per layer)"
)


class FlashInferAdapter(SplitKVCacheAdapter):
    ALTERNATIVE = "pass --attention-backend FLASH_ATTN or run without STD"

    def check_layer(self, impl: Any) -> None:
        super().check_layer(impl)
        if not getattr(impl, "supports_xqa_or_trtllm_gen_decode", False):
            raise unsupported(NATIVE_DECODE, "pass --attention-backend FLASH_ATTN or TRITON_ATTN")

    def check_builder(self, builder: Any) -> None:
        # The builder may still fall back to the native path (an unsupported head size, DCP).
        if not builder.use_trtllm_decode_attention:
            raise unsupported(NATIVE_DECODE, "pass --attention-backend FLASH_ATTN or TRITON_ATTN")

    def layer_view(self, shared: Any, block_table: torch.Tensor) -> Any:
        decode = shared.decode
        if shared.num_prefills or not hasattr(decode, "block_tables"):
            raise RuntimeError("FlashInfer built a draft step off its XQA/trtllm-gen decode path")
        table = block_table[: shared.num_decodes]
        return dataclasses.replace(shared, decode=dataclasses.replace(decode, block_tables=table))
