"""Per-request draft length: the lengths that the cost model predicts fastest for the batch, 0 for a request
where none pays. Pure python (no vLLM), so the decisions can be tested on synthetic costs and acceptance.

A request's acceptance is learnt from its own rounds, per draft position, with older rounds fading so a
changed pattern shows; until it has rounds of its own, the engine-wide acceptance stands in for it. A request
that stopped drafting probes every `probe_interval` steps, and at once again after a probe that was
accepted, so that it notices soon when drafting would pay again; a request that has not drafted yet probes at
its first step. A probe drafts the fewest tokens that would
pay (speed the batch up) if all were accepted; where not even that pays, acceptance is not what stops
drafting, and nothing is probed.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

from vllm_std.cost_model import CostModel, RoundRow

Reason = Literal["fixed", "paying", "probe", "not_paying"]
"""Why a request got its draft length this step (the `decision` label of `vllm:std_gamma_decisions_total`)."""
REASONS: tuple[Reason, ...] = ("fixed", "paying", "probe", "not_paying")


class AcceptanceTracker:
    """Rounds that reached each draft position and drafts accepted there, with exponential forgetting.

    A round that drafted `k` tokens of which the first `a` were accepted reached positions `0..min(a, k-1)`
    and was accepted at `0..a-1`.
    """

    def __init__(self, max_gamma: int, decay: float) -> None:
        self.decay = decay
        self.reached = [0.0] * max_gamma
        self.accepted = [0.0] * max_gamma

    def update(self, drafted: int, accepted: int) -> None:
        for i in range(len(self.reached)):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        for i in range(min(accepted + 1, drafted, len(self.reached))):
            self.reached[i] += 1.0
            self.accepted[i] += float(i < accepted)

    def estimate(self, first: float, strength: float) -> list[float]:
        """Conditional acceptance per position: the counts plus `strength` pseudo-rounds at the estimate of
        the position before (at `first` for position 0). A position never reached yet is taken to accept
        as the one before it does, so drafting one token that is always accepted leads to trying two."""
        out, prior = [], first
        for accepted, reached in zip(self.accepted, self.reached, strict=True):
            prior = (accepted + strength * prior) / (reached + strength)
            out.append(prior)
        return out


@dataclasses.dataclass(frozen=True)
class Decision:
    gamma: int
    reason: Reason


class GammaPolicy:
    """Chooses each request's gamma from the engine's cost model, the batch, and each request's acceptance
    so far."""

    # The engine-wide estimate starts at one pseudo-round at 1/2; a request's own rounds (about the last ten
    # count) are weighed against one pseudo-round at the engine-wide first-position estimate.
    ENGINE_DECAY = 0.99
    REQUEST_DECAY = 0.9
    PRIOR_STRENGTH = 1.0

    def __init__(self, max_gamma: int, probe_interval: int) -> None:
        self.max_gamma = max_gamma
        self.probe_interval = probe_interval
        self.engine = AcceptanceTracker(max_gamma, self.ENGINE_DECAY)
        self.requests: dict[str, AcceptanceTracker] = {}
        self._idle_steps: dict[str, int] = {}

    def record(self, req_id: str, drafted: int, accepted: int) -> None:
        """The outcome of a verified round: `accepted` of the `drafted` tokens."""
        if drafted <= 0:
            return
        self.engine.update(drafted, accepted)
        tracker = self.requests.setdefault(req_id, AcceptanceTracker(self.max_gamma, self.REQUEST_DECAY))
        tracker.update(drafted, accepted)
        if req_id in self._idle_steps and accepted == drafted:
            self._idle_steps[req_id] = self.probe_interval - 1  # an accepted probe: probe again next step

    def forget(self, live_req_ids: set[str]) -> None:
        for req_id in [r for r in self.requests if r not in live_req_ids]:
            del self.requests[req_id]
        for req_id in [r for r in self._idle_steps if r not in live_req_ids]:
            del self._idle_steps[req_id]

    def accepted_at(self, req_id: str) -> list[float]:
        """The request's conditional acceptance per draft position (the engine's until it has rounds)."""
        engine = self.engine.estimate(0.5, 1.0)
        tracker = self.requests.get(req_id)
        return tracker.estimate(engine[0], self.PRIOR_STRENGTH) if tracker else engine

    def decide(
        self, cost: CostModel, drafting: Sequence[tuple[str, float, float]], others: Sequence[float]
    ) -> list[Decision]:
        """Draft lengths for the requests `(req_id, context, sparse context)` that may draft this step, in
        a batch that also holds requests of contexts `others` that may not: the lengths that maximise the
        batch's predicted tokens per second (`CostModel.plan`), then probes for requests idle long enough."""
        rows: list[RoundRow] = [(n, sparse, self.accepted_at(req_id)) for req_id, n, sparse in drafting]
        rows += [(n, n, None) for n in others]
        gammas = cost.plan(rows, self.max_gamma)
        decisions = []
        for i, (req_id, *_) in enumerate(drafting):
            if gammas[i] > 0:
                self._idle_steps.pop(req_id, None)
                decisions.append(Decision(gammas[i], "paying"))
                continue
            # A request that has never drafted probes at once: its own acceptance is unknown until it drafts,
            # and the engine-wide estimate may come from other videos (or be the bare prior).
            new = req_id not in self.requests and req_id not in self._idle_steps
            idle = self.probe_interval if new else self._idle_steps.get(req_id, 0) + 1
            due = idle >= self.probe_interval
            probe = self._probe_gamma(cost, rows, gammas, i) if due else 0
            self._idle_steps[req_id] = 0 if due else idle
            gammas[i] = probe
            decisions.append(Decision(probe, "probe") if probe else Decision(0, "not_paying"))
        return decisions

    def _probe_gamma(self, cost: CostModel, rows: list[RoundRow], gammas: list[int], i: int) -> int:
        """The fewest drafts for row `i` that would speed the batch up if every one were accepted (0: none
        would)."""
        context, sparse, _ = rows[i]
        hopeful = [*rows[:i], (context, sparse, [1.0]), *rows[i + 1 :]]
        without = cost.rate(hopeful, gammas)
        for gamma in range(1, self.max_gamma + 1):
            if cost.rate(hopeful, [*gammas[:i], gamma, *gammas[i + 1 :]]) > without:
                return gamma
        return 0
