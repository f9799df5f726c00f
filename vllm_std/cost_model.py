"""Predicted speed of STD from step costs and acceptance: where it pays, where it cannot. Pure python.

A round of speculative decoding for a request drafts `g` tokens with the sparse drafter (g steps over the
kept context), then verifies them in one dense step over `g + 1` query tokens, and yields one token more
than the drafts it accepted. Plain decoding yields one token per dense one-token step. So, per request at
context length L in a batch of B:

    speedup(g) = tokens_per_round(g) * dense(B, L) / (g * draft(B, L_sparse) + verify(B, L, g))

Step costs are linear in the work of the step: a fixed part (launch, scheduling, sampling), a part per
request (weights are read once per step, so on a GPU this is small; on a CPU the per-token MLP dominates),
and a part per context token read (attention and KV reads). A verify step reads the same KV as a dense step
but computes attention for g + 1 queries: `query_growth` says how much of that shows (0: memory-bound, as on
a GPU, where extra queries are nearly free; 1: compute-bound, as on one CPU core, where they cost g + 1
times as much). All coefficients are fitted from measurements on the machine at hand (`fit_step_cost`),
never assumed.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_FORMAT = "vllm-std cost profile v1"


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Seconds of one engine step: `fixed + per_request * B + per_context_token * B * L`."""

    fixed: float
    per_request: float
    per_context_token: float

    def __call__(self, batch: int, context: float) -> float:
        return self.fixed + self.per_request * batch + self.per_context_token * batch * context


@dataclasses.dataclass(frozen=True)
class VerifyCost:
    """Seconds of a verify step over `g + 1` query tokens per request: `fixed + per_query * B * (g + 1) +
    per_draft * B * g + per_context_token * B * L * (1 + query_growth * g)`. `per_draft` is what a verified
    draft costs outside the forward pass (measured while serving, 0 in a fitted forward-pass model)."""

    fixed: float
    per_query: float
    per_context_token: float
    query_growth: float
    per_draft: float = 0.0

    def __call__(self, batch: int, context: float, gamma: int) -> float:
        attention = self.per_context_token * batch * context * (1 + self.query_growth * gamma)
        return self.fixed + self.per_query * batch * (gamma + 1) + self.per_draft * batch * gamma + attention


def fit_step_cost(batch: Sequence[int], context: Sequence[float], seconds: Sequence[float]) -> StepCost:
    """Least-squares `StepCost` from measured steps (each at its batch size and mean context length);
    coefficients are clipped at 0 (a step never gets cheaper with more work)."""
    b, ctx = np.asarray(batch, dtype=float), np.asarray(context, dtype=float)
    design = np.stack([np.ones_like(b), b, b * ctx], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(seconds, dtype=float), rcond=None)
    fixed, per_request, per_token = (max(float(c), 0.0) for c in coef)
    return StepCost(fixed, per_request, per_token)


def fit_verify_cost(
    batch: Sequence[int], context: Sequence[float], gamma: Sequence[int], seconds: Sequence[float]
) -> VerifyCost:
    """Least-squares `VerifyCost` from measured verify steps (each with its batch, mean context and gamma);
    coefficients clipped at 0, `query_growth` at 1 (g + 1 queries never cost more than g + 1 reads)."""
    b, ctx, g = (np.asarray(x, dtype=float) for x in (batch, context, gamma))
    design = np.stack([np.ones_like(b), b * (g + 1), b * ctx, b * ctx * g], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(seconds, dtype=float), rcond=None)
    fixed, per_query, per_token, per_token_query = (max(float(c), 0.0) for c in coef)
    growth = min(per_token_query / per_token, 1.0) if per_token > 0 else 0.0
    return VerifyCost(fixed, per_query, per_token, growth)


def tokens_per_round(accepted_at: Sequence[float], gamma: int) -> float:
    """Expected tokens a round yields: 1 plus the chance that drafts 1..i were all accepted, summed over i.

    `accepted_at[i]` is the probability that draft i + 1 is accepted given drafts 1..i were (vLLM's
    per-position counters divided by the rounds that reached the position); positions past the end of the
    list repeat its last value.
    """
    expected, survive = 1.0, 1.0
    for i in range(gamma):
        survive *= accepted_at[min(i, len(accepted_at) - 1)] if accepted_at else 0.0
        expected += survive
    return expected


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Step costs of one engine on one machine: dense one-token steps, sparse draft steps, verify steps."""

    dense: StepCost
    draft: StepCost
    verify: VerifyCost

    def with_overhead(self, seconds: float, per_draft: float = 0.0) -> "CostModel":
        """The same model with `seconds` more per target step (dense or verify) and `per_draft` more per
        verified draft: what the engine spends around a forward pass (scheduling, sampling, speculative
        bookkeeping), which a forward-only calibration cannot see."""
        return dataclasses.replace(
            self,
            dense=dataclasses.replace(self.dense, fixed=self.dense.fixed + seconds),
            verify=dataclasses.replace(
                self.verify, fixed=self.verify.fixed + seconds, per_draft=self.verify.per_draft + per_draft
            ),
        )

    def step_seconds(self, rows: Sequence[tuple[float, int]]) -> float:
        """A target step over requests `(context, drafts verified)`, mixing one-token and verify rows: the
        dense step's fixed part plus each row's share of its own kind of step."""
        seconds = self.dense.fixed
        for context, drafts in rows:
            if drafts:
                seconds += self.verify(1, context, drafts) - self.verify.fixed
            else:
                seconds += self.dense(1, context) - self.dense.fixed
        return seconds

    def to_json(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CostModel":
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a {PROFILE_FORMAT!r} file (format {data.get('format')!r})")
        return cls(StepCost(**data["dense"]), StepCost(**data["draft"]), VerifyCost(**data["verify"]))

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls.from_json(json.loads(Path(path).read_text()))

    def round_seconds(self, batch: int, context: float, sparse_context: float, gamma: int) -> float:
        return gamma * self.draft(batch, sparse_context) + self.verify(batch, context, gamma)

    def speedup(
        self, batch: int, context: float, sparse_context: float, accepted_at: Sequence[float], gamma: int
    ) -> float:
        """Tokens per second with STD at `gamma` over tokens per second without speculation (1.0 at g=0)."""
        if gamma == 0:
            return 1.0
        tokens = tokens_per_round(accepted_at, gamma)
        return tokens * self.dense(batch, context) / self.round_seconds(batch, context, sparse_context, gamma)

    def best_gamma(
        self, batch: int, context: float, sparse_context: float, accepted_at: Sequence[float], max_gamma: int
    ) -> int:
        """The gamma in 0..max_gamma with the highest predicted speedup; 0 (no drafts) unless one beats 1."""
        speedups = [
            self.speedup(batch, context, sparse_context, accepted_at, gamma) for gamma in range(max_gamma + 1)
        ]
        best = int(np.argmax(speedups))
        return best if speedups[best] > 1.0 else 0


@dataclasses.dataclass(frozen=True)
class BandwidthModel:
    """The I/O view of a memory-bound accelerator (the paper's analysis): a step costs the bytes it reads
    over the memory bandwidth. Weights are read once per step; each request's KV once per step, also in a
    verify step (its g + 1 queries share the read); a draft step reads only the kept KV."""

    weight_bytes: float
    kv_bytes_per_token: float
    bandwidth: float  # bytes per second

    def cost_model(self) -> CostModel:
        weights, kv = self.weight_bytes / self.bandwidth, self.kv_bytes_per_token / self.bandwidth
        step = StepCost(weights, 0.0, kv)
        return CostModel(dense=step, draft=step, verify=VerifyCost(weights, 0.0, kv, query_growth=0.0))
