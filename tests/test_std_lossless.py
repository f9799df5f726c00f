"""STD is lossless: greedy output with STD equals the same engine without speculation, token for token.

The matrix covers both fixture families, float32 and bfloat16, gamma 1/4/8, and K from one KV block to more
than every visual token, on a batch mixing videos, an image, a video with an image, and text. Qwen2-VL
engines use `max_num_batched_tokens=512`, so each ~1k-token video prompt is prefilled in chunks (the
scorer reads the keys of earlier chunks from the paged cache every time). LLaVA-OneVision cannot split a
video item across chunks (its 1025 embeddings must fit the encoder budget), so its engines prefill each
prompt in one chunk. vLLM's
defaults otherwise (prefix caching on: the follow-up question's video KV comes from the cache).
"""

import functools
import zlib

import pytest
import torch
from helpers import GREEDY, drafter_report, engine, mixed_requests, token_ids
from vllm import LLM

from vllm_std.metrics import acceptance_rate, spec_decode_counters, std_metrics
from vllm_std.selection import baseline_scores, streaming_blocks

ENGINE_ARGS = {
    "qwen2_vl": {"max_num_batched_tokens": 512},
    "qwen2_5_vl": {"max_num_batched_tokens": 512},
    "llava_onevision": {"max_num_batched_tokens": 2048},
}
ALL_VISUAL = 100_000  # K larger than any prompt here: the drafter then reads every block


def _run(llm: LLM, family: str) -> list[list[int]]:
    """The mixed batch, then a follow-up on the first video whose visual KV comes from the prefix cache."""
    requests = mixed_requests(family)
    outputs = token_ids(llm.generate(requests, GREEDY))
    follow_up = {**requests[0], "prompt": requests[0]["prompt"].replace("What happens", "What changes")}
    return outputs + token_ids(llm.generate([follow_up], GREEDY))


@functools.cache
def baseline(family: str, dtype: str) -> list[list[int]]:
    with engine(family, dtype, **ENGINE_ARGS[family]) as llm:
        return _run(llm, family)


# The default run keeps one case per family, bfloat16 once, and K from one block to every block; the slow
# suite adds the rest.
CASES = [
    pytest.param("qwen2_vl", "float32", 4, 128, id="qwen2vl-f32-gamma4-K1block"),
    pytest.param("qwen2_vl", "float32", 8, ALL_VISUAL, id="qwen2vl-f32-gamma8-Kall", marks=pytest.mark.slow),
    pytest.param("qwen2_vl", "float32", 1, 512, id="qwen2vl-f32-gamma1-K4blocks", marks=pytest.mark.slow),
    pytest.param("qwen2_vl", "bfloat16", 4, 256, id="qwen2vl-bf16-gamma4-K2blocks"),
    pytest.param("qwen2_5_vl", "float32", 4, 256, id="qwen25vl-f32-gamma4-K2blocks"),
    pytest.param(
        "llava_onevision", "float32", 4, 128, id="llavaov-f32-gamma4-K1block", marks=pytest.mark.slow
    ),
    pytest.param("llava_onevision", "float32", 8, ALL_VISUAL, id="llavaov-f32-gamma8-Kall"),
    pytest.param(
        "llava_onevision", "bfloat16", 8, 512, id="llavaov-bf16-gamma8-K4blocks", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("family", "dtype", "gamma", "top_k"), CASES)
def test_std_matches_no_speculation(family: str, dtype: str, gamma: int, top_k: int) -> None:
    expected = baseline(family, dtype)
    spec = {"method": "std", "num_speculative_tokens": gamma, "top_k": top_k, "adaptive": False}
    with engine(family, dtype, speculative_config=spec, **ENGINE_ARGS[family]) as llm:
        outputs = _run(llm, family)
        counters = spec_decode_counters(llm)
        std = std_metrics(llm)
        report = drafter_report(llm)

    assert outputs == expected
    # Five of the six requests carry visual input and were scored (chunked prefill and all), the follow-up
    # too, whose video KV came from the prefix cache.
    assert len(report["history"]) == 5
    assert report["skip_counts"] == {"no_visual_input": 1}
    assert counters["num_drafts"] > 0
    assert counters["num_draft_tokens"] <= gamma * counters["num_drafts"]
    for record in report["history"]:
        kept_candidates = len(record["kept"][0]) - (
            len(record["block_scores"][0]) - record["num_candidate_blocks"]
        )
        assert kept_candidates == min(-(-top_k // 128), record["num_candidate_blocks"])
    # STD's own metrics, collected from the worker into the front end's registry, agree with its state.
    assert std["requests_scored"] == len(report["history"])
    assert std["requests_skipped"] == {
        "no_visual_input": 1,
        "too_few_visual_tokens": 0,
        "no_text_after_visual": 0,
        "incomplete_capture": 0,
        "drafter_fault": 0,
    }
    assert std["drafter_faults"] == {"planning": 0, "scoring": 0, "drafting": 0, "self_check": 0}
    assert (
        std["kept_visual_tokens"]
        <= std["visual_tokens"]
        == sum(r["num_visual_tokens"] for r in report["history"])
    )
    assert std["kept_visual_fraction"][0] == len(report["history"])
    assert std["draft_seconds"][0] > 0 and std["prefill_scoring_seconds"][1] > 0
    # Adaptive gamma is off: every drafting step of a scored request is reported as a fixed gamma.
    assert std["gamma_decisions"]["fixed"] == std["gamma"][0] > 0
    assert std["gamma"][1] == gamma * std["gamma"][0]
    if top_k == ALL_VISUAL:
        # The sparse drafter then computes the dense model's function.
        assert acceptance_rate(counters) >= 0.99
        assert std["kept_visual_tokens"] == std["visual_tokens"]
    elif top_k == 128:
        # One block of ~8: the selection really drops context and drafts get rejected.
        assert acceptance_rate(counters) < 0.9
        assert std["kept_visual_tokens"] < std["visual_tokens"]


@pytest.mark.slow  # benchmark-only policies; `vllm-std bench` (tests/test_bench.py) checks them too
@pytest.mark.parametrize("selection", ["streaming", "recent_visual", "random"])
def test_baseline_selections_are_lossless(selection: str) -> None:
    """The benchmark's baseline policies change only which blocks the drafter reads, never the output."""
    spec = {
        "method": "std",
        "num_speculative_tokens": 4,
        "top_k": 256,
        "selection": selection,
        "adaptive": False,
    }
    with engine("qwen2_vl", speculative_config=spec, **ENGINE_ARGS["qwen2_vl"]) as llm:
        outputs = _run(llm, "qwen2_vl")
        counters = spec_decode_counters(llm)
        report = drafter_report(llm)
    assert outputs == baseline("qwen2_vl", "float32")
    assert counters["num_drafts"] > 0
    assert len(report["history"]) == 5
    for record in report["history"]:  # chosen by the policy, not by attention
        scores = torch.tensor(record["block_scores"])
        kept = torch.tensor(record["kept"])
        if selection == "streaming":
            assert torch.equal(kept, streaming_blocks(kept.shape[0], scores.shape[1], kept.shape[1]))
        else:
            seed = zlib.crc32(record["req_id"].encode())
            assert torch.equal(scores, baseline_scores(selection, scores.shape[0], scores.shape[1], seed))
