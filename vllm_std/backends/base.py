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
