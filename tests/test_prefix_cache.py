"""Prefix caching (vLLM's default) and STD: the scorer reads every key from the paged KV cache, so a request
whose video, or whose system prompt, comes from the cache is scored exactly as without the cache, and drafted.

One conversation of three turns about one video (each turn a new request repeating the ones before, as the
OpenAI API sends them), then two requests about other videos behind one long shared system prompt, then a
prompt that ends with its video: through an engine without speculation, STD with prefix caching, and STD
without it (every prompt prefilled from scratch). Prompts are prefilled in chunks of 512 tokens.
"""

import functools
from typing import Any

import pytest
import torch
from helpers import GREEDY, drafter_report, engine, token_ids
from vllm import LLM

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.metrics import spec_decode_counters, std_metrics

FAMILY = "qwen2_vl"
SPEC = {"method": "std", "num_speculative_tokens": 4, "top_k": 256, "adaptive": False}
QUESTIONS = ["What happens in the video?", "What changes after that?", "And at the end?"]
SYSTEM = "You are a careful video analyst. " * 24  # about 170 tokens: more than a KV block of 128


def _path() -> str:
    return str(tiny_model(FAMILY))


def _follow_up(prompt: str, answer: str, question: str) -> str:
    """The next turn's prompt: the conversation so far, the model's answer, and a new question."""
    return f"{prompt}{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def _with_system(request: dict[str, Any]) -> dict[str, Any]:
    return {**request, "prompt": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n{request['prompt']}"}


def _cache_hits(llm: LLM) -> float:
    """Prompt tokens vLLM took from its prefix cache so far (its own counter)."""
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def _run(llm: LLM) -> dict[str, Any]:
    """The conversation turn by turn (vLLM's counters after each), then the system-prompt pair, then the
    prompt that ends with its video."""
    video = synthetic_frames(32, 224, 224, seed=11)
    request = vllm_request(_path(), QUESTIONS[0], videos=[video])
    outputs, counters = [], []
    for question in [*QUESTIONS[1:], None]:
        out = llm.generate([request], GREEDY)[0]
        outputs.append(list(out.outputs[0].token_ids))
        counters.append(spec_decode_counters(llm) if llm.llm_engine.vllm_config.speculative_config else {})
        counters[-1]["prefix_cache_hits"] = _cache_hits(llm)
        if question is not None:
            request = {**request, "prompt": _follow_up(request["prompt"], out.outputs[0].text, question)}
    videos = [synthetic_frames(32, 224, 224, seed=seed) for seed in (12, 13)]
    pair = [_with_system(vllm_request(_path(), "Describe the first frame.", videos=[v])) for v in videos]
    for r in pair:  # one after the other: the second finds the system prompt in the cache
        before = _cache_hits(llm)
        outputs += token_ids(llm.generate([r], GREEDY))
    system_prompt_hits = _cache_hits(llm) - before
    ends_with_video = vllm_request(_path(), "", videos=[synthetic_frames(16, 224, 224, seed=14)])
    ends_with_video["prompt"] = "<|im_start|>user\n<|vision_start|><|video_pad|>"
    outputs += token_ids(llm.generate([ends_with_video], GREEDY))
    report = drafter_report(llm) if llm.llm_engine.vllm_config.speculative_config else {}
    std = std_metrics(llm) if report else {}
    return {
        "outputs": outputs,
        "counters": counters,
        "system_prompt_hits": system_prompt_hits,
        "report": report,
        "std": std,
    }


@functools.cache
def _results(spec: bool, prefix_caching: bool) -> dict[str, Any]:
    kwargs = {"max_num_batched_tokens": 512, "enable_prefix_caching": prefix_caching}
    with engine(FAMILY, speculative_config=SPEC if spec else None, **kwargs) as llm:
        return _run(llm)


@pytest.fixture(scope="module")
def cached() -> dict[str, Any]:
    return _results(spec=True, prefix_caching=True)


@pytest.fixture(scope="module")
def uncached() -> dict[str, Any]:
    return _results(spec=True, prefix_caching=False)


@pytest.mark.slow  # the follow-up and scoring tests here keep the prefix-cache path in the default suite
def test_outputs_equal_no_speculation(cached, uncached) -> None:
    expected = _results(spec=False, prefix_caching=True)["outputs"]
    assert cached["outputs"] == expected
    assert uncached["outputs"] == expected


def test_every_turn_of_a_conversation_is_drafted(cached) -> None:
    """Turns 2 and 3 find the video (and turn 1's answer) in the prefix cache, and are drafted all the
    same: vLLM's draft and accepted-token counters move on every turn."""
    hits = [c["prefix_cache_hits"] for c in cached["counters"]]
    assert hits[0] == 0 and hits[1] >= 1024 and hits[2] - hits[1] >= 1024, hits  # the ~1k-token video
    before = {"num_drafts": 0, "num_accepted_tokens": 0}
    for turn, counters in enumerate(cached["counters"], start=1):
        for name in before:
            assert counters[name] > before[name], (turn, name, cached["counters"])
        before = counters


def test_prefix_cache_hits_score_as_without_the_cache(cached, uncached) -> None:
    """The block scores (and so the kept blocks) of every scored request equal those of the engine that
    prefilled every prompt from scratch: the keys served from the cache are in every softmax denominator,
    the system prompt's attention sink among them."""
    assert cached["system_prompt_hits"] >= 128 and uncached["system_prompt_hits"] == 0
    got, want = cached["report"]["history"], uncached["report"]["history"]
    assert len(got) == len(want) == 5  # three turns and the pair; the last prompt is not scored
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(g["block_scores"]), torch.tensor(w["block_scores"]))
        assert g["kept"] == w["kept"]


def test_a_prompt_ending_with_its_video_is_not_scored(cached) -> None:
    """No text after the video asks about it: no attention to rank blocks by. It decodes without drafts
    (counted by reason), and its output is the model's own (test_outputs_equal_no_speculation)."""
    assert cached["report"]["skip_counts"] == {"no_text_after_visual": 1}
    assert cached["std"]["requests_skipped"]["no_text_after_visual"] == 1
