"""One round's sparse draft steps: the target model over each drafting request's compacted view, a token per
request and step, argmax or drawn from the drafter's own distribution (`DraftSampler`)."""

import time
from typing import Any

import torch

from vllm_std.backends.base import AttentionAdapter
from vllm_std.config import STDConfig
from vllm_std.draft_graphs import DraftGraphs, graph_sizes
from vllm_std.draft_sampler import DraftSampler
from vllm_std.draft_step import DraftRequest, DraftRound
from vllm_std.runner_view import RunnerView


class SparseDrafter:
    """Runs a round's draft steps; its generator (seeded alike on every tensor-parallel rank, used in the
    same order) draws the unseeded sampled requests' drafts, so every rank drafts the same tokens."""

    def __init__(self, view: RunnerView, adapter: AttentionAdapter, config: STDConfig) -> None:
        self.view, self.adapter = view, adapter
        self.draft_probs = config.draft_probs
        self.generator = torch.Generator(device=view.device).manual_seed(view.seed)
        self.graphs: DraftGraphs | None = None  # STD's own full graphs, once captured (`capture_graphs`)

    def capture_graphs(self) -> None:
        """Captures full graphs of the draft step where the engine allows them (`full_draft_graphs`); raises
        what the capture raised, and then keeps no graph."""
        view = self.view
        sizes = graph_sizes(view.cudagraph_capture_sizes, view.max_num_seqs, view.max_cudagraph_capture_size)
        if not view.full_draft_graphs or not sizes:
            return
        graphs = DraftGraphs(view, self.adapter, sizes)
        graphs.capture()
        self.graphs = graphs

    def describe(self) -> str:
        """How draft steps run, for the start-up line."""
        if self.graphs is not None:
            largest, mib = max(self.graphs.sizes), self.graphs.memory_bytes / 2**20
            full = f"in STD's full CUDA graphs up to {largest} rows ({mib:.0f} MiB)"
            return f"{full}, larger batches {self._pieces()}"
        return self._pieces()

    def _pieces(self) -> str:
        return "on vLLM's piecewise CUDA graphs" if self.view.piecewise_drafts else "eager"

    def sampler(self, rows: list[int], num_rows: int, longest: int) -> DraftSampler | None:
        """The round's draws of sampled requests' drafts, for the requests of batch rows `rows` drafting at
        most `longest` tokens (None with `draft_probs` off: argmax drafts, which vLLM verifies as certain)."""
        if not self.draft_probs:
            return None
        batch = self.view.batch_req_ids()
        seeds = {row: self.view.sampling_seed(batch[row]) for row in rows}
        return DraftSampler(self.view.sampling_metadata, seeds, num_rows, longest, self.generator)

    def run(
        self,
        requests: list[DraftRequest],
        token_ids_cpu: Any,
        drafts: list[list[int]],
        sampler: DraftSampler | None,
    ) -> float:
        """The draft steps for `requests`, their drafts appended to `drafts` by batch row; the seconds, from
        the round's tables to its drafts on the host (what the cost model's drafting overhead learns from).
        The drafted tokens stay on the device until the round ends: one copy to the host a round."""
        start = time.perf_counter()
        device = self.view.device
        out = self.graphs.table_buffer(len(requests)) if self.graphs is not None else None
        draft_round = DraftRound(requests, len(self.view.layer_names), self.view.block_size, device, out)
        tokens = torch.tensor([int(token_ids_cpu[r.row, r.num_tokens - 1]) for r in requests]).to(device)
        longest = max(r.num_drafts for r in requests)
        drafted = torch.zeros(len(requests), longest, dtype=torch.int64, device=device)
        for step in range(longest):
            active = [i for i, r in enumerate(requests) if r.num_drafts > step]
            logits = self.forward(draft_round, active, step, tokens[active])
            if sampler is None:
                next_tokens = logits.argmax(dim=-1)
            else:
                positions = [requests[i].position(step) for i in active]
                next_tokens = sampler.sample(logits, [requests[i].row for i in active], step, positions)
            tokens[active] = next_tokens
            drafted[active, step] = next_tokens
        for r, row in zip(requests, drafted.tolist(), strict=True):
            drafts[r.row].extend(row[: r.num_drafts])
        return time.perf_counter() - start

    def forward(
        self, draft_round: DraftRound, active: list[int], step: int, tokens: torch.Tensor
    ) -> torch.Tensor:
        """The logits of draft step `step` for the round's requests `active` (their input `tokens`): a full
        graph replayed where one holds the round, else vLLM's piecewise graphs or an eager forward."""
        if self.graphs is not None and self.graphs.fits(len(draft_round.requests)):
            return self.graphs.step(draft_round, active, step, tokens)
        inputs = draft_round.inputs(self.view, self.adapter, active, step)
        return self.view.draft_logits(tokens, inputs.positions, inputs.slots, inputs.metadata)
