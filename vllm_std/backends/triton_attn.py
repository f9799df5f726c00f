"""vLLM's Triton attention backend (TRITON_ATTN), on NVIDIA and AMD GPUs.

`TritonAttentionMetadata` holds `block_table`, `seq_lens` (the kernel's `seqused_k`), `query_start_loc` and
`slot_mapping`, plus softmax scratch shared by every layer; `unified_attention` reads the table and the
lengths at call time and masks by index, so a per-layer copy with a compacted table is all a view needs.
Checked on the CPU against dense attention with vLLM's own kernel under `TRITON_INTERPRET=1`
(tests/test_gpu_backends.py)."""

from typing import Any

import torch

from vllm_std.backends.base import PerLayerTableAdapter, split_cache_keys
from vllm_std.config import unsupported


class TritonAttentionAdapter(PerLayerTableAdapter):
    ALTERNATIVE = "run without STD"

    def check_layer(self, impl: Any) -> None:
        super().check_layer(impl)
        if getattr(impl, "chunk_lookback", None) not in (None, 0, -1):
            raise unsupported("chunked local attention", "run without STD")

    def read_keys(
        self, layer: Any, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        return split_cache_keys(kv_cache, block_ids, num_tokens)
