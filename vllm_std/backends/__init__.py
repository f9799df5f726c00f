"""One small adapter per attention backend: how to build the drafter's per-layer metadata from compacted
block tables, and how to read a layer's keys back from the paged cache. Backends without an adapter are
refused at start-up (`vllm_std.engine_checks.check_engine` for what a command line decides) and again when the
drafter binds, never run wrong."""

from vllm_std.backends.base import AttentionAdapter
from vllm_std.backends.cpu import CPUAttentionAdapter
from vllm_std.backends.flash_attn import FlashAttentionAdapter
from vllm_std.backends.flashinfer import FlashInferAdapter
from vllm_std.backends.triton_attn import TritonAttentionAdapter
from vllm_std.config import unsupported

ADAPTERS: dict[str, type[AttentionAdapter]] = {
    "CPU_ATTN": CPUAttentionAdapter,
    "FLASH_ATTN": FlashAttentionAdapter,
    "TRITON_ATTN": TritonAttentionAdapter,
    "FLASHINFER": FlashInferAdapter,
}
GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")


def adapter_for(backend_name: str) -> AttentionAdapter:
    try:
        return ADAPTERS[backend_name]()
    except KeyError:
        raise unsupported(
            f"the {backend_name} attention backend (it has no adapter)",
            f"pass --attention-backend {' or '.join(GPU_BACKENDS[:2])} on a GPU, or run without STD",
        ) from None
