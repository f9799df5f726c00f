"""Reading vLLM's own spec-decode counters (the ones `/metrics` exposes) from an offline `LLM`."""

from typing import Any

PREFIX = "vllm:spec_decode_"


def spec_decode_counters(llm: Any) -> dict[str, Any]:
    """`{"num_drafts": ..., "num_draft_tokens": ..., "num_accepted_tokens": ..., "..._per_pos": [...]}`."""
    return {
        m.name.removeprefix(PREFIX): getattr(m, "values", None) or m.value
        for m in llm.get_metrics()
        if m.name.startswith(PREFIX)
    }


def acceptance_rate(counters: dict[str, Any]) -> float:
    """Accepted draft tokens over proposed draft tokens."""
    return counters["num_accepted_tokens"] / counters["num_draft_tokens"]
