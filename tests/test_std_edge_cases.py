"""Edge cases, each lossless and error-free: STD's output equals the same engine's without speculation.

K covers every visual block here, so the drafter sees what the verifier sees and its drafts are accepted:
each case's boundary (the model length, `max_tokens`, a stop string or stop token) then falls inside an
accepted run of drafts, not only between them. Selection at small K is tested by test_std_lossless,
preemption and aborted requests (decode and prefill) by test_std_robustness, prefix-cache hits on the
video by both.
"""

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import engine
from vllm import LLM, SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import prompt_token_count, synthetic_image, vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.metrics import spec_decode_counters

GAMMA = 6
SPEC = {"method": "std", "num_speculative_tokens": GAMMA, "top_k": 100_000, "adaptive": False}
PATH = str(tiny_model("qwen2_vl"))
ROOM = 3
"""Tokens the longest prompt may generate before it reaches `max_model_len`: fewer than gamma."""


def _video(frames: int, seed: int) -> Any:
    return synthetic_frames(frames, 224, 224, seed=seed)


NEAR_LIMIT = vllm_request(PATH, "What happens in the video?", videos=[_video(40, 20)])
MAX_MODEL_LEN = prompt_token_count(PATH, NEAR_LIMIT) + ROOM
ENGINE_ARGS = {
    "max_model_len": MAX_MODEL_LEN,
    "max_num_batched_tokens": 512,
    "limit_mm_per_prompt": {"video": 2, "image": 2},
}


def greedy(max_tokens: int = 40, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


CASES: dict[str, tuple[dict[str, Any], SamplingParams]] = {
    "no-visual-input": (vllm_request(PATH, "Tell me about the red car."), greedy()),
    "visual-tokens-fewer-than-one-block": (
        vllm_request(PATH, "What is in the picture?", images=[synthetic_image(112, 112, seed=21)]),
        greedy(),
    ),
    "two-videos": (
        vllm_request(PATH, "Which video is brighter?", videos=[_video(16, 22), _video(16, 23)]),
        greedy(),
    ),
    "two-images-and-a-video": (
        vllm_request(
            PATH,
            "Do the pictures appear in the video?",
            videos=[_video(16, 24)],
            images=[synthetic_image(224, 224, seed=25), synthetic_image(224, 224, seed=26)],
        ),
        greedy(),
    ),
    "prompt-ends-near-max-model-len": (NEAR_LIMIT, greedy(max_tokens=64)),
    "max-tokens-1": (vllm_request(PATH, "Describe it.", videos=[_video(32, 27)]), greedy(max_tokens=1)),
    "max-tokens-inside-a-draft": (
        vllm_request(PATH, "Describe it briefly.", videos=[_video(32, 28)]),
        greedy(max_tokens=GAMMA + 3),
    ),
}
STOPPED = vllm_request(PATH, "What happens at the end?", videos=[_video(32, 29)])
"""The request whose greedy output, without speculation, gives the stop string and the stop token."""


def _stop_cases(unstopped: Any) -> dict[str, tuple[dict[str, Any], SamplingParams]]:
    """A stop string and a stop token taken from the middle of an unstopped answer (inside a draft)."""
    tokens = list(unstopped.token_ids)
    text = unstopped.text
    stop = text[len(text) // 3 : len(text) // 3 + 4]
    assert stop.strip(), text
    return {
        "stop-string-inside-a-draft": (STOPPED, greedy(stop=[stop])),
        "stop-token-inside-a-draft": (STOPPED, greedy(stop_token_ids=[tokens[GAMMA + 2]])),
    }


def _generate(llm: LLM, cases: dict[str, tuple[dict[str, Any], SamplingParams]]) -> dict[str, Any]:
    outputs = llm.generate([r for r, _ in cases.values()], [p for _, p in cases.values()])
    return {name: out.outputs[0] for name, out in zip(cases, outputs, strict=True)}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Any]]:
    with engine("qwen2_vl", **ENGINE_ARGS) as llm:
        plain = _generate(llm, {**CASES, "unstopped": (STOPPED, greedy())})
        stop_cases = _stop_cases(plain.pop("unstopped"))
        plain |= _generate(llm, stop_cases)
    with engine("qwen2_vl", speculative_config=SPEC, **ENGINE_ARGS) as llm:
        std = _generate(llm, CASES) | _generate(llm, stop_cases)
        counters = spec_decode_counters(llm)
    yield {"plain": plain, "std": std, "counters": counters}


@pytest.mark.parametrize("case", [*CASES, "stop-string-inside-a-draft", "stop-token-inside-a-draft"])
def test_edge_case_is_lossless(runs: dict[str, Any], case: str) -> None:
    plain, std = runs["plain"][case], runs["std"][case]
    assert list(std.token_ids) == list(plain.token_ids)
    assert std.text == plain.text
    assert (std.finish_reason, std.stop_reason) == (plain.finish_reason, plain.stop_reason)


def test_boundaries_are_where_they_should_be(runs: dict[str, Any]) -> None:
    """The cases test what they claim: each run ends at its boundary, and STD drafted and was accepted."""
    std = runs["std"]
    assert len(std["prompt-ends-near-max-model-len"].token_ids) == ROOM
    assert std["prompt-ends-near-max-model-len"].finish_reason == "length"
    assert len(std["max-tokens-1"].token_ids) == 1
    assert len(std["max-tokens-inside-a-draft"].token_ids) == GAMMA + 3
    for case in ("stop-string-inside-a-draft", "stop-token-inside-a-draft"):
        assert std[case].finish_reason == "stop"
        assert 0 < len(std[case].token_ids) < 40
    assert runs["counters"]["num_accepted_tokens"] > 0
