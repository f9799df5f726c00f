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

In a batch the rounds are shared: every request waits for the batch's longest draft and for the one verify
step, so a draft length is chosen for the batch (`CostModel.plan`): per request, the lengths that maximise
the batch's predicted tokens per second, none unless that beats plain decoding.

A request may also have a look-up draft (tokens that followed the same n-gram earlier in its prompt or
output): it costs no draft step, only its share of the verify step, and has an acceptance of its own.
`CostModel.plan_rounds` chooses per request between none, a sparse draft and a look-up draft.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_FORMAT = "vllm-std cost profile v1"

RoundRow = tuple[float, float, Sequence[float] | None]
"""One request of a batch's round: its context, the context its drafter reads, and its conditional acceptance
per draft position (None for a request that cannot draft this round)."""

LookupRow = tuple[int, Sequence[float]] | None
"""A request's look-up draft this round: how many tokens it holds, and their conditional acceptance per
position (None: the request has none)."""


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """Per request: how many tokens it drafts this round, and whether they are its look-up draft."""

    gammas: list[int]
    looked_up: list[bool]


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Seconds of one engine step: `fixed + per_request * B + per_context_token * B * L`."""

    fixed: float
    per_request: float
    per_context_token: float

    def __call__(self, batch: int, context: float) -> float:
        return self.fixed + batch * self.share(context)

    def share(self, context: Any) -> Any:
        """One request's part of the step beyond the fixed part (`context` a number or an array of them)."""
        return self.per_request + self.per_context_token * context


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
        return self.fixed + batch * float(self.at_lengths(context, np.asarray(gamma)))

    def at_lengths(self, context: Any, gamma: np.ndarray) -> np.ndarray:
        """One request's share of the step beyond the fixed part, at each draft length in `gamma` (contexts
        and lengths broadcast)."""
        attention = self.per_context_token * context * (1 + self.query_growth * gamma)
        return self.per_query * (gamma + 1) + self.per_draft * gamma + attention


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
    """Expected tokens a round of `gamma` drafts yields (`tokens_by_length`)."""
    return float(tokens_by_length(accepted_at, gamma)[gamma])


def tokens_by_length(accepted_at: Sequence[float], max_gamma: int) -> np.ndarray:
    """Expected tokens a round yields with 0..max_gamma drafts: 1 plus the chance that drafts 1..i were all
    accepted, summed over i.

    `accepted_at[i]` is the probability that draft i + 1 is accepted given drafts 1..i were (vLLM's
    per-position counters divided by the rounds that reached the position); positions past the end of the
    list repeat its last value.
    """
    accepted = np.asarray(_padded(accepted_at, max_gamma))
    return np.concatenate(([1.0], 1.0 + np.cumsum(np.cumprod(accepted))))


def _choices(gammas: Sequence[int], looked_up: Sequence[bool] | None, max_gamma: int) -> np.ndarray:
    """Draft lengths as indices into `CostModel._options`' columns (look-up drafts after the sparse ones)."""
    choice = np.asarray(gammas, dtype=int)
    if looked_up is None:
        return choice.copy()
    return np.where(np.asarray(looked_up) & (choice > 0), choice + max_gamma, choice)


def _padded(accepted_at: Sequence[float], length: int) -> list[float]:
    """`accepted_at` cut or extended to `length` positions (repeating its last value; 0 if it is empty)."""
    known = list(accepted_at[:length])
    return known + [known[-1] if known else 0.0] * (length - len(known))


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Step costs of one engine on one machine: dense one-token steps, sparse draft steps, verify steps."""

    dense: StepCost
    draft: StepCost
    verify: VerifyCost

    def with_overhead(
        self, seconds: float, per_round: float = 0.0, per_draft: float = 0.0, per_draft_step: float = 0.0
    ) -> "CostModel":
        """The same model with `seconds` more per target step (dense or verify), `per_round` more per
        drafting round (its verify step and drafting, beyond a plain step), `per_draft` more per verified
        draft and `per_draft_step` more per draft step: what the engine and the drafter spend around a
        forward pass (scheduling, sampling, speculative bookkeeping, block tables), which a forward-only
        calibration cannot see."""
        verify_fixed = self.verify.fixed + seconds + per_round
        return dataclasses.replace(
            self,
            dense=dataclasses.replace(self.dense, fixed=self.dense.fixed + seconds),
            draft=dataclasses.replace(self.draft, fixed=self.draft.fixed + per_draft_step),
            verify=dataclasses.replace(
                self.verify, fixed=verify_fixed, per_draft=self.verify.per_draft + per_draft
            ),
        )

    def step_seconds(self, rows: Sequence[tuple[float, int]]) -> float:
        """A target step over requests `(context, drafts verified)`, mixing one-token and verify rows: the
        fixed part of a verify step (of a dense step if nothing is verified) plus each row's share."""
        verifying = any(drafts for _, drafts in rows)
        fixed = self.verify.fixed if verifying else self.dense.fixed
        return fixed + sum(self._target_share(context, drafts) for context, drafts in rows)

    def _target_share(self, context: float, drafts: int) -> float:
        """A row's part of a target step beyond the step's fixed part."""
        if drafts:
            return float(self.verify.at_lengths(context, np.asarray(drafts)))
        return float(self.dense.share(context))

    def _round_fixed(self, longest: int, verifying: bool | None = None) -> float:
        """A round's seconds that no request owns: the target step's fixed part and each draft step's (a
        round with look-up drafts only verifies after no draft step)."""
        if not (longest if verifying is None else verifying):
            return self.dense.fixed
        return self.verify.fixed + longest * self.draft.fixed

    def _round_terms(self, rows: Sequence[RoundRow], max_gamma: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row and draft length 0..max_gamma: the tokens the row yields and its share of the round's
        seconds (infinite for drafts a row cannot make). One pass over the whole table: the policy plans
        every few steps, and a plain step of a small model is a few milliseconds."""
        context = np.array([row[0] for row in rows], dtype=float)
        tokens = np.ones((len(rows), max_gamma + 1))
        seconds = np.full((len(rows), max_gamma + 1), np.inf)
        seconds[:, 0] = self.dense.share(context)
        can = np.array([accepted_at is not None for *_, accepted_at in rows])
        if max_gamma == 0 or not can.any():
            return tokens, seconds
        drafting = [row for row in rows if row[2] is not None]
        accepted = np.array([_padded(accepted_at, max_gamma) for *_, accepted_at in drafting])
        tokens[can, 1:] += np.cumsum(np.cumprod(accepted, axis=1), axis=1)
        sparse = np.array([[sparse_context] for _, sparse_context, _ in drafting], dtype=float)
        gammas = np.arange(1, max_gamma + 1)
        drafting_seconds = gammas * self.draft.share(sparse)
        seconds[can, 1:] = self.verify.at_lengths(context[can, None], gammas) + drafting_seconds
        return tokens, seconds

    def _options(
        self, rows: Sequence[RoundRow], max_gamma: int, lookups: Sequence[LookupRow] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row, its choices this round: none, a sparse draft of 1..max_gamma tokens, a look-up draft of
        1..max_gamma tokens (the last only with `lookups`): the tokens each yields and its share of the
        round's seconds (infinite where the row cannot), and the draft steps each needs."""
        tokens, seconds = self._round_terms(rows, max_gamma)
        steps = np.arange(max_gamma + 1)
        if lookups is None or max_gamma == 0:
            return tokens, seconds, steps
        found = [(i, lookup) for i, lookup in enumerate(lookups) if lookup is not None and lookup[0] > 0]
        looked_tokens = np.ones((len(rows), max_gamma))
        looked_seconds = np.full((len(rows), max_gamma), np.inf)
        lengths = np.arange(1, max_gamma + 1)
        for i, (length, accepted_at) in found:
            looked_tokens[i] += np.cumsum(np.cumprod(_padded(accepted_at, max_gamma)))
            usable = lengths <= length
            looked_seconds[i, usable] = self.verify.at_lengths(rows[i][0], lengths[usable])
        return (
            np.concatenate([tokens, looked_tokens], axis=1),
            np.concatenate([seconds, looked_seconds], axis=1),
            np.concatenate([steps, np.zeros(max_gamma, dtype=int)]),
        )

    def rate(
        self,
        rows: Sequence[RoundRow],
        gammas: Sequence[int],
        lookups: Sequence[LookupRow] | None = None,
        looked_up: Sequence[bool] | None = None,
    ) -> float:
        """Predicted tokens per second of a batch whose requests draft `gammas` this round (with `looked_up`,
        those marked from their look-up drafts `lookups`)."""
        max_gamma = max(gammas, default=0)
        tokens, seconds, steps = self._options(rows, max_gamma, lookups)
        return self._rate(tokens, seconds, steps, _choices(gammas, looked_up, max_gamma))

    def fewest_paying(
        self,
        rows: Sequence[RoundRow],
        gammas: Sequence[int],
        probing: Sequence[int],
        max_gamma: int,
        min_gain: float = 0.0,
        lookups: Sequence[LookupRow] | None = None,
        looked_up: Sequence[bool] | None = None,
    ) -> int:
        """The fewest sparse drafts, up to `max_gamma`, that the rows `probing` all draft together for the
        batch's predicted rate to be more than `1 + min_gain` times that of `gammas` (0: none do; the others
        drafting as `rate` says). Together, since they share the round's verify step and every draft
        step's fixed part: in a batch of four, one request drafting alone pays for a whole round to speed
        up a quarter of the batch."""
        longest = max(max_gamma, *gammas)
        tokens, seconds, steps = self._options(rows, longest, lookups)
        choice = _choices(gammas, looked_up, longest)
        without = self._rate(tokens, seconds, steps, choice)
        for gamma in range(1, max_gamma + 1):
            choice[list(probing)] = gamma
            if self._rate(tokens, seconds, steps, choice) > without * (1 + min_gain):
                return gamma
        return 0

    def _rate(self, tokens: np.ndarray, seconds: np.ndarray, steps: np.ndarray, choice: np.ndarray) -> float:
        index = np.arange(len(choice)), choice
        fixed = self._round_fixed(int(steps[choice].max(initial=0)), bool(choice.any()))
        return float(tokens[index].sum() / (fixed + seconds[index].sum()))

    def plan(self, rows: Sequence[RoundRow], max_gamma: int, min_gain: float = 0.0) -> list[int]:
        """Each request's sparse draft length in 0..max_gamma (`plan_rounds` without look-up drafts)."""
        return self.plan_rounds(rows, max_gamma, min_gain).gammas

    def plan_rounds(
        self,
        rows: Sequence[RoundRow],
        max_gamma: int,
        min_gain: float = 0.0,
        lookups: Sequence[LookupRow] | None = None,
    ) -> RoundPlan:
        """Each request's draft this round, none, sparse (0..max_gamma tokens) or, with `lookups`, from its
        look-up draft, maximising the batch's predicted tokens per second; none at all unless that beats
        plain decoding by more than `min_gain` (a margin for the model's own error: a predicted gain of a
        few percent is as likely a loss). Exact, by Dinkelbach's method: at the best rate so far r, each
        request independently maximises `tokens - r * seconds` within each shape of round (a plain step;
        a verify step after c draft steps, c = 0 for look-up drafts only), and the best shape's choices
        give a higher rate until none does."""
        if not rows:
            return RoundPlan([], [])
        tokens, seconds, steps = self._options(rows, max_gamma, lookups)
        verifies = np.arange(tokens.shape[1]) > 0
        # Round shapes: a plain step, then a verify step after c = 0..max_gamma draft steps. Each allows the
        # choices of at most its draft steps, and needs a request to make one that gives it its shape (a
        # verified draft; one of 1..c draft steps), else it is not that shape: where none would by itself,
        # the request that loses least by it is made to.
        caps = np.arange(max_gamma + 1)[:, None]
        allowed = np.vstack([~verifies, steps <= caps])
        needed = np.vstack(
            [
                np.zeros_like(verifies),
                np.where(caps == 0, verifies & (steps == 0), (steps >= 1) & (steps <= caps)),
            ]
        )
        fixed = np.array(
            [self._round_fixed(0, False)] + [self._round_fixed(int(c), True) for c in caps[:, 0]]
        )
        choice = np.zeros(len(rows), dtype=int)
        plain = best = self._rate(tokens, seconds, steps, choice)
        while True:
            gain = tokens - best * seconds  # [request, choice]
            within = np.where(allowed[:, None, :], gain[None], -np.inf)  # [shape, request, choice]
            value = within.max(axis=2)
            made = np.where(needed[:, None, :], gain[None], -np.inf).max(axis=2)
            loss = (made - value).max(axis=1)  # -inf: no request can give the round its shape
            loss[0] = 0.0  # a plain step needs nothing
            shape = int(np.argmax(value.sum(axis=1) - best * fixed + loss))
            candidate = np.argmax(within[shape], axis=1)
            if needed[shape].any() and not needed[shape][candidate].any():
                forced = int(np.argmax(made[shape] - value[shape]))
                candidate[forced] = int(np.argmax(np.where(needed[shape], gain[forced], -np.inf)))
            rate = self._rate(tokens, seconds, steps, candidate)
            if rate <= best * (1 + 1e-12):
                if best <= plain * (1 + min_gain):
                    choice[:] = 0
                looked_up = choice > max_gamma
                return RoundPlan(np.where(looked_up, choice - max_gamma, choice).tolist(), looked_up.tolist())
            choice, best = candidate, rate

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
