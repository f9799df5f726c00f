"""Look-up drafts: what followed the request's latest tokens earlier in its text, never in its video; with
both matchers (the suffix tree where Arctic Inference is installed)."""

import importlib.util

import numpy as np
import pytest

from vllm_std.lookup import LookupDrafter, NgramLookup, SuffixLookup, lookup_drafter

VIDEO = 9  # a visual placeholder token id
MATCHERS = [
    NgramLookup,
    pytest.param(
        SuffixLookup,
        marks=pytest.mark.skipif(
            importlib.util.find_spec("arctic_inference") is None, reason="Arctic Inference is not installed"
        ),
    ),
]


@pytest.fixture(params=MATCHERS, ids=["ngram", "suffix"])
def matcher(request: pytest.FixtureRequest) -> type[LookupDrafter]:
    return request.param


def _drafter(matcher: type[LookupDrafter], prompt: list[int], visual: list[bool]) -> LookupDrafter:
    drafter = matcher(1024)
    drafter.admit("r", np.array(prompt, dtype=np.int32), np.array(visual))
    return drafter


def test_the_output_repeating_itself_is_looked_up(matcher: type[LookupDrafter]) -> None:
    prompt = [1, 2, VIDEO, VIDEO, 3]
    drafter = _drafter(matcher, prompt, [False, False, True, True, False])
    tokens = np.array([*prompt, 4, 5, 6, 7, 4, 5, 6], dtype=np.int32)
    assert drafter.propose("r", tokens, 4)[:3] == [7, 4, 5]
    assert drafter.propose("r", tokens, 2) == [7, 4]


def test_the_prompt_text_is_looked_up(matcher: type[LookupDrafter]) -> None:
    """A caption that restates the question: the answer continues as the question did."""
    prompt = [1, 2, VIDEO, VIDEO, 5, 6, 7, 8]
    drafter = _drafter(matcher, prompt, [False, False, True, True, False, False, False, False])
    assert drafter.propose("r", np.array([*prompt, 5, 6], dtype=np.int32), 2) == [7, 8]


def test_visual_tokens_are_never_matched(matcher: type[LookupDrafter]) -> None:
    """A run of placeholder tokens matches itself everywhere and predicts nothing: it is not searched."""
    prompt = [1, *[VIDEO] * 8]
    tokens = np.array([*prompt, VIDEO], dtype=np.int32)
    assert _drafter(matcher, prompt, [False, *[True] * 8]).propose("r", tokens, 4) == []
    assert _drafter(matcher, prompt, [False] * len(prompt)).propose("r", tokens, 4) != []


def test_released_requests_are_forgotten(matcher: type[LookupDrafter]) -> None:
    drafter = _drafter(matcher, [1, 2, 3], [False] * 3)
    drafter.admit("s", np.array([4], dtype=np.int32), np.array([False]))
    drafter.forget({"s"})
    assert not drafter.known("r") and drafter.known("s")
    drafter.release(["s"])
    assert not drafter.known("s")


@pytest.mark.skipif(importlib.util.find_spec("arctic_inference") is None, reason="Arctic Inference missing")
def test_the_suffix_tree_learns_from_earlier_answers() -> None:
    """A released request's answer stays in the cross-request tree: the next request asking the same is
    drafted from it (vLLM's ngram matcher, which reads one request's text, cannot)."""
    drafter = lookup_drafter(1024)
    assert isinstance(drafter, SuffixLookup)
    question = [1, 2, 3]
    drafter.admit("a", np.array(question, dtype=np.int32), np.zeros(3, dtype=bool))
    drafter.propose("a", np.array([*question, 40, 41, 42, 43, 44], dtype=np.int32), 4)
    drafter.release(["a"])
    drafter.admit("b", np.array(question, dtype=np.int32), np.zeros(3, dtype=bool))
    assert drafter.propose("b", np.array([*question, 40], dtype=np.int32), 3)[:1] == [41]
