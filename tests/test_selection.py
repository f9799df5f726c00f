"""`vllm_std.selection`: which blocks the drafter keeps and the compacted block table it reads them through.

A wrong selection never breaks correctness (the target verifies every draft) but silently costs acceptance:
dropping a text block or keeping the wrong visual blocks. A wrong compacted table or sequence length makes
the drafter attend to the wrong physical memory. Hand-written cases pin the semantics; hypothesis checks
the invariants on random visual layouts, scores with ties, and k beyond the number of candidates.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_std.selection import (
    RequestSelection,
    candidate_blocks,
    compacted_block_table,
    compacted_seq_len,
    select_blocks,
    visual_mask,
)

MAX_EXAMPLES = 200


# ---------------------------------------------------------------------------------------------- references


def candidate_reference(visual: list[bool], block_size: int) -> list[bool]:
    """Block by block: droppable only when the block is full and every position in it is visual."""
    num_blocks = -(-len(visual) // block_size)
    out = []
    for b in range(num_blocks):
        block = visual[b * block_size : (b + 1) * block_size]
        out.append(len(block) == block_size and all(block))
    return out


def selection_reference(scores: list[float], candidates: list[bool], k: int) -> list[int]:
    """Every non-candidate plus the k best candidates by (higher score, then lower index), ascending."""
    cands = [b for b, c in enumerate(candidates) if c]
    best = sorted(cands, key=lambda b: (-scores[b], b))[:k]
    return sorted([b for b, c in enumerate(candidates) if not c] + best)


def dense_tokens_seen(kept_logical: list[int], position: int, block_size: int) -> int:
    """Tokens at positions <= `position` inside the kept logical blocks: what the drafter should attend to."""
    return sum(
        sum(1 for p in range(b * block_size, (b + 1) * block_size) if p <= position) for b in kept_logical
    )


# ----------------------------------------------------------------------------------------------- examples


def test_visual_mask_marks_every_span() -> None:
    """Several, overlapping and empty spans; a span past the end is clipped."""
    mask = visual_mask(12, [(1, 2), (2, 3), (8, 0), (10, 5)])
    want = [False, True, True, True, True, False, False, False, False, False, True, True]
    assert mask.dtype == torch.bool
    assert mask.tolist() == want


def test_visual_mask_without_spans_is_all_false() -> None:
    """A text-only prompt has no visual positions."""
    assert not visual_mask(5, []).any()


def test_candidate_blocks_by_hand() -> None:
    """A span from 3 to 13 with blocks of 4: block 0 (mid-block start) and block 3 (mid-block end) stay."""
    visual = visual_mask(18, [(3, 11)])  # positions 3..13
    assert candidate_blocks(visual, 4).tolist() == [False, True, True, False, False]


def test_partial_last_block_is_never_a_candidate() -> None:
    """An all-visual but partly filled block still receives tokens, so it cannot be dropped."""
    visual = torch.ones(10, dtype=torch.bool)
    assert candidate_blocks(visual, 4).tolist() == [True, True, False]


def test_select_blocks_by_hand() -> None:
    """Non-candidates always kept; per layer the top-2 candidates by score; result ascending."""
    candidates = torch.tensor([False, True, True, True, True, False])
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.3, 0.7, 9.0],  # best candidates: 4, 2
            [0.0, 0.9, 0.2, 0.8, 0.1, 0.0],  # best candidates: 1, 3
        ]
    )
    kept = select_blocks(scores, candidates, 2)
    assert kept.dtype == torch.int64
    assert kept.tolist() == [[0, 2, 4, 5], [0, 1, 3, 5]]


def test_select_blocks_ties_go_to_the_earlier_block() -> None:
    """All candidates score the same: the lowest-indexed ones win."""
    candidates = torch.tensor([True, True, False, True, True])
    kept = select_blocks(torch.ones(1, 5), candidates, 2)
    assert kept.tolist() == [[0, 1, 2]]


def test_select_blocks_k_beyond_candidates_keeps_everything() -> None:
    """top_k larger than the video keeps every block."""
    candidates = torch.tensor([True, False, True])
    assert select_blocks(torch.rand(3, 3), candidates, 10).tolist() == [[0, 1, 2]] * 3


def test_select_blocks_without_candidates_or_with_k_zero() -> None:
    """No candidates: all blocks; k = 0: only the non-candidates."""
    assert select_blocks(torch.rand(2, 4), torch.zeros(4, dtype=torch.bool), 3).tolist() == [[0, 1, 2, 3]] * 2
    candidates = torch.tensor([False, True, True, False])
    assert select_blocks(torch.rand(2, 4), candidates, 0).tolist() == [[0, 3]] * 2


def test_compacted_block_table_by_hand() -> None:
    """Kept prompt blocks, then every block after the prompt, mapped to physical ids."""
    physical = torch.tensor([40, 41, 42, 43, 44, 45, 46], dtype=torch.int32)
    kept = torch.tensor([[0, 2, 4], [1, 3, 4]])
    table = compacted_block_table(kept, num_prompt_blocks=5, num_blocks=7, physical=physical)
    assert table.tolist() == [[40, 42, 44, 45, 46], [41, 43, 44, 45, 46]]
    assert table.dtype == torch.int32


def test_compacted_block_table_with_the_newest_token_in_the_last_prompt_block() -> None:
    """num_blocks == num_prompt_blocks: no tail, only the kept prompt blocks."""
    physical = torch.tensor([7, 3, 9])
    table = compacted_block_table(torch.tensor([[0, 2]]), 3, 3, physical)
    assert table.tolist() == [[7, 9]]


def test_compacted_seq_len_by_hand() -> None:
    """Three kept blocks of 4, newest token at offset 2 of its block: 4 + 4 + 3 tokens."""
    assert compacted_seq_len(3, position=22, block_size=4) == 11
    assert compacted_seq_len(1, position=0, block_size=16) == 1
    assert compacted_seq_len(2, position=31, block_size=16) == 32


def test_request_selection_is_frozen() -> None:
    """A selection is fixed once scored; the proposer must not mutate it per step."""
    sel = RequestSelection(torch.tensor([[0]]), 1, 0, 0, 0)
    with pytest.raises(AttributeError):
        sel.num_prompt_blocks = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- properties


@st.composite
def prompts(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int]]]:
    """(num_tokens, block_size, spans): spans may start or end mid-block, overlap, be empty or cover all."""
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    num_tokens = draw(st.integers(1, 12 * block_size))
    kind = draw(st.sampled_from(["random", "everything", "nothing", "block-aligned"]))
    if kind == "everything":
        spans = [(0, num_tokens)]
    elif kind == "nothing":
        spans = []
    elif kind == "block-aligned":
        num_blocks = -(-num_tokens // block_size)
        first = draw(st.integers(0, num_blocks))
        last = draw(st.integers(first, num_blocks))
        spans = [(first * block_size, (last - first) * block_size)]
    else:
        spans = draw(
            st.lists(
                st.tuples(st.integers(0, num_tokens), st.integers(0, num_tokens)), min_size=1, max_size=4
            )
        )
    return num_tokens, block_size, spans


score_values = st.one_of(
    st.integers(0, 3).map(float),  # few distinct values: plenty of ties
    st.floats(0.0, 1.0, width=32),
)


@st.composite
def selections(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(scores [L, nb], candidates [nb], k, num_tokens, block_size) from a random prompt layout."""
    num_tokens, block_size, spans = draw(prompts())
    candidates = candidate_blocks(visual_mask(num_tokens, spans), block_size)
    num_blocks = candidates.shape[0]
    num_layers = draw(st.integers(1, 3))
    flat = draw(st.lists(score_values, min_size=num_layers * num_blocks, max_size=num_layers * num_blocks))
    scores = torch.tensor(flat, dtype=torch.float32).view(num_layers, num_blocks)
    k = draw(st.integers(0, num_blocks + 3))
    return scores, candidates, k, num_tokens, block_size


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(prompts())
def test_candidates_are_exactly_the_full_visual_blocks(
    prompt: tuple[int, int, list[tuple[int, int]]],
) -> None:
    """Block-by-block reference; and no candidate ever holds a non-visual (text) position."""
    num_tokens, block_size, spans = prompt
    visual = visual_mask(num_tokens, spans)
    cands = candidate_blocks(visual, block_size)
    assert cands.dtype == torch.bool
    assert cands.tolist() == candidate_reference(visual.tolist(), block_size)
    positions = torch.arange(num_tokens)
    in_candidate = cands[positions // block_size]
    assert not (in_candidate & ~visual).any()


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(selections())
def test_select_blocks_invariants(case: tuple[torch.Tensor, torch.Tensor, int, int, int]) -> None:
    """Every non-candidate, min(k, C) of the best candidates, ascending, ties to the lower index."""
    scores, candidates, k, _, _ = case
    kept = select_blocks(scores, candidates, k)
    cand_list = candidates.tolist()
    num_candidates = sum(cand_list)
    non_candidates = {b for b, c in enumerate(cand_list) if not c}
    want_kept = min(k, num_candidates)
    assert kept.dtype == torch.int64
    assert kept.shape == (scores.shape[0], len(non_candidates) + want_kept)
    for layer, row in enumerate(kept.tolist()):
        layer_scores = scores[layer].tolist()
        assert row == sorted(set(row)), "ascending, no duplicates"
        assert non_candidates <= set(row)
        chosen = [b for b in row if cand_list[b]]
        unchosen = [b for b, c in enumerate(cand_list) if c and b not in chosen]
        assert len(chosen) == want_kept
        for c in chosen:
            for u in unchosen:
                assert layer_scores[u] <= layer_scores[c], (u, c)
                if layer_scores[u] == layer_scores[c]:
                    assert u > c, f"tie between {u} and {c} must go to the earlier block"
        assert row == selection_reference(layer_scores, cand_list, k)


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(selections(), st.data())
def test_compacted_view_matches_the_dense_kept_tokens(
    case: tuple[torch.Tensor, torch.Tensor, int, int, int], data: st.DataObject
) -> None:
    """For any drafter position after the prompt: the table ends at the newest block and the sequence length
    equals the number of dense tokens (positions <= position) inside the kept blocks."""
    scores, candidates, k, num_tokens, block_size = case
    kept = select_blocks(scores, candidates, k)
    num_prompt_blocks = candidates.shape[0]
    # The first draft writes the sampled token at position num_tokens; later ones go further.
    position = data.draw(st.integers(num_tokens, num_tokens + 3 * block_size), label="position")
    num_blocks = position // block_size + 1
    physical = torch.randperm(num_blocks + 5, generator=torch.Generator().manual_seed(position))[:num_blocks]
    physical = physical.to(torch.int32)

    table = compacted_block_table(kept, num_prompt_blocks, num_blocks, physical)
    m = kept.shape[1]
    assert table.shape == (kept.shape[0], m + num_blocks - num_prompt_blocks)
    assert torch.all(table[:, -1] == physical[num_blocks - 1])
    seq_len = compacted_seq_len(table.shape[1], position, block_size)
    for layer in range(kept.shape[0]):
        logical = kept[layer].tolist() + list(range(num_prompt_blocks, num_blocks))
        assert table[layer].tolist() == [int(physical[b]) for b in logical]
        assert logical[-1] == position // block_size, "the newest token's block closes the view"
        assert seq_len == dense_tokens_seen(logical, position, block_size)
        full_blocks = len(logical) - 1
        assert seq_len == full_blocks * block_size + position % block_size + 1


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(prompts(), st.data())
def test_kept_visual_tokens_are_the_visual_positions_of_the_kept_blocks(
    prompt: tuple[int, int, list[tuple[int, int]]], data: st.DataObject
) -> None:
    """The figure behind `vllm:std_kept_visual_tokens_total`, counted position by position per layer."""
    num_tokens, block_size, spans = prompt
    visual = visual_mask(num_tokens, spans)
    candidates = candidate_blocks(visual, block_size)
    num_candidates = int(candidates.sum())
    k = data.draw(st.integers(0, num_candidates + 2))
    scores = torch.rand(2, candidates.shape[0])
    kept = select_blocks(scores, candidates, k)
    selection = RequestSelection(
        kept, candidates.shape[0], int(visual.sum()), num_candidates, min(k, num_candidates)
    )
    for row in kept.tolist():
        in_kept = torch.isin(torch.arange(num_tokens) // block_size, torch.tensor(row, dtype=torch.int64))
        assert selection.num_kept_visual_tokens(block_size) == int((visual & in_kept).sum())
