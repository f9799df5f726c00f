"""`vllm_std.selection`: which blocks the drafter keeps; `vllm_std.draft_step`: the compacted block tables it
reads them through.

A wrong selection never breaks correctness (the target verifies every draft) but silently costs acceptance:
dropping a text block or keeping the wrong visual blocks. A wrong compacted table or sequence length makes
the drafter attend to the wrong physical memory. Hand-written cases pin the semantics; hypothesis checks
the invariants on random visual layouts (several spans, adjacent, on or off block edges, prompts shorter
than a block), scores with frequent ties, k from 0 to past the number of blocks, and a decode tail of
several blocks.
"""

from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_std.draft_step import DraftRequest, DraftRound, KeptBlocks
from vllm_std.selection import (
    RequestSelection,
    baseline_scores,
    candidate_blocks,
    compacted_seq_len,
    select_blocks,
    streaming_blocks,
    visual_mask,
)

MAX_EXAMPLES = 150


# ---------------------------------------------------------------------------------------------- references


def candidate_reference(visual: list[bool], block_size: int) -> list[bool]:
    """Block by block: droppable only when the block is full and every position in it is visual."""
    num_blocks = -(-len(visual) // block_size)
    out = []
    for b in range(num_blocks):
        block = visual[b * block_size : (b + 1) * block_size]
        out.append(len(block) == block_size and all(block))
    return out


# ----------------------------------------------------------------------------------------------- examples


def test_visual_mask_marks_every_span() -> None:
    """Several, overlapping and empty spans; a span past the end is clipped."""
    mask = visual_mask(12, [(1, 2), (2, 3), (8, 0), (10, 5)])
    want = [False, True, True, True, True, False, False, False, False, False, True, True]
    assert mask.dtype == torch.bool
    assert mask.tolist() == want


def test_visual_mask_leaves_text_inside_a_span_visible() -> None:
    """vLLM's `is_embed`: a span's non-embedding positions (timestamps between frames, vision start and end
    tokens) are text; the drafter never drops them. A span without one is all embeddings."""
    embed = torch.tensor([False, True, True, False, True, True, False])
    mask = visual_mask(12, [(2, 7), (10, 5)], [embed, None])
    want = [False, False, False, True, True, False, True, True, False, False, True, True]
    assert mask.tolist() == want
    # Overlapping spans: a position is visual where any span embeds there.
    assert visual_mask(4, [(0, 3), (1, 2)], [torch.tensor([True, False, False]), None]).tolist() == [
        True,
        True,
        True,
        False,
    ]


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


def _round(
    kept: torch.Tensor, num_prompt_blocks: int, physical: list[int], first: int, num_drafts: int, bs: int
) -> DraftRound:
    """One request's round: kept prompt blocks `kept` (logical), its draft steps at positions `first` ..
    `first + num_drafts - 1`."""
    selection = RequestSelection(kept, num_prompt_blocks, 0, 0, 0, 0)
    ids = torch.tensor(physical, dtype=torch.int32)
    request = DraftRequest(0, selection, first + 1, num_drafts, ids[kept], physical, 0)
    return DraftRound([request], kept.shape[0], bs, torch.device("cpu"))


def test_draft_round_tables_by_hand() -> None:
    """Kept prompt blocks, then every block after the prompt up to the last draft's, mapped to physical ids;
    each step's length ends at its own position (blocks of 4: position 22 is offset 2 of logical block 5)."""
    physical = [40, 41, 42, 43, 44, 45, 46]
    kept = torch.tensor([[0, 2, 4], [1, 3, 4]])
    draft_round = _round(kept, 5, physical, first=22, num_drafts=4, bs=4)  # positions 22 .. 25
    seq_lens, slots, positions = draft_round.step([0], 0)
    tables = draft_round.tables
    assert tables[:, 0].tolist() == [[40, 42, 44, 45, 46], [41, 43, 44, 45, 46]]
    assert tables.dtype == torch.int32
    assert (seq_lens, slots, positions) == ([4 + 4 + 4 + 3], [45 * 4 + 2], [22])
    seq_lens, slots, positions = draft_round.step([0], 2)  # position 24: offset 0 of logical block 6
    assert (seq_lens, slots, positions) == ([4 * 4 + 1], [46 * 4], [24])


def test_draft_round_with_the_newest_token_in_the_last_prompt_block() -> None:
    """A draft in the last prompt block: no block after the prompt, only the kept prompt blocks."""
    draft_round = _round(torch.tensor([[0, 2]]), 3, [7, 3, 9], first=9, num_drafts=1, bs=4)
    seq_lens, slots, _ = draft_round.step([0], 0)
    assert draft_round.tables[:, 0].tolist() == [[7, 9]]
    assert (seq_lens, slots) == ([4 + 2], [9 * 4 + 1])


class CountingIds(list):
    """A block list that counts the ids read from it."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[override]
        item = super().__getitem__(index)
        CountingIds.reads += len(item) if isinstance(index, slice) else 1
        return item


def test_host_work_of_a_round_does_not_grow_with_the_prompt() -> None:
    """A request's kept prompt blocks are read once (`KeptBlocks`); after that a round reads only the ids of
    the blocks after the prompt and one id a step, however long the prompt: a 128k-token video at GPU block
    size 16 is 8192 ids, read once, not every step."""
    bs, steps = 16, 6
    for num_prompt_blocks in (64, 8192):
        physical = CountingIds(range(1000, 1000 + num_prompt_blocks + 2))
        kept = torch.arange(0, num_prompt_blocks, num_prompt_blocks // 32).expand(2, -1)
        selection = RequestSelection(kept, num_prompt_blocks, 0, 0, 0, 0)
        cache = KeptBlocks(torch.device("cpu"))
        first = num_prompt_blocks * bs + 12  # the round's drafts cross into the second block after the prompt
        CountingIds.reads = 0
        ids = cache.of("r", selection, physical)
        assert CountingIds.reads == num_prompt_blocks + 1
        assert cache.of("r", selection, physical) is ids, "made once per request"
        CountingIds.reads = 0
        kept_ids = cache.of("r", selection, physical)
        request = DraftRequest(0, selection, first + 1, steps, kept_ids, physical, 0)
        draft_round = DraftRound([request], 2, bs, torch.device("cpu"))
        for step in range(steps):
            draft_round.step([0], step)
        assert CountingIds.reads == 1 + 2 + steps, "the last prompt block's id, the tail's two, a slot a step"
        physical.append(5)  # vLLM appends blocks in place: still the same list
        assert cache.of("r", selection, physical) is ids
        resumed = CountingIds(range(2000, 2000 + num_prompt_blocks + 2))  # preempted, then resumed
        assert cache.of("r", selection, resumed)[0, 0] == 2000
        cache.release({"r"})
        assert cache.of("r", selection, resumed) is not ids


def test_compacted_seq_len_by_hand() -> None:
    """Three kept blocks of 4, newest token at offset 2 of its block: 4 + 4 + 3 tokens."""
    assert compacted_seq_len(3, position=22, block_size=4) == 11
    assert compacted_seq_len(1, position=0, block_size=16) == 1
    assert compacted_seq_len(2, position=31, block_size=16) == 32


def test_request_selection_is_frozen() -> None:
    """A selection is fixed once scored; the proposer must not mutate it per step."""
    sel = RequestSelection(torch.tensor([[0]]), 1, 0, 0, 0, 0)
    with pytest.raises(AttributeError):
        sel.num_prompt_blocks = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- strategies


class Prompt(NamedTuple):
    """`num_tokens` positions in blocks of `block_size`, visual inside the `(offset, length)` spans."""

    num_tokens: int
    block_size: int
    spans: list[tuple[int, int]]

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    def visual(self) -> torch.Tensor:
        return visual_mask(self.num_tokens, self.spans)


@st.composite
def prompts(draw: st.DrawFn) -> Prompt:
    """Text and one to four visual spans in order. Span boundaries are drawn on block edges or anywhere, so
    spans start and end on edges and mid-block, touch (adjacent spans) or are empty; the text after the last
    span is often empty or short, so prompts can end in a visual block or be shorter than one block."""
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    on_edge = st.sampled_from(range(0, 8 * block_size + 1, block_size))
    boundary = st.one_of(on_edge, st.integers(0, 8 * block_size))
    num_spans = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(boundary, min_size=2 * num_spans, max_size=2 * num_spans)))
    spans = [(start, end - start) for start, end in zip(cuts[::2], cuts[1::2], strict=True)]
    text_after = draw(st.one_of(st.just(0), st.integers(0, 2 * block_size)))
    return Prompt(max(1, cuts[-1] + text_after), block_size, spans)


class Case(NamedTuple):
    """A prompt, per-layer block scores `[L, num_blocks]` and the number `k` of candidate blocks to keep."""

    prompt: Prompt
    scores: torch.Tensor
    k: int


# Few distinct values make ties common (also between a kept and a dropped candidate); floats the general case.
tied_scores = st.integers(0, 2).map(float)
any_scores = st.floats(0.0, 1.0, width=32)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A prompt, 1-3 layers of scores, and k from 0 to past the number of candidate blocks."""
    prompt = draw(prompts())
    num_layers = draw(st.integers(1, 3))
    size = num_layers * prompt.num_blocks
    values = draw(st.sampled_from([tied_scores, any_scores]))
    scores = torch.tensor(draw(st.lists(values, min_size=size, max_size=size)), dtype=torch.float32)
    num_candidates = int(candidate_blocks(prompt.visual(), prompt.block_size).sum())
    k = draw(st.sampled_from(range(num_candidates + 3)))  # uniform: st.integers would favour k = 0
    return Case(prompt, scores.view(num_layers, prompt.num_blocks), k)


def select(case: Case) -> torch.Tensor:
    """The library's pipeline from a prompt layout to the kept prompt blocks `[L, m]`."""
    candidates = candidate_blocks(case.prompt.visual(), case.prompt.block_size)
    return select_blocks(case.scores, candidates, case.k)


# --------------------------------------------------------------------------------------------- properties


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(prompts())
def test_candidates_are_exactly_the_full_visual_blocks(prompt: Prompt) -> None:
    """Block-by-block reference; and no candidate ever holds a non-visual (text) position."""
    visual = prompt.visual()
    cands = candidate_blocks(visual, prompt.block_size)
    assert cands.dtype == torch.bool
    assert cands.tolist() == candidate_reference(visual.tolist(), prompt.block_size)
    in_candidate = cands[torch.arange(prompt.num_tokens) // prompt.block_size]
    assert not (in_candidate & ~visual).any()


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(cases())
def test_select_blocks_keeps_every_text_block_and_the_best_candidates(case: Case) -> None:
    """Per layer: every block holding a text position or not filled by the prompt, plus exactly min(k, C) of
    the C candidates, none scoring below a dropped one, ties to the earlier block; ascending, no duplicates.
    Together these determine the selection, so no separate reference is needed."""
    prompt, scores, k = case
    bs = prompt.block_size
    visual = prompt.visual()
    # Derived from the mask, not from candidate_blocks: the blocks whose text the drafter must see.
    text = [p >= prompt.num_tokens or not visual[p] for p in range(prompt.num_blocks * bs)]
    must_keep = {p // bs for p, is_text in enumerate(text) if is_text}
    candidates = [b for b, c in enumerate(candidate_blocks(visual, bs).tolist()) if c]
    want_chosen = min(k, len(candidates))
    kept = select(case)
    assert kept.dtype == torch.int64
    assert kept.shape == (scores.shape[0], prompt.num_blocks - len(candidates) + want_chosen)
    for layer, row in enumerate(kept.tolist()):
        layer_scores = scores[layer].tolist()
        assert row == sorted(set(row)), "ascending, no duplicates"
        assert set(row) <= set(range(prompt.num_blocks))
        assert must_keep <= set(row), "a block with text (or a partial block) was dropped"
        chosen = [b for b in candidates if b in row]
        dropped = [b for b in candidates if b not in row]
        assert len(chosen) == want_chosen
        for c in chosen:
            for d in dropped:
                assert layer_scores[d] <= layer_scores[c], (d, c)
                if layer_scores[d] == layer_scores[c]:
                    assert c < d, f"tie between {c} and {d} must go to the earlier block"


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(cases(), st.data())
def test_compacted_view_reads_exactly_the_kept_positions_while_decoding(
    case: Case, data: st.DataObject
) -> None:
    """Each draft step of a decode tail spanning several blocks, as the proposer builds it: the table is the
    kept prompt blocks then every later block, and its first seq_len slots, read back through the physical
    ids, hold exactly the positions up to the newest token outside dropped blocks, the newest one last."""
    prompt, _, _ = case
    bs = prompt.block_size
    kept = select(case)
    # The first draft writes at position num_tokens (the token sampled after the prompt), later ones further.
    newest = prompt.num_tokens + data.draw(st.integers(0, 3 * bs), label="decoded tokens")
    num_logical = newest // bs + 1
    physical = data.draw(st.permutations(range(num_logical + 3)), label="physical ids")[:num_logical]
    logical_of = {p: b for b, p in enumerate(physical)}
    first = prompt.num_tokens
    draft_round = _round(kept, prompt.num_blocks, physical, first, newest - first + 1, bs)
    for step, position in enumerate(range(first, newest + 1)):
        seq_lens, slots, _ = draft_round.step([0], step)
        tables = draft_round.tables
        seq_len = seq_lens[0]
        assert tables.dtype == torch.int32
        assert seq_len <= tables.shape[2] * bs
        assert slots == [physical[position // bs] * bs + position % bs]
        for layer, row in enumerate(tables[:, 0].tolist()):
            kept_row = kept[layer].tolist()
            assert row == [physical[b] for b in kept_row + list(range(prompt.num_blocks, num_logical))]
            # The kernel reads slots 0 .. seq_len-1 in table order; the query is the last one (the newest).
            view = [logical_of[p] * bs + i for p in row for i in range(bs)][:seq_len]
            assert view == [p for p in range(position + 1) if p >= prompt.num_tokens or p // bs in kept_row]


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(cases())
def test_kept_visual_tokens_are_the_visual_positions_of_the_kept_blocks(case: Case) -> None:
    """The figure behind `vllm:std_kept_visual_tokens_total`, and the context a draft step reads (what the
    cost model prices), counted position by position per layer."""
    prompt, _, _ = case
    visual = prompt.visual()
    num_candidates = int(candidate_blocks(visual, prompt.block_size).sum())
    kept = select(case)
    selection = RequestSelection.of(kept, visual, prompt.block_size)
    assert selection.num_candidate_blocks == num_candidates
    assert selection.num_prompt_blocks == prompt.num_blocks
    block_of = torch.arange(prompt.num_tokens) // prompt.block_size
    for row in kept:
        assert selection.num_kept_visual_tokens == int((visual & torch.isin(block_of, row)).sum())
        read = int((~visual | torch.isin(block_of, row)).sum())
        assert selection.drafter_context(prompt.num_tokens + 5) == read + 5


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(cases())
def test_streaming_keeps_the_sinks_and_the_latest_blocks_within_std_budget(case: Case) -> None:
    """The paper's StreamingLLM baseline: block 0 (the attention sinks) and the most recent prompt blocks,
    as many as STD keeps, whatever they hold; the drafter then reads as many tokens as STD's."""
    prompt, _, _ = case
    visual = prompt.visual()
    std = select(case)
    kept = streaming_blocks(std.shape[0], prompt.num_blocks, std.shape[1])
    m = std.shape[1]
    assert kept.shape == std.shape
    expected = ([0] if m > 1 else []) + list(range(prompt.num_blocks - (m - (m > 1)), prompt.num_blocks))
    assert kept.tolist() == [expected] * std.shape[0]
    streaming, attention = (RequestSelection.of(k, visual, prompt.block_size) for k in (kept, std))
    # Same budget in tokens: both read whole blocks, and only a full block is ever dropped.
    assert streaming.drafter_context(prompt.num_tokens) == attention.drafter_context(prompt.num_tokens)


def test_streaming_drops_text_outside_its_window() -> None:
    """Text before the video past the sink block is not read by the streaming drafter (STD reads it)."""
    visual = torch.zeros(8 * 4, dtype=torch.bool)
    visual[8:28] = True  # blocks of 4: 0-1 text, 2-6 visual, 7 text
    kept = streaming_blocks(1, num_prompt_blocks=8, num_kept=4)
    assert kept.tolist() == [[0, 5, 6, 7]]
    selection = RequestSelection.of(kept, visual, 4)
    assert selection.num_kept_visual_tokens == 8 and selection.num_dropped_tokens == 16


def test_recent_visual_baseline_keeps_the_most_recent_visual_blocks() -> None:
    candidates = torch.tensor([False, True, True, True, True, False])
    scores = baseline_scores("recent_visual", num_layers=2, num_blocks=6, seed=0)
    assert select_blocks(scores, candidates, 2).tolist() == [[0, 3, 4, 5]] * 2


def test_random_baseline_is_seeded_and_differs_per_layer() -> None:
    candidates = torch.ones(64, dtype=torch.bool)
    kept = select_blocks(baseline_scores("random", 4, 64, seed=7), candidates, 8)
    assert torch.equal(kept, select_blocks(baseline_scores("random", 4, 64, seed=7), candidates, 8))
    assert not torch.equal(kept, select_blocks(baseline_scores("random", 4, 64, seed=8), candidates, 8))
    assert len({tuple(layer) for layer in kept.tolist()}) > 1


def test_unknown_baseline_is_refused() -> None:
    with pytest.raises(ValueError, match="attention"):
        baseline_scores("attention", 1, 4, seed=0)
