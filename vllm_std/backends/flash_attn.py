"""vLLM's FlashAttention backend (FLASH_ATTN: FA2 and FA3), vLLM's default on NVIDIA GPUs.

`FlashAttentionMetadata` holds `block_table`, `seq_lens` (FlashAttention's `seqused_k`), `query_start_loc`
and `slot_mapping`; vLLM itself swaps the table of a built metadata (`update_block_table`). The builder's
FA3 ahead-of-time schedule depends on lengths only, the same in every STD layer, and its drafting build
(`build_for_drafting`) leaves the persistent schedule that the target's CUDA graphs read untouched. The
metadata is checked on the CPU against a pure-torch reference with FlashAttention's semantics
(tests/test_gpu_backends.py); FlashAttention's kernels themselves need a GPU."""

from typing import Any

from vllm_std.backends.base import SplitKVCacheAdapter
from vllm_std.config import unsupported


class FlashAttentionAdapter(SplitKVCacheAdapter):
    ALTERNATIVE = "pass --attention-backend TRITON_ATTN or run without STD"

    def check_layer(self, impl: Any) -> None:
        super().check_layer(impl)
        if getattr(impl, "vllm_flash_attn_version", 2) not in (2, 3):
            raise unsupported(
                f"FlashAttention {impl.vllm_flash_attn_version} (the drafter's views are checked with FA2 "
                "and FA3 only)",
                self.ALTERNATIVE,
            )
