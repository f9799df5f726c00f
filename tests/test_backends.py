"""The attention adapters' read of a request's keys from the paged KV cache, against vLLM's own cache write:
the scorer ranks blocks by these keys, so any slip in undoing the backend's layout would change the ranking.
"""

import types

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_std.backends.cpu import CPUAttentionAdapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_size"), [(128, 2, 64), (16, 8, 128), (128, 8, 128), (32, 1, 80)]
)
def test_cpu_keys_read_back_are_the_keys_written(
    dtype: torch.dtype, block_size: int, num_kv_heads: int, head_size: int
) -> None:
    """Keys written by `cpu_attn_reshape_and_cache` (the ISA vLLM picks for the shape: vec, vec16, ...) into
    scattered blocks, the last one partly filled, read back bit for bit in position order."""
    isa = _get_attn_isa(dtype, block_size, head_size)
    cache = torch.zeros(9, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cache.view(9, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    num_tokens = 3 * block_size + 5
    keys = torch.randn(num_tokens, num_kv_heads, head_size).to(dtype)
    blocks = torch.tensor([7, 2, 5, 1])
    positions = torch.arange(num_tokens)
    slots = blocks[positions // block_size] * block_size + positions % block_size
    ops.cpu_attn_reshape_and_cache(keys, torch.randn_like(keys), key_cache, value_cache, slots, isa)
    layer = types.SimpleNamespace(isa=isa)
    got = CPUAttentionAdapter().read_keys(layer, cache, blocks, num_tokens)
    assert torch.equal(got, keys)
    # A prefix of the request: only the blocks it needs.
    assert torch.equal(CPUAttentionAdapter().read_keys(layer, cache, blocks, 7), keys[:7])
