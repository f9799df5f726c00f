"""Look-up drafts: what followed the request's last n-gram earlier in its text, never in its video."""

import numpy as np

from vllm_std.lookup import LookupDrafter

VIDEO = 9  # a visual placeholder token id


def _drafter(prompt: list[int], visual: list[bool]) -> LookupDrafter:
    drafter = LookupDrafter(max_model_len=1024)
    drafter.admit("r", np.array(prompt, dtype=np.int32), np.array(visual))
    return drafter


def test_the_output_repeating_itself_is_looked_up() -> None:
    prompt = [1, 2, VIDEO, VIDEO, 3]
    drafter = _drafter(prompt, [False, False, True, True, False])
    tokens = np.array([*prompt, 4, 5, 6, 7, 4, 5], dtype=np.int32)
    assert drafter.propose("r", tokens, 4) == [6, 7, 4, 5]
    assert drafter.propose("r", tokens, 2) == [6, 7]


def test_the_prompt_text_is_looked_up() -> None:
    """A caption that restates the question: the answer continues as the question did."""
    prompt = [1, 2, VIDEO, VIDEO, 5, 6, 7, 8]
    drafter = _drafter(prompt, [False, False, True, True, False, False, False, False])
    assert drafter.propose("r", np.array([*prompt, 5, 6], dtype=np.int32), 3) == [7, 8, 5]


def test_visual_tokens_are_never_matched() -> None:
    """A run of placeholder tokens matches itself everywhere and predicts nothing: it is not searched."""
    prompt = [1, *[VIDEO] * 8, 2]
    visual = [False, *[True] * 8, False]
    drafter = _drafter(prompt, visual)
    assert drafter.propose("r", np.array([*prompt, VIDEO, VIDEO], dtype=np.int32), 4) == []
    with_video = LookupDrafter(max_model_len=1024)
    with_video.admit("r", np.array(prompt, dtype=np.int32), np.zeros(len(prompt), dtype=bool))
    assert with_video.propose("r", np.array([*prompt, VIDEO, VIDEO], dtype=np.int32), 4) != []


def test_released_requests_are_forgotten() -> None:
    drafter = _drafter([1, 2, 3], [False] * 3)
    drafter.admit("s", np.array([4], dtype=np.int32), np.array([False]))
    drafter.forget({"s"})
    assert not drafter.known("r") and drafter.known("s")
    drafter.release(["s"])
    assert not drafter.known("s")
