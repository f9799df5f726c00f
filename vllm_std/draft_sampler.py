"""Drafts for sampled requests, drawn from the drafter's own distribution, which vLLM's rejection sampler
then reads with them.

The rejection sampler accepts a draft `x` with probability `min(1, p(x) / q(x))`, `p` the target's and
`q` the drafter's distribution at that position, and on a rejection draws from `max(p - q, 0)`
renormalised: the output follows `p` for any `q`, provided `x` was drawn from `q`. Without `q` (what vLLM
assumes of a custom drafter) every draft counts as certain and is accepted with probability `p(x)` only.
STD's drafter is the target reading fewer tokens: its logits, processed as vLLM processes the target's
(temperature, then top-k and top-p with vLLM's own `apply_top_k_top_p`), give a `q` close to `p`, so
`min(1, p / q)` is near 1 where the sparse view loses little. Greedy requests keep argmax drafts: the
rejection sampler compares those with the target's argmax and reads no `q`.

The draws are reproducible: a request with its own `seed` draws each position's draft from a generator
seeded by that seed and the position (so at a fixed gamma a seeded request's output does not depend on
its batch); the others from the drafter's generator, seeded alike on every tensor-parallel rank and used
in the same order, so that every rank drafts the same tokens.
"""

from collections.abc import Sequence
from typing import Any

import torch

SAMPLING_EPS = 1e-5
"""vLLM's: a temperature below it is greedy."""


class DraftSampler:
    """One round's draws for the drafting requests (`seeds`: each one's own seed, by its row of the runner's
    batch), and, once any of them samples, the probabilities of every draft, `[batch rows, drafts, vocab]`
    in the runner's row order: what the rejection sampler reads as `draft_probs` (rows and positions not
    drafted stay 0; greedy requests' are not read)."""

    def __init__(
        self,
        metadata: Any,
        seeds: dict[int, int | None],
        num_rows: int,
        max_drafts: int,
        generator: torch.Generator,
    ) -> None:
        self.seeds = seeds
        self.generator = generator
        self.num_rows, self.max_drafts = num_rows, max_drafts
        self.probs: torch.Tensor | None = None
        temperature = None if metadata.all_greedy else metadata.temperature
        self.sampled: set[int] = set()
        if temperature is None:
            return
        rows = torch.tensor(sorted(seeds), dtype=torch.long)
        self.sampled = set(rows[temperature.cpu()[rows] >= SAMPLING_EPS].tolist())
        self.temperature, self.top_k, self.top_p = temperature, metadata.top_k, metadata.top_p

    def sample(
        self, logits: torch.Tensor, rows: Sequence[int], step: int, positions: Sequence[int]
    ) -> torch.Tensor:
        """The drafts of one draft step (on the logits' device) from its logits, one row per request of
        batch row `rows[j]` at model position `positions[j]`: argmax for greedy requests, a draw from the
        processed distribution for sampled ones, whose probabilities are kept at draft `step`."""
        tokens = logits.argmax(dim=-1)
        picked = [j for j, row in enumerate(rows) if row in self.sampled]
        if not picked:
            return tokens
        batch_rows = [rows[j] for j in picked]
        probs = self._probabilities(logits[picked], batch_rows)
        noise = torch.empty_like(probs)
        for i, (row, j) in enumerate(zip(batch_rows, picked, strict=True)):
            seed = self.seeds[row]
            own = None if seed is None else _position_generator(seed, positions[j], probs.device)
            noise[i].exponential_(generator=own or self.generator)
        tokens[picked] = probs.div(noise).argmax(dim=-1)
        self._kept(probs.shape[-1], probs.device)[batch_rows, step] = probs
        return tokens

    def certain(self, row: int, tokens: Sequence[int]) -> None:
        """Drafts not drawn from the drafter (a look-up draft): probability 1 each, as vLLM takes drafts
        without probabilities, once the round keeps probabilities at all."""
        if self.probs is not None and row in self.sampled:
            self.probs[row, torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0

    def _kept(self, vocab: int, device: torch.device) -> torch.Tensor:
        if self.probs is None:
            self.probs = torch.zeros(self.num_rows, self.max_drafts, vocab, device=device)
        return self.probs

    def _probabilities(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The requests' distributions as vLLM's sampler would make them of these logits."""
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        index = torch.tensor(rows, device=self.temperature.device)
        scaled = logits.float() / self.temperature[index].to(logits.device).unsqueeze(-1)
        top_k = None if self.top_k is None else self.top_k[index]
        top_p = None if self.top_p is None else self.top_p[index]
        return apply_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1)


def _position_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """A seeded request's generator for the draft at `position`: the same draw whatever else the engine
    runs (vLLM draws a seeded request's own samples from a generator of its own too)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + position) % 2**63)
