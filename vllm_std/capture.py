"""Captures post-RoPE queries and keys during prefill and turns them into per-layer block selections.

The attention kernels never return probabilities, so each decoder layer's attention call is wrapped: the
original runs first and its output is untouched; then, for requests whose prompt is being prefilled, the
wrapper keeps this chunk's keys (and the queries of the text after the last visual token). When the chunk
that completes a prompt has passed a layer, that layer's block scores are computed and the stash is freed.
Chunked prefill therefore works: keys of earlier chunks come from the stash, never from the paged cache
(whose in-block layout is backend-specific). A request whose visual KV came from the prefix cache was
never seen by the wrapper; it is not drafted.
"""

import collections
import dataclasses
import time
import zlib
from collections.abc import Sequence

import torch

from vllm_std.config import STDConfig
from vllm_std.metrics import SkipReason, STDMetrics
from vllm_std.scoring import block_mass, key_attention_mass
from vllm_std.selection import (
    RequestSelection,
    baseline_scores,
    candidate_blocks,
    select_blocks,
    streaming_blocks,
    visual_mask,
)


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One request's slice of a forward pass: its rows in the flattened batch and its chunk's positions."""

    req_id: str
    row_start: int
    num_rows: int
    chunk_start: int


@dataclasses.dataclass
class _PendingPrefill:
    """Stash of one request whose prompt is still being prefilled."""

    visual: torch.Tensor  # [prompt_len] bool
    text_start: int  # first position after the last visual token
    first_visual: int
    key_start: int | None = None  # first stashed position
    next_position: int = 0
    keys: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)
    queries: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)
    query_positions: list[torch.Tensor] = dataclasses.field(default_factory=list)
    scores: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    scoring_seconds: float = 0.0

    @property
    def prompt_len(self) -> int:
        return self.visual.shape[0]


@dataclasses.dataclass(frozen=True)
class VisualRequest:
    """What the scorer needs to know about a request from vLLM's request state."""

    req_id: str
    num_prompt_tokens: int
    visual_spans: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class SelectionRecord:
    """A finished scoring, kept in a short history for inspection (tests, debugging, metrics)."""

    req_id: str
    block_scores: torch.Tensor  # [L, num_prompt_blocks]
    selection: RequestSelection


class PrefillScorer:
    """Owns the per-request prefill stashes; produces `RequestSelection`s and skip reasons."""

    HISTORY = 256

    def __init__(
        self,
        config: STDConfig,
        num_layers: int,
        block_size: int,
        scale: float,
        metrics: STDMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.num_layers = num_layers
        self.block_size = block_size
        self.scale = scale
        self.pending: dict[str, _PendingPrefill] = {}
        self.selections: dict[str, RequestSelection] = {}
        self.skipped: dict[str, SkipReason] = {}
        self.skip_counts: collections.Counter[SkipReason] = collections.Counter()
        self.history: collections.deque[SelectionRecord] = collections.deque(maxlen=self.HISTORY)
        self._plan: list[tuple[BatchRow, _PendingPrefill]] = []

    def known(self, req_id: str) -> bool:
        return req_id in self.pending or req_id in self.selections or req_id in self.skipped

    def admit(self, request: VisualRequest) -> None:
        """Registers a request the first time it is scheduled."""
        num_visual = sum(length for _, length in request.visual_spans)
        if num_visual == 0:
            self._skip(request.req_id, "no_visual_input")
        elif num_visual < self.config.min_visual_tokens:
            self._skip(request.req_id, "too_few_visual_tokens")
        else:
            self.pending[request.req_id] = _PendingPrefill(
                visual=visual_mask(request.num_prompt_tokens, request.visual_spans),
                text_start=max(o + n for o, n in request.visual_spans),
                first_visual=min(o for o, _ in request.visual_spans),
            )

    def forget(self, live_req_ids: set[str]) -> None:
        """Drops every per-request entry whose request vLLM no longer holds (finished or aborted)."""
        for table in (self.pending, self.selections, self.skipped):
            for req_id in [r for r in table if r not in live_req_ids]:
                del table[req_id]

    def plan_step(self, rows: Sequence[BatchRow]) -> None:
        """Decides, before a forward pass runs its first layer, which rows the layer hooks capture."""
        self._plan = []
        for row in rows:
            state = self.pending.get(row.req_id)
            if state is None or row.chunk_start >= state.prompt_len:
                continue
            resumed = row.chunk_start != state.next_position and row.chunk_start > 0
            if resumed and (row.chunk_start > state.first_visual or state.next_position > 0):
                # Visual KV this hook never saw (a prefix-cache hit, or a gap): its keys are missing.
                del self.pending[row.req_id]
                self._skip(row.req_id, "visual_kv_from_prefix_cache")
                continue
            if row.chunk_start == 0 or state.key_start is None:
                # First chunk, or a recompute from scratch after preemption.
                self._reset(state, row.chunk_start)
            state.next_position = row.chunk_start + row.num_rows
            positions = torch.arange(row.chunk_start, row.chunk_start + row.num_rows)
            state.query_positions.append(positions[positions >= state.text_start])
            self._plan.append((row, state))

    def _skip(self, req_id: str, reason: SkipReason) -> None:
        self.skipped[req_id] = reason
        self.skip_counts[reason] += 1
        if self.metrics is not None:
            self.metrics.request_skipped(reason)

    def _reset(self, state: _PendingPrefill, key_start: int) -> None:
        state.key_start = key_start
        state.keys = [[] for _ in range(self.num_layers)]
        state.queries = [[] for _ in range(self.num_layers)]
        state.query_positions = []
        state.scores = [None] * self.num_layers

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Layer hook body: stash this layer's rows of the planned requests; score completed prompts."""
        for row, state in self._plan:
            end = row.row_start + row.num_rows
            keys = key[row.row_start : end]
            first_text = max(0, state.text_start - row.chunk_start)
            queries = query[row.row_start + first_text : end]
            complete = row.chunk_start + row.num_rows >= state.prompt_len
            if not complete:
                state.keys[layer].append(keys.clone())
                state.queries[layer].append(queries.clone())
                continue
            self._score_layer(state, layer, keys, queries)
            if layer == self.num_layers - 1:
                self._finish(row.req_id, state)

    def _score_layer(
        self, state: _PendingPrefill, layer: int, keys: torch.Tensor, queries: torch.Tensor
    ) -> None:
        num_blocks = -(-state.prompt_len // self.block_size)
        if self.config.selection != "attention":  # a baseline: `_finish` ranks blocks without attention
            state.keys[layer], state.queries[layer] = [], []
            state.scores[layer] = torch.zeros(num_blocks)
            return
        start = time.perf_counter()
        all_keys = torch.cat([*state.keys[layer], keys])
        all_queries = torch.cat([*state.queries[layer], queries])
        state.keys[layer] = []
        state.queries[layer] = []
        positions = torch.cat(state.query_positions)
        assert state.key_start is not None
        mass = key_attention_mass(all_queries, all_keys, self.scale, positions, state.key_start)
        state.scores[layer] = block_mass(mass, state.key_start, self.block_size, num_blocks).cpu()
        state.scoring_seconds += time.perf_counter() - start

    def _finish(self, req_id: str, state: _PendingPrefill) -> None:
        del self.pending[req_id]
        scores = torch.stack([s for s in state.scores if s is not None])
        if scores.shape[0] != self.num_layers:
            self._skip(req_id, "incomplete_capture")
            return
        candidates = candidate_blocks(state.visual, self.block_size)
        k_blocks = self.config.top_k_blocks(self.block_size)
        if self.config.selection in ("recent_visual", "random"):
            seed = zlib.crc32(req_id.encode())
            scores = baseline_scores(self.config.selection, self.num_layers, candidates.shape[0], seed)
        kept = select_blocks(scores, candidates, k_blocks)
        if self.config.selection == "streaming":  # the same number of blocks, sinks and the latest ones
            kept = streaming_blocks(self.num_layers, candidates.shape[0], kept.shape[1])
        selection = RequestSelection.of(kept, state.visual, self.block_size)
        self.selections[req_id] = selection
        self.history.append(SelectionRecord(req_id, scores, selection))
        if self.metrics is not None:
            self.metrics.request_scored(
                selection.num_visual_tokens,
                selection.num_kept_visual_tokens,
                state.scoring_seconds,
            )
