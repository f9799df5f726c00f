"""One small adapter per attention backend: how to build the drafter's per-layer metadata from compacted
block tables. Backends without an adapter are refused at start-up (`vllm_std.patches.check_engine`: other
platforms, MLA models) and again when the drafter binds, never run wrong."""

from vllm_std.backends.base import AttentionAdapter
from vllm_std.backends.cpu import CPUAttentionAdapter
from vllm_std.config import unsupported

_ADAPTERS: dict[str, type[AttentionAdapter]] = {"CPU_ATTN": CPUAttentionAdapter}


def adapter_for(backend_name: str) -> AttentionAdapter:
    try:
        return _ADAPTERS[backend_name]()
    except KeyError:
        raise unsupported(
            f"the {backend_name} attention backend yet (supported: {', '.join(_ADAPTERS)})",
            "run without STD or pick a supported backend",
        ) from None
