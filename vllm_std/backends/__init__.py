"""One small adapter per attention backend: how to build the drafter's per-layer metadata from compacted
block tables. Backends without an adapter are refused when the drafter binds, never run wrong."""

from vllm_std.backends.base import AttentionAdapter
from vllm_std.backends.cpu import CPUAttentionAdapter
from vllm_std.config import STDConfigError

_ADAPTERS: dict[str, type[AttentionAdapter]] = {"CPU_ATTN": CPUAttentionAdapter}


def adapter_for(backend_name: str) -> AttentionAdapter:
    try:
        return _ADAPTERS[backend_name]()
    except KeyError:
        raise STDConfigError(
            f"speculative_config.method 'std' does not support the {backend_name} attention backend yet "
            f"(supported: {', '.join(_ADAPTERS)}); run without STD or pick a supported backend"
        ) from None
