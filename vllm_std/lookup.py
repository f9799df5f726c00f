"""Look-up drafts: the tokens that followed the same n-gram earlier in a request's own text, as vLLM's ngram
method finds them (`ngram_proposer._find_longest_matched_ngram_and_propose_tokens`, the same matcher).

A look-up draft costs no forward pass, so where an answer repeats or quotes (lists, code, a caption that
restates the question, a follow-up that quotes an earlier answer) it is cheaper than a sparse draft of
the same acceptance. The text searched is the prompt without its visual placeholder tokens (runs of one
token id that match anything and predict nothing) followed by the output so far; the prompt's part is
cut once per request, so each round searches only text and output, never the video.
"""

from collections.abc import Iterable

import numpy as np


class LookupDrafter:
    """Per request, the longest match of its last 2..5 tokens earlier in its text, and what followed it."""

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

    def propose(self, req_id: str, tokens: np.ndarray, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the request's last n-gram where it last occurred before
        (`[]` where it has not), from `tokens`, its prompt and output so far (the request admitted)."""
        text, prompt_len = self._prompts[req_id]
        text = np.concatenate([text, tokens[prompt_len:]])
        return self._match(text, self.MIN_NGRAM, self.MAX_NGRAM, self._max_model_len, max_tokens).tolist()

    def release(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._prompts.pop(req_id, None)

    def forget(self, live_req_ids: set[str]) -> None:
        """Drops every request but `live_req_ids`."""
        self.release(set(self._prompts) - live_req_ids)
