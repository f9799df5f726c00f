"""vLLM's CPU attention backend (CPU_ATTN).

Its kernel masks purely by index (`q_start = seq_len - q_len`, keys `[0, seq_len)`) and its scheduler
metadata depends only on sequence lengths, not on the block table. So one `build()` per draft step serves
every layer, and each layer gets a copy of that metadata with its own compacted block table. KV writes go
through the forward context's slot mapping, not the metadata, so they still land in the true slots.
"""

import dataclasses
from typing import Any

import torch

from vllm_std.config import unsupported


class CPUAttentionAdapter:
    def check_layer(self, impl: Any) -> None:
        """The safety net behind the config-time checks (`vllm_std.patches.check_engine`)."""
        if getattr(impl, "sliding_window", -1) not in (-1, None):
            raise unsupported("sliding-window attention", "pass --disable-sliding-window or run without STD")
        if getattr(impl, "alibi_slopes", None) is not None:
            raise unsupported("ALiBi attention", "run without STD")

    def sparse_metadata(
        self, builder: Any, common: Any, block_tables: torch.Tensor, layer_names: list[str]
    ) -> dict[str, Any]:
        shared = builder.build(common_prefix_len=0, common_attn_metadata=common)
        return {
            name: dataclasses.replace(shared, block_table=block_tables[i])
            for i, name in enumerate(layer_names)
        }
