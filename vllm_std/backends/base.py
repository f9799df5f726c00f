"""The interface each attention-backend adapter implements, and what the adapters share."""

import dataclasses
from typing import Any, Protocol

import torch

from vllm_std.config import unsupported

# The KV-cache dtypes prefill scoring can read keys back in (`--kv-cache-dtype`); the others quantize.
FLOAT_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float")


class AttentionAdapter(Protocol):
    def check_layer(self, impl: Any) -> None:
        """Raises STDConfigError if a layer uses a feature the compacted view would get wrong."""

    def check_builder(self, builder: Any) -> None:
        """Raises STDConfigError if the backend's metadata builder took a path the views cannot serve."""

    def sparse_metadata(
        self, builder: Any, common: Any, block_tables: torch.Tensor, layer_names: list[str]
    ) -> dict[str, Any]:
        """Per-layer metadata for one draft step; `block_tables` is `[L, B, W]` physical ids."""

    def read_keys(
        self, layer: Any, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """`[num_tokens, Hkv, D]`: the keys a layer cached at positions `[0, num_tokens)` of one request
        whose logical blocks are the physical `block_ids`, in the cache's dtype (for prefill scoring)."""


class PerLayerTableAdapter:
    """For backends whose metadata carries the block table as a field that the kernel reads at call time
    (CPU_ATTN, TRITON_ATTN, FLASH_ATTN): one build per draft step, then per layer a copy with that layer's
    compacted table, as vLLM's own `update_block_table` does.

    One build serves every layer because what the builders derive from the batch depends on lengths only,
    and every layer keeps the same number of blocks. `build_for_drafting` is the builders' own entry for
    drafters: FlashAttention skips its persistent FA3 schedule there, which the target's CUDA graphs read.
    KV writes take their slots from the forward context, not from this metadata, so they land in the true
    slots whatever table a layer reads."""

    # What the backend's impl says when a layer has no sliding window.
    NO_WINDOW: tuple[Any, ...] = (None, -1, (-1, -1))
    # The fix offered where this backend cannot serve a model at all.
    ALTERNATIVE = "run without STD"

    def check_layer(self, impl: Any) -> None:
        """The safety net behind the config-time checks (`vllm_std.engine_checks.check_engine`)."""
        if getattr(impl, "sliding_window", None) not in self.NO_WINDOW:
            raise unsupported("sliding-window attention", "pass --disable-sliding-window or run without STD")
        if getattr(impl, "alibi_slopes", None) is not None:
            raise unsupported("ALiBi attention", "run without STD")
        if getattr(impl, "sinks", None) is not None:
            raise unsupported("attention sinks (the drafter's views would drop them)", self.ALTERNATIVE)
        if getattr(impl, "kv_sharing_target_layer_name", None) is not None:
            raise unsupported("layers that share another layer's KV cache", "run without STD")
        if str(getattr(impl, "kv_cache_dtype", "auto")) not in FLOAT_CACHE_DTYPES:
            # Prefill scoring reads keys back from the cache (`read_keys`), in the cache's float dtype.
            raise unsupported("a quantized KV cache", "drop --kv-cache-dtype or run without STD")
        if getattr(impl, "total_cp_world_size", 1) > 1:
            # Each rank then holds an interleaved share of every block: a compacted table means nothing.
            raise unsupported(
                "context parallelism", "drop --decode-context-parallel-size / --prefill-context-parallel-size"
            )

    def check_builder(self, builder: Any) -> None:
        """Every builder of these backends serves per-layer tables."""

    def sparse_metadata(
        self, builder: Any, common: Any, block_tables: torch.Tensor, layer_names: list[str]
    ) -> dict[str, Any]:
        shared = builder.build_for_drafting(common, draft_index=0)
        return {name: self.layer_view(shared, block_tables[i]) for i, name in enumerate(layer_names)}

    def layer_view(self, shared: Any, block_table: torch.Tensor) -> Any:
        """A copy of the step's metadata that reads `block_table` (`[B, W]`)."""
        return dataclasses.replace(shared, block_table=block_table)


class SplitKVCacheAdapter(PerLayerTableAdapter):
    """For the GPU backends (TRITON_ATTN, FLASH_ATTN), which read vLLM's logical `[blocks, Hkv, block_size,
    2 * D]` layer cache as keys then values along its last axis."""

    def read_keys(
        self, layer: Any, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        return split_cache_keys(kv_cache, block_ids, num_tokens)


def split_cache_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The keys of a layer cache in vLLM's logical `[blocks, Hkv, block_size, 2 * D]` view whose last axis
    holds a token's key then its value, as the GPU kernels split it (`kv_cache.transpose(1, 2).split(D)`).
    Reads only the request's blocks; `[num_tokens, Hkv, D]`."""
    block_size, head_size = kv_cache.shape[2], kv_cache.shape[3] // 2
    blocks = block_ids[: -(-num_tokens // block_size)]
    keys = kv_cache[blocks, :, :, :head_size].transpose(1, 2)  # [blocks, block_size, Hkv, D]
    return keys.reshape(-1, kv_cache.shape[1], head_size)[:num_tokens]
