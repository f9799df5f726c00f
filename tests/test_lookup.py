"""Look-up drafts: what followed the request's latest tokens earlier in its text, never in its video; with
each matcher and with both (the suffix tree where Arctic Inference is installed)."""

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest

from vllm_std.lookup import (
    NO_DRAFT,
    LongestLookup,
    LookupDraft,
    LookupMatcher,
    NgramLookup,
    SuffixLookup,
    lookup_drafter,
)

VIDEO = 9  # a visual placeholder token id
ARCTIC = pytest.mark.skipif(
    importlib.util.find_spec("arctic_inference") is None, reason="Arctic Inference is not installed"
)
MATCHERS = [
    lambda: NgramLookup(1024),
    pytest.param(SuffixLookup, marks=ARCTIC),
    pytest.param(lambda: lookup_drafter(1024), marks=ARCTIC),
]

Matcher = Callable[[], LookupMatcher]


@pytest.fixture(params=MATCHERS, ids=["ngram", "suffix", "both"])
def matcher(request: pytest.FixtureRequest) -> Matcher:
    return request.param


def _drafter(matcher: Matcher, prompt: list[int], visual: list[bool]) -> LookupMatcher:
    drafter = matcher()
    drafter.admit("r", np.array(prompt, dtype=np.int32), np.array(visual))
    return drafter


def test_the_output_repeating_itself_is_looked_up(matcher: Matcher) -> None:
    prompt = [1, 2, VIDEO, VIDEO, 3]
    drafter = _drafter(matcher, prompt, [False, False, True, True, False])
    tokens = np.array([*prompt, 4, 5, 6, 7, 4, 5, 6], dtype=np.int32)
    assert drafter.propose("r", tokens, 4).tokens[:3] == [7, 4, 5]
    assert drafter.propose("r", tokens, 2).tokens == [7, 4]
    assert drafter.propose("r", tokens, 2).match == 3


def test_the_prompt_text_is_looked_up(matcher: Matcher) -> None:
    """A caption that restates the question: the answer continues as the question did."""
    prompt = [1, 2, VIDEO, VIDEO, 5, 6, 7, 8]
    drafter = _drafter(matcher, prompt, [False, False, True, True, False, False, False, False])
    assert drafter.propose("r", np.array([*prompt, 5, 6], dtype=np.int32), 2).tokens == [7, 8]


def test_visual_tokens_are_never_matched(matcher: Matcher) -> None:
    """A run of placeholder tokens matches itself everywhere and predicts nothing: it is not searched."""
    prompt = [1, *[VIDEO] * 8]
    tokens = np.array([*prompt, VIDEO], dtype=np.int32)
    assert _drafter(matcher, prompt, [False, *[True] * 8]).propose("r", tokens, 4) == NO_DRAFT
    assert _drafter(matcher, prompt, [False] * len(prompt)).propose("r", tokens, 4).tokens != []


def test_released_requests_are_forgotten(matcher: Matcher) -> None:
    drafter = _drafter(matcher, [1, 2, 3], [False] * 3)
    drafter.admit("s", np.array([4], dtype=np.int32), np.array([False]))
    drafter.forget({"s"})
    assert not drafter.known("r") and drafter.known("s")
    drafter.release(["s"])
    assert not drafter.known("s")


@ARCTIC
def test_the_suffix_tree_learns_from_earlier_answers() -> None:
    """A released request's answer stays in the cross-request tree: the next request asking the same is
    drafted from it (vLLM's ngram matcher, which reads one request's text, cannot)."""
    drafter = lookup_drafter(1024)
    assert isinstance(drafter, LongestLookup)
    question = [1, 2, 3]
    drafter.admit("a", np.array(question, dtype=np.int32), np.zeros(3, dtype=bool))
    drafter.propose("a", np.array([*question, 40, 41, 42, 43, 44], dtype=np.int32), 4)
    drafter.release(["a"])
    drafter.admit("b", np.array(question, dtype=np.int32), np.zeros(3, dtype=bool))
    assert drafter.propose("b", np.array([*question, 40], dtype=np.int32), 3).tokens[:1] == [41]


@ARCTIC
def test_both_matchers_draft_the_longer_draft() -> None:
    """In an answer that starts to repeat, the suffix tree drafts no more tokens than its match is long; the
    n-gram match drafts the whole round, and with both the round gets it."""
    prompt = [1, 2, 3]
    answer = [40, 41, 42, 43, 44, 45, 46, 47, 40, 41]
    tokens = np.array([*prompt, *answer], dtype=np.int32)
    drafts = {}
    for name, make in (
        ("ngram", lambda: NgramLookup(1024)),
        ("suffix", SuffixLookup),
        ("both", lambda: lookup_drafter(1024)),
    ):
        drafter = make()
        drafter.admit("r", np.array(prompt, dtype=np.int32), np.zeros(3, dtype=bool))
        drafts[name] = drafter.propose("r", tokens, 6)
    assert drafts["ngram"].tokens == [42, 43, 44, 45, 46, 47]
    assert len(drafts["suffix"].tokens) < 6
    assert drafts["both"] == drafts["ngram"]


def test_each_draft_says_how_long_its_match_was(matcher: Matcher) -> None:
    """The n-gram matcher's longest match (2..5 tokens) and the suffix tree's: what tells a chance match of
    a token or two from an answer that repeats."""
    prompt = [1, 2, 3]
    drafter = _drafter(matcher, prompt, [False] * 3)
    answer = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 40, 41, 42, 43, 44, 45, 46]
    longest = drafter.propose("r", np.array([*prompt, *answer], dtype=np.int32), 2)
    assert longest.tokens == [47, 48] and longest.match >= NgramLookup.MAX_NGRAM
    second_cycle = np.array([*prompt, *answer[:12]], dtype=np.int32)
    assert _drafter(matcher, prompt, [False] * 3).propose("r", second_cycle, 2) == LookupDraft([42, 43], 2)
