"""STD's own full CUDA graphs of a draft step (FLASH_ATTN, TRITON_ATTN on a GPU).

vLLM's piecewise graphs leave attention and the KV write outside the graph, launched op by op once per layer
per draft step. A full graph replays the whole step, attention included, which is possible because each
captured attention call reads its own layer's block-table pointer: STD captures one graph per padded batch
size over persistent inputs (`GraphInputs`: per-layer tables, lengths, query offsets, slots, positions,
token ids), with the per-layer metadata built once over them, and with logits inside. Each step refreshes
those inputs in place and replays.

Rows of a round that stop drafting, and the rows that pad a batch to its graph's size, are queries of length
0 over a length-0 view of block 0 whose KV write goes to slot -1 (skipped), as vLLM pads its own full graphs.

What the graphs hold beyond vLLM's memory profile (taken after it): one table buffer (`L x 64 x max_model_len
/ 16` int32) and one logits buffer (`64 x vocab`) shared by every size, and the activations of the largest
size in vLLM's graph pool; `DraftGraphs.memory_bytes` measures it and the start-up line reports it.
"""

import bisect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vllm_std.backends.base import AttentionAdapter

if TYPE_CHECKING:
    from vllm_std.draft_step import DraftRound
    from vllm_std.runner_view import RunnerView

logger = logging.getLogger(f"vllm.{__name__}")

GRAPH_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")
"""Backends whose kernels read every length and table from device memory (not from a host plan)."""
MAX_GRAPH_BATCH = 64
"""The largest draft batch captured: the per-layer tables cost `L x 64 x max_model_len / 16` int32 (59 MB for
a 7B model at 128k tokens), and larger batches run the piecewise path, where launches weigh less."""


def full_graphs_allowed(device_type: str, backend: str, enforce_eager: bool, cudagraph_mode: Any) -> bool:
    """Whether STD may capture full graphs of its draft step: on CUDA, with a backend whose kernels read every
    table and length from device memory, in an engine that captures CUDA graphs at all. FLASH_ATTN also
    needs an engine with full graphs of its own (`cudagraph_mode` FULL_AND_PIECEWISE, vLLM's default, or
    FULL_DECODE_ONLY): only there does its builder bound FlashAttention's splits (`max_num_splits`), which it
    otherwise leaves to a heuristic at launch that a replay would not run again."""
    from vllm.config import CUDAGraphMode

    return (
        device_type == "cuda"
        and backend in GRAPH_BACKENDS
        and not enforce_eager
        and cudagraph_mode != CUDAGraphMode.NONE
        and (backend != "FLASH_ATTN" or cudagraph_mode.has_full_cudagraphs())
    )


class GraphInputs:
    """The persistent inputs of the draft step captured for `size` rows: every tensor keeps its address for
    the engine's life, and `load_round` / `load_step` only write into them."""

    def __init__(self, size: int, tables: torch.Tensor) -> None:
        """`tables`: `[L, size, max blocks]` rows of every layer's table, contiguous per layer."""
        self.size = size
        self.tables = tables
        device = tables.device
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self.slots = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(size, dtype=torch.int64, device=device)

    def load_round(self, tables: torch.Tensor) -> None:
        """A round's tables `[L, B, W]` into the first B rows (other rows are read to length 0 only); nothing
        to copy where the round built them there (`DraftGraphs.table_buffer`)."""
        _, rows, width = tables.shape
        if rows > self.size or width > self.tables.shape[2]:
            limit = f"{self.size} x {self.tables.shape[2]}"
            raise ValueError(f"a round of {rows} rows x {width} blocks exceeds the graph's {limit}")
        target = self.tables[:, :rows, :width]
        if tables.data_ptr() != target.data_ptr() or tables.stride() != target.stride():
            target.copy_(tables)

    def load_step(
        self,
        rows: list[int],
        seq_lens: list[int],
        slots: list[int],
        positions: list[int],
        tokens: torch.Tensor,
    ) -> None:
        """One draft step: the round's rows `rows` (ascending) each query one token, in that order, with these
        lengths, slots, positions and `tokens`; every other row queries nothing."""
        count = len(rows)
        lengths = [0] * self.size
        ends = [0] * (self.size + 1)
        for row, length in zip(rows, seq_lens, strict=True):
            lengths[row] = length
            ends[row + 1] = 1
        for i in range(self.size):
            ends[i + 1] += ends[i]
        pad = self.size - count
        self.seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=True)
        self.query_start_loc.copy_(torch.tensor(ends, dtype=torch.int32), non_blocking=True)
        self.slots.copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64), non_blocking=True)
        self.positions.copy_(torch.tensor(positions + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.tokens[:count].copy_(tokens)
        self.tokens[count:].zero_()

    def common_metadata(self, max_seq_len: int) -> Any:
        """vLLM's backend-independent metadata over these buffers, for every row (a graph is captured with the
        longest length it may meet, as vLLM captures its own)."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc,
            query_start_loc_cpu=torch.arange(self.size + 1, dtype=torch.int32),
            seq_lens=self.seq_lens,
            num_reqs=self.size,
            num_actual_tokens=self.size,
            max_query_len=1,
            max_seq_len=max_seq_len,
            block_table_tensor=self.tables[0],
            slot_mapping=self.slots,
            causal=True,
        )


def graph_sizes(captured: list[int], max_num_seqs: int, max_capture_size: int | None) -> list[int]:
    """The draft batch sizes to capture: vLLM's own capture sizes below the largest draft batch, and that
    batch: the engine's most requests, at most `MAX_GRAPH_BATCH` and at most vLLM's own largest capture size
    (the batches its builders prepare for graphs: FLASH_ATTN bounds its splits only up to there)."""
    largest = min(max_num_seqs, MAX_GRAPH_BATCH, max_capture_size or 0)
    if largest < 1:
        return []
    return sorted({s for s in captured if 0 < s < largest} | {largest})


def padded_size(sizes: list[int], rows: int) -> int | None:
    """The smallest captured size that holds `rows`, or None above the largest."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


def agreed(any_rank: Callable[[bool], bool], action: Callable[[], None]) -> None:
    """Runs `action` on this rank; raises on every rank if it raised on any (`any_rank`), so that no rank
    goes on to a forward pass whose collectives the others would never join."""
    error = None
    try:
        action()
    except Exception as exc:
        error = exc
    if any_rank(error is not None):
        raise error or RuntimeError("the capture failed on another tensor-parallel rank")


class DraftGraphs:
    """One full CUDA graph of a draft step per padded batch size, captured after vLLM's own graphs, replayed
    in place of the piecewise path for rounds that fit."""

    def __init__(self, view: "RunnerView", adapter: AttentionAdapter, sizes: list[int]) -> None:
        self.view, self.adapter = view, adapter
        self.sizes = sizes
        max_blocks = -(-view.max_model_len // view.block_size)
        # One table buffer for every size: a size's rows are the first rows of each layer's table, and a
        # round that fits builds its tables straight into them (`table_buffer`).
        self.tables = torch.zeros(
            len(view.layer_names), max(sizes), max_blocks, dtype=torch.int32, device=view.device
        )
        self.inputs = {size: GraphInputs(size, self.tables[:, :size]) for size in sizes}
        self.metadata: dict[int, dict[str, Any]] = {}
        self.graphs: dict[int, Any] = {}
        self.logits: torch.Tensor | None = None  # `[max size, vocab]`, written by every graph
        self.memory_bytes = 0  # device memory the graphs took, beyond vLLM's profile (`capture`)
        self._round: DraftRound | None = None  # the round whose tables the buffers hold

    def build_metadata(self) -> None:
        """Each size's per-layer metadata, built once over its buffers (what the graphs capture)."""
        builder = self.view.attn_group.get_metadata_builder()
        for size, inputs in self.inputs.items():
            common = inputs.common_metadata(self.view.max_model_len)
            self.metadata[size] = self.adapter.sparse_metadata(
                builder, common, inputs.tables, self.view.layer_names
            )

    def capture(self) -> None:
        """Captures every size (largest first, as vLLM does, so that the smaller ones reuse its memory) on
        vLLM's graph pool, each after a warm-up run, inside vLLM's `graph_capture` (which registers the
        buffers of its custom all-reduce under tensor parallelism); the inputs then hold an empty step.

        The warm-up runs hold collectives under tensor parallelism, so the ranks agree after each size: one
        whose capture raised stops every rank before the next size (a rank that raised mid-forward, while
        the others wait in a collective, is beyond this: capture fails alike on every rank)."""
        from vllm.distributed.parallel_state import graph_capture
        from vllm.platforms import current_platform

        free_before = torch.cuda.mem_get_info()[0]
        agreed(self.view.any_rank, self.build_metadata)
        pool = current_platform.get_global_graph_pool()
        with graph_capture(device=self.view.device) as context:
            for size in sorted(self.sizes, reverse=True):
                agreed(self.view.any_rank, lambda size=size: self._capture(size, pool, context.stream))
        torch.cuda.synchronize()
        self.memory_bytes = self.tables.nbytes + max(free_before - torch.cuda.mem_get_info()[0], 0)

    def _capture(self, size: int, pool: Any, stream: torch.cuda.Stream) -> None:
        self.warm_up(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            self.captured_step(size)
        self.graphs[size] = graph

    def warm_up(self, size: int) -> None:
        """An empty step of `size` rows, run eagerly before its capture (lazy initialisation stays outside
        the graph); the first, the largest size, makes the logits buffer."""
        inputs = self.inputs[size]
        inputs.load_step([], [], [], [], inputs.tokens[:0])
        logits = self._forward(size)
        if self.logits is None:
            self.logits = logits.new_empty(size, logits.shape[-1])

    def captured_step(self, size: int) -> None:
        """What the graph of `size` rows holds: a draft step over its inputs, its logits into the buffer."""
        assert self.logits is not None
        self.logits[:size].copy_(self._forward(size))

    def _forward(self, size: int) -> torch.Tensor:
        inputs = self.inputs[size]
        return self.view.draft_logits(
            inputs.tokens, inputs.positions, inputs.slots, self.metadata[size], graphs=False
        )

    def fits(self, rows: int) -> bool:
        return bool(self.graphs) and padded_size(self.sizes, rows) is not None

    def table_buffer(self, rows: int) -> torch.Tensor | None:
        """Where a round of `rows` requests builds its tables (`DraftRound`): the graphs' own buffer, if
        they hold such a round."""
        return self.tables if self.fits(rows) else None

    def step(
        self, draft_round: "DraftRound", active: list[int], step: int, tokens: torch.Tensor
    ) -> torch.Tensor:
        """The logits of draft step `step` of the round's requests `active`, replayed; `[len(active), V]`,
        valid until the next replay."""
        size = padded_size(self.sizes, len(draft_round.requests))
        assert size is not None and self.logits is not None
        inputs = self.inputs[size]
        if self._round is not draft_round:
            inputs.load_round(draft_round.tables)
            self._round = draft_round
        seq_lens, slots, positions = draft_round.step(active, step)
        inputs.load_step(active, seq_lens, slots, positions, tokens)
        self.replay(size)
        return self.logits[: len(active)]

    def replay(self, size: int) -> None:
        self.graphs[size].replay()
