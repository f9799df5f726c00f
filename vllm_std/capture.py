"""Captures the queries of the text after the video during prefill and turns them into per-layer block
selections.

The attention kernels never return probabilities, so each decoder layer's attention call is wrapped: the
original runs first and its output is untouched; then, for requests whose prompt is being prefilled, the
wrapper keeps the queries of the text after the last visual token (a few hundred tokens at most, usually).
When the chunk that completes a prompt has passed a layer, that layer's keys are read back from the
request's own blocks of the paged KV cache (the attention adapter knows the backend's layout) and scored
against those queries. Keys are never stashed: a prompt prefilled in many chunks, or whose video KV came from
the prefix cache (a follow-up question about the same video), is scored from the same full set of keys.
"""

import collections
import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence

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

KeyReader = Callable[[str, int], torch.Tensor]
"""`(req_id, num_tokens)` -> `[num_tokens, Hkv, D]`: one layer's cached keys of a request's first tokens."""


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One request's slice of a forward pass: its rows in the flattened batch and its chunk's positions."""

    req_id: str
    row_start: int
    num_rows: int
    chunk_start: int


@dataclasses.dataclass
class _PendingPrefill:
    """A request whose prompt is still being prefilled: the text queries seen so far, per chunk."""

    visual: torch.Tensor  # [prompt_len] bool
    text_start: int  # first position after the last visual token
    query_positions: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per chunk
    queries: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)  # per chunk, per layer
    scores: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    scoring_seconds: float = 0.0

    @property
    def prompt_len(self) -> int:
        return self.visual.shape[0]

    def rewind(self, position: int) -> None:
        """Forgets the queries at `position` and after: vLLM computes them again (after a preemption)."""
        for i, positions in enumerate(self.query_positions):
            keep = int((positions < position).sum())
            self.query_positions[i] = positions[:keep]
            self.queries[i] = [q[:keep] for q in self.queries[i]]


@dataclasses.dataclass(frozen=True)
class VisualRequest:
    """What the scorer needs to know about a request from vLLM's request state."""

    req_id: str
    num_prompt_tokens: int
    visual_spans: tuple[tuple[int, int], ...]
    embeds: tuple[torch.Tensor | None, ...] = ()  # per span, which of its positions are embeddings

    def visual(self) -> torch.Tensor:
        return visual_mask(self.num_prompt_tokens, self.visual_spans, self.embeds)


@dataclasses.dataclass(frozen=True)
class SelectionRecord:
    """A finished scoring, kept in a short history for inspection (tests, debugging, metrics)."""

    req_id: str
    block_scores: torch.Tensor  # [L, num_prompt_blocks]
    selection: RequestSelection


class PrefillScorer:
    """Owns the per-request prefill state; produces `RequestSelection`s and skip reasons."""

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

    @property
    def planned(self) -> bool:
        """Whether the forward pass being run prefills a prompt being scored."""
        return bool(self._plan)

    def known(self, req_id: str) -> bool:
        return req_id in self.pending or req_id in self.selections or req_id in self.skipped

    def admit(self, request: VisualRequest) -> None:
        """Registers a request the first time it is scheduled."""
        visual = request.visual()
        num_visual = int(visual.sum())
        text_start = max((o + n for o, n in request.visual_spans), default=0)
        if num_visual == 0:
            self._skip(request.req_id, "no_visual_input")
        elif num_visual < self.config.min_visual_tokens:
            self._skip(request.req_id, "too_few_visual_tokens")
        elif text_start >= request.num_prompt_tokens:
            # Nothing after the video asks about it: there is no attention to score by.
            self._skip(request.req_id, "no_text_after_visual")
        else:
            self.pending[request.req_id] = _PendingPrefill(visual=visual, text_start=text_start)

    def abandon(self) -> list[str]:
        """After a fault while planning or scoring: every prompt being scored is given up (it decodes
        without drafts, counted as `drafter_fault`); returns their ids."""
        abandoned = list(self.pending)
        for req_id in abandoned:
            del self.pending[req_id]
            self._skip(req_id, "drafter_fault")
        self._plan = []
        return abandoned

    def abandon_selections(self, req_ids: Sequence[str]) -> list[str]:
        """After a fault while drafting: the requests `req_ids` that had a selection draft no more."""
        abandoned = [r for r in req_ids if r in self.selections]
        for req_id in abandoned:
            del self.selections[req_id]
            self._skip(req_id, "drafter_fault")
        return abandoned

    def release(self, req_ids: set[str]) -> None:
        """Drops every per-request entry of `req_ids` (vLLM dropped those requests)."""
        for table in (self.pending, self.selections, self.skipped):
            for req_id in req_ids & table.keys():
                del table[req_id]

    def forget(self, live_req_ids: set[str]) -> None:
        """Drops every per-request entry whose request vLLM no longer holds (finished or aborted)."""
        self.release({*self.pending, *self.selections, *self.skipped} - live_req_ids)

    def plan_step(self, rows: Sequence[BatchRow]) -> None:
        """Decides, before a forward pass runs its first layer, which rows the layer hooks look at: the
        chunks of prompts still prefilling. A chunk may start anywhere (after a prefix-cache hit, or again
        after a preemption): the keys before it are in the cache, and only the queries of text not yet seen
        are kept."""
        self._plan = []
        for row in rows:
            state = self.pending.get(row.req_id)
            if state is None or row.chunk_start >= state.prompt_len:
                continue
            state.rewind(row.chunk_start)
            positions = torch.arange(row.chunk_start, row.chunk_start + row.num_rows)
            state.query_positions.append(positions[positions >= state.text_start])
            state.queries.append([])
            if row.chunk_start + row.num_rows >= state.prompt_len:
                state.scores = [None] * self.num_layers
            self._plan.append((row, state))

    def end_step(self) -> None:
        """After the forward pass: a planned chunk that not every layer showed to `observe` (a step replayed
        as a full CUDA graph runs no hook) leaves its prompt unscorable; it decodes without drafts."""
        for row, state in self._plan:
            if row.req_id not in self.pending:  # selected (or abandoned) in this step
                continue
            completes = row.chunk_start + row.num_rows >= state.prompt_len
            seen = sum(s is not None for s in state.scores) if completes else len(state.queries[-1])
            if seen < self.num_layers:
                del self.pending[row.req_id]
                self._skip(row.req_id, "incomplete_capture")
        self._plan = []

    def _skip(self, req_id: str, reason: SkipReason) -> None:
        self.skipped[req_id] = reason
        self.skip_counts[reason] += 1
        if self.metrics is not None:
            self.metrics.request_skipped(reason)

    def observe(self, layer: int, query: torch.Tensor, read_keys: KeyReader) -> None:
        """Layer hook body, after the layer's attention (its keys are in the cache): keep this layer's
        text queries of the planned rows; score the prompts this chunk completes."""
        for row, state in self._plan:
            num_text = state.query_positions[-1].shape[0]
            end = row.row_start + row.num_rows
            queries = query[end - num_text : end]
            if row.chunk_start + row.num_rows < state.prompt_len:
                state.queries[-1].append(queries.clone())
                continue
            self._score_layer(row.req_id, state, layer, queries, read_keys)
            if layer == self.num_layers - 1:
                self._finish(row.req_id, state)

    def _score_layer(
        self, req_id: str, state: _PendingPrefill, layer: int, queries: torch.Tensor, read_keys: KeyReader
    ) -> None:
        """Scores one layer of a prompt completed by this chunk, whose text `queries` are this chunk's;
        the earlier chunks' queries of the layer are freed."""
        earlier = [chunk[layer] for chunk in state.queries[:-1]]
        for chunk in state.queries[:-1]:
            chunk[layer] = queries.new_empty((0, *queries.shape[1:]))
        num_blocks = -(-state.prompt_len // self.block_size)
        if self.config.selection != "attention":  # a baseline: `_finish` ranks blocks without attention
            state.scores[layer] = torch.zeros(num_blocks)
            return
        start = time.perf_counter()
        keys = read_keys(req_id, state.prompt_len)
        positions = torch.cat(state.query_positions)
        mass = key_attention_mass(torch.cat([*earlier, queries]), keys, self.scale, positions, key_start=0)
        state.scores[layer] = block_mass(mass, 0, self.block_size, num_blocks).cpu()
        state.scoring_seconds += time.perf_counter() - start

    def _finish(self, req_id: str, state: _PendingPrefill) -> None:
        """The request's selection from its layers' scores. It stays pending until the selection exists, so
        that a fault while selecting abandons it like one while scoring."""
        scores = torch.stack([s for s in state.scores if s is not None])
        if scores.shape[0] != self.num_layers:
            del self.pending[req_id]
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
        del self.pending[req_id]
        self.selections[req_id] = selection
        self.history.append(SelectionRecord(req_id, scores, selection))
        if self.metrics is not None:
            self.metrics.request_scored(
                selection.num_visual_tokens,
                selection.num_kept_visual_tokens,
                state.scoring_seconds,
            )
