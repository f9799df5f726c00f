"""The interface each attention-backend adapter implements."""

from typing import Any, Protocol

import torch


class AttentionAdapter(Protocol):
    def check_layer(self, impl: Any) -> None:
        """Raises STDConfigError if a layer uses a feature the compacted view would get wrong."""

    def sparse_metadata(
        self, builder: Any, common: Any, block_tables: torch.Tensor, layer_names: list[str]
    ) -> dict[str, Any]:
        """Per-layer metadata for one draft step; `block_tables` is `[L, B, W]` physical ids."""

    def read_keys(
        self, layer: Any, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """`[num_tokens, Hkv, D]`: the keys a layer cached at positions `[0, num_tokens)` of one request
        whose logical blocks are the physical `block_ids`, in the cache's dtype (for prefill scoring)."""
