"""One round's sparse draft steps: the target model over each drafting request's compacted view, a token per
request and step, argmax or drawn from the drafter's own distribution (`DraftSampler`)."""

import time
from typing import Any

import torch

from vllm_std.backends.base import AttentionAdapter
from vllm_std.config import STDConfig
from vllm_std.draft_sampler import DraftSampler
from vllm_std.draft_step import DraftRequest, draft_step_inputs
from vllm_std.runner_view import RunnerView


class SparseDrafter:
    """Runs a round's draft steps; its generator (seeded alike on every tensor-parallel rank, used in the
    same order) draws the unseeded sampled requests' drafts, so every rank drafts the same tokens."""

    def __init__(self, view: RunnerView, adapter: AttentionAdapter, config: STDConfig) -> None:
        self.view, self.adapter = view, adapter
        self.draft_probs = config.draft_probs
        self.generator = torch.Generator(device=view.device).manual_seed(view.seed)

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
        """The draft steps for `requests`, their drafts appended to `drafts` by batch row; the seconds."""
        tokens = torch.tensor([int(token_ids_cpu[r.row, r.num_tokens - 1]) for r in requests])
        start = time.perf_counter()
        for step in range(max(r.num_drafts for r in requests)):
            active = [i for i, r in enumerate(requests) if r.num_drafts > step]
            logits = self.step([requests[i] for i in active], tokens[active], step)
            if sampler is None:
                next_tokens = logits.argmax(dim=-1).cpu()
            else:
                positions = [requests[i].position(step) for i in active]
                next_tokens = sampler.sample(logits, [requests[i].row for i in active], step, positions)
            for i, token in zip(active, next_tokens.tolist(), strict=True):
                drafts[requests[i].row].append(token)
            tokens[active] = next_tokens
        return time.perf_counter() - start

    def step(self, requests: list[DraftRequest], tokens: torch.Tensor, step: int) -> torch.Tensor:
        """The logits of one draft step over the requests' compacted views."""
        inputs = draft_step_inputs(self.view, self.adapter, requests, step)
        return self.view.draft_logits(tokens, inputs.positions, inputs.slots, inputs.metadata)
