"""vLLM's CPU attention backend (CPU_ATTN).

Its kernel masks purely by index (`q_start = seq_len - q_len`, keys `[0, seq_len)`) and its scheduler
metadata depends only on sequence lengths, not on the block table. So one `build()` per draft step serves
every layer, and each layer gets a copy of that metadata with its own compacted block table. KV writes go
through the forward context's slot mapping, not the metadata, so they still land in the true slots.

Inside a block, `cpu_attn_reshape_and_cache` packs keys in an ISA-specific order (vec, vec16, AMX tiles,
NEON, ...). Rather than restate any of them, the order is read off vLLM's own kernel: keys whose values are
their own index are written into a scratch block, and what lands where is the permutation to undo.
"""

import functools
from typing import Any

import torch

from vllm_std.backends.base import PerLayerTableAdapter


class CPUAttentionAdapter(PerLayerTableAdapter):
    def read_keys(
        self, layer: Any, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        num_blocks, num_kv_heads, block_size, fused = kv_cache.shape
        head_size = fused // 2
        key_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)[:, :, :block_size]
        packed = key_cache[block_ids[: -(-num_tokens // block_size)]].flatten(1)
        order = key_order(layer.isa, kv_cache.dtype, num_kv_heads, block_size, head_size)
        keys = packed[:, order].view(-1, num_kv_heads, head_size)  # [blocks * block_size, Hkv, D]
        return keys[:num_tokens]


@functools.cache
def key_order(
    isa: str, dtype: torch.dtype, num_kv_heads: int, block_size: int, head_size: int
) -> torch.Tensor:
    """`order[i]`: where in a block's packed keys (the `[Hkv, block_size, D]` view, flattened) the key
    element `i` of the block's `[block_size, Hkv, D]` keys, flattened, is stored by the `isa` kernel.

    Each index is written in base-256 digits (exact in every float type the cache holds), one pass of
    `cpu_attn_reshape_and_cache` per digit; an order that is not a permutation (a kernel that drops or
    mixes elements) raises rather than scoring from wrong keys."""
    from vllm import _custom_ops as ops

    size = block_size * num_kv_heads * head_size
    cache = torch.zeros(1, num_kv_heads, 2 * block_size, head_size, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    index = torch.arange(size)
    stored = torch.zeros(size, dtype=torch.long)
    weight = 1
    while weight < size:
        keys = (index // weight % 256).to(dtype).view(block_size, num_kv_heads, head_size)
        ops.cpu_attn_reshape_and_cache(
            keys, torch.zeros_like(keys), key_cache, value_cache, torch.arange(block_size), isa
        )
        stored += weight * key_cache.reshape(-1).long()
        weight *= 256
    if not torch.equal(torch.sort(stored).values, index):
        raise RuntimeError(f"unexpected CPU_ATTN key layout (isa={isa}, {dtype}, block {block_size})")
    return torch.argsort(stored)
