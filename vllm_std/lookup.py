"""Look-up drafts: the tokens that followed the request's latest tokens earlier in its own text (and, with
Arctic Inference's suffix tree, in earlier requests' answers), found as vLLM's suffix or ngram methods find
them.

A look-up draft costs no forward pass, so where an answer repeats or quotes (lists, code, a caption that
restates the question, a follow-up that quotes an earlier answer) it is cheaper than a sparse draft of
the same acceptance. The text searched is the prompt without its visual placeholder tokens (runs of one
token id that match anything and predict nothing), then the output so far: the prompt is cut once per
request, so a round searches text and output only, never the video.

Two matchers, one interface (`LookupMatcher`): vLLM's own n-gram matcher (its `ngram` method's: the
longest match of the last 2..5 tokens, and up to the round's length of what followed it), and where the
package is installed Arctic Inference's suffix tree (vLLM's `suffix` method's: per-request and
cross-request trees, so also earlier requests' answers). With both (`lookup_drafter`), a round takes the
longer draft: the suffix tree drafts no more tokens than its match is long, so inside a repeating answer
the n-gram match drafts the whole round where the tree drafts a few tokens, while only the tree finds a
continuation in an earlier request's answer.

Each draft says how long a match it came from: in text that does not repeat, matches of a token or two
are chance, and the adaptive policy tries only longer ones before their acceptance is known.
"""

import dataclasses
import importlib.util
from collections.abc import Iterable
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class LookupDraft:
    """A look-up draft's tokens, and how many of the request's latest tokens matched where they were found
    (0 where nothing was)."""

    tokens: list[int]
    match: int = 0


NO_DRAFT = LookupDraft([])


class LookupMatcher(Protocol):
    """Per request: admitted once with its prompt, asked for a draft each round, released when it ends."""

    name: str

    def known(self, req_id: str) -> bool: ...

    def admit(self, req_id: str, prompt: np.ndarray, visual: np.ndarray) -> None: ...

    def propose(self, req_id: str, tokens: np.ndarray, max_tokens: int) -> LookupDraft: ...

    def release(self, req_ids: Iterable[str]) -> None: ...

    def forget(self, live_req_ids: set[str]) -> None: ...


class NgramLookup:
    """Per request, the longest match of its last 2..5 tokens earlier in its text, and what followed it
    (`ngram_proposer._find_longest_matched_ngram_and_propose_tokens`)."""

    name = "n-gram"
    MIN_NGRAM = 2
    MAX_NGRAM = 5

    def __init__(self, max_model_len: int) -> None:
        from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens

        self._match = _find_longest_matched_ngram_and_propose_tokens
        self._max_model_len = max_model_len
        # Each request's prompt without its visual tokens, and the prompt's full length.
        self._prompts: dict[str, tuple[np.ndarray, int]] = {}

    def known(self, req_id: str) -> bool:
        return req_id in self._prompts

    def admit(self, req_id: str, prompt: np.ndarray, visual: np.ndarray) -> None:
        """Keeps the request's prompt without its visual tokens (`visual`: a mask over the prompt)."""
        self._prompts[req_id] = (np.ascontiguousarray(prompt[~visual]), len(prompt))

    def propose(self, req_id: str, tokens: np.ndarray, max_tokens: int) -> LookupDraft:
        """Up to `max_tokens` tokens that followed the request's longest last n-gram where it occurred
        before, from `tokens`, its prompt and output so far (the request admitted). vLLM's matcher does not
        say how long its match was: where it found one, the longer lengths are asked for in turn, longest
        first (one scan where nothing matches, the common case; the text is short: the prompt without its
        video, and the output)."""
        text, prompt_len = self._prompts[req_id]
        text = np.concatenate([text, tokens[prompt_len:]])
        draft = self._match(text, self.MIN_NGRAM, self.MAX_NGRAM, self._max_model_len, max_tokens)
        if not len(draft):
            return NO_DRAFT
        for n in range(self.MAX_NGRAM, self.MIN_NGRAM, -1):
            if len(self._match(text, n, n, self._max_model_len, max_tokens)):
                return LookupDraft(draft.tolist(), n)
        return LookupDraft(draft.tolist(), self.MIN_NGRAM)

    def release(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._prompts.pop(req_id, None)

    def forget(self, live_req_ids: set[str]) -> None:
        """Drops every request but `live_req_ids`."""
        self.release(set(self._prompts) - live_req_ids)


class SuffixLookup:
    """Per request, the continuation Arctic Inference's suffix trees predict for its latest tokens: from its
    own text, and from the answers of the requests before it (vLLM's `suffix` method's defaults)."""

    name = "suffix tree"
    MAX_TREE_DEPTH = 24
    MAX_CACHED_REQUESTS = 10_000
    MAX_SPEC_FACTOR = 1.0
    MIN_TOKEN_PROB = 0.1

    def __init__(self) -> None:
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self._cache = SuffixDecodingCache(self.MAX_TREE_DEPTH, self.MAX_CACHED_REQUESTS)
        # Per request: the prompt's full length, the last tokens of its text, output tokens given the tree.
        self._prompts: dict[str, tuple[int, np.ndarray]] = {}
        self._fed: dict[str, int] = {}

    def known(self, req_id: str) -> bool:
        return req_id in self._prompts

    def admit(self, req_id: str, prompt: np.ndarray, visual: np.ndarray) -> None:
        """Starts the request's tree on its prompt without its visual tokens (`visual`: a mask)."""
        text = np.ascontiguousarray(prompt[~visual], dtype=np.int32)
        if req_id in self._cache.cached_requests:
            self._cache.evict_cached_response(req_id)
        self._cache.start_request(req_id, text)
        self._prompts[req_id] = (len(prompt), text[-self.MAX_TREE_DEPTH :])
        self._fed[req_id] = 0

    def propose(self, req_id: str, tokens: np.ndarray, max_tokens: int) -> LookupDraft:
        """Up to `max_tokens` tokens predicted to follow `tokens`, the request's prompt and output so far
        (the output not yet given the tree is added first)."""
        prompt_len, tail = self._prompts[req_id]
        output = tokens[prompt_len:]
        if len(output) > self._fed[req_id]:
            self._cache.add_active_response(req_id, output[self._fed[req_id] :].tolist())
            self._fed[req_id] = len(output)
        pattern = np.concatenate([tail, output.astype(np.int32)])[-self.MAX_TREE_DEPTH :]
        draft = self._cache.speculate(
            req_id,
            pattern,
            max_spec_tokens=max_tokens,
            max_spec_factor=self.MAX_SPEC_FACTOR,
            min_token_prob=self.MIN_TOKEN_PROB,
        )
        return LookupDraft(list(draft.token_ids), draft.match_len) if draft.token_ids else NO_DRAFT

    def release(self, req_ids: Iterable[str]) -> None:
        """The requests' answers stay in the cross-request tree; their own trees go."""
        for req_id in req_ids:
            if req_id in self._cache.active_requests:
                self._cache.stop_request(req_id)
            self._prompts.pop(req_id, None)
            self._fed.pop(req_id, None)

    def forget(self, live_req_ids: set[str]) -> None:
        """Drops every request but `live_req_ids`."""
        self.release(set(self._prompts) - live_req_ids)


class LongestLookup:
    """Several matchers over the same requests: each round, the longest draft any of them finds (the
    first matcher's where they are as long)."""

    def __init__(self, matchers: list[LookupMatcher]) -> None:
        self.matchers = matchers
        self.name = " + ".join(m.name for m in matchers)

    def known(self, req_id: str) -> bool:
        return self.matchers[0].known(req_id)

    def admit(self, req_id: str, prompt: np.ndarray, visual: np.ndarray) -> None:
        for matcher in self.matchers:
            matcher.admit(req_id, prompt, visual)

    def propose(self, req_id: str, tokens: np.ndarray, max_tokens: int) -> LookupDraft:
        best = NO_DRAFT
        for matcher in self.matchers:
            draft = matcher.propose(req_id, tokens, max_tokens)
            if len(draft.tokens) > len(best.tokens):
                best = draft
        return best

    def release(self, req_ids: Iterable[str]) -> None:
        req_ids = list(req_ids)
        for matcher in self.matchers:
            matcher.release(req_ids)

    def forget(self, live_req_ids: set[str]) -> None:
        for matcher in self.matchers:
            matcher.forget(live_req_ids)


def lookup_drafter(max_model_len: int) -> LookupMatcher:
    """vLLM's n-gram matcher, and Arctic Inference's suffix tree beside it where the package is installed."""
    ngram = NgramLookup(max_model_len)
    if importlib.util.find_spec("arctic_inference") is None:
        return ngram
    return LongestLookup([ngram, SuffixLookup()])
