"""vLLM's Triton attention backend (TRITON_ATTN), on NVIDIA and AMD GPUs.

`TritonAttentionMetadata` holds `block_table`, `seq_lens` (the kernel's `seqused_k`), `query_start_loc` and
`slot_mapping`, plus softmax scratch shared by every layer; `unified_attention` reads the table and the
lengths at call time and masks by index, so a per-layer copy with a compacted table is all a view needs.
Checked on the CPU against dense attention with vLLM's own kernel under `TRITON_INTERPRET=1`
(tests/test_gpu_backends.py)."""

from typing import Any

from vllm_std.backends.base import SplitKVCacheAdapter
from vllm_std.config import unsupported


class TritonAttentionAdapter(SplitKVCacheAdapter):
    def check_layer(self, impl: Any) -> None:
        super().check_layer(impl)
        if getattr(impl, "chunk_lookback", None) not in (None, 0, -1):
            raise unsupported("chunked local attention", "run without STD")
