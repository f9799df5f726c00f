"""Per-request draft length: the lengths that the cost model predicts fastest for the batch, 0 for a request
where none pays by more than a margin (`min_gain`, for the model's own error). Pure python (no vLLM), so
the decisions can be tested on synthetic costs and acceptance.

A request's acceptance is learnt from its own rounds, per draft position, with older rounds fading so a
changed pattern shows; until it has rounds of its own, the engine-wide acceptance stands in for it. Its
look-up drafts (`vllm_std.lookup`) have an acceptance of their own, learnt alike, and the cost model
chooses per request and round between none, a sparse draft and the look-up draft found. A look-up draft is
tried as if it would be accepted (it costs no draft step) only where its match is long enough not to be
chance; a shorter one is planned with the acceptance learnt.

Requests that stopped drafting probe together, in one round every `probe_interval` steps, so that they
notice when drafting would pay again; they share the round's verify step. Each probe round doubles the
wait before the next (up to `MAX_BACKOFF` times `probe_interval`), so rejected probes cost ever less; a
probe that is fully accepted resets it, and its request probes again at the next step with twice as many
drafts. A request that has not drafted yet probes as soon as drafting could pay (at its first step, unless
the engine's overheads are still being measured). The requests probing in a step probe
together, the fewest tokens that would pay (speed the batch up by more than the margin) if all were
accepted (alone, one request of a batch would pay for a whole round to speed up only itself); where not
even that pays, acceptance is not what stops drafting, and nothing is probed. Except in a due probe
round, which sizes its probes as if a round cost no more than its forward passes: what a round costs
beyond them is measured from rounds, so it is re-measured by these probes, rather than believed for ever
once rounds stop.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

from vllm_std.cost_model import CostModel, LookupRow, RoundRow

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
    looked_up: bool = False  # the request drafts `gamma` tokens of its look-up draft, not sparse ones


NOT_PAYING = Decision(0, "not_paying")


class GammaPolicy:
    """Chooses each request's gamma from the engine's cost model, the batch, and each request's acceptance
    so far."""

    # The engine-wide estimate starts at one pseudo-round at 1/2; a request's own rounds (about the last ten
    # count) are weighed against one pseudo-round at the engine-wide first-position estimate.
    ENGINE_DECAY = 0.99
    REQUEST_DECAY = 0.9
    PRIOR_STRENGTH = 1.0
    # Each probe round doubles the wait before the next, up to this factor of `probe_interval`, until a
    # probe is fully accepted: a rejected probe costs a draft step and a verify step, about one plain step.
    MAX_BACKOFF = 8
    # While nothing pays, the plan is checked again after this many steps (contexts grow by one token per
    # step; the measured overheads are re-read every 16), or at once when the batch changes, a round is
    # verified or a probe is due. A plan at batch 4 costs about 0.2 ms, 2-5 % of a small model's step.
    REPLAN_STEPS = 32
    # A look-up draft is tried as if it would be accepted only where at least this many of the request's
    # latest tokens matched: in answers that do not repeat, matches of a token or two are chance (the
    # bench's one-pass answers drew them from the earlier answers' suffix tree, and their first token was
    # rejected), while an answer that starts to repeat reaches three in as many tokens.
    TRIED_MATCH = 3

    def __init__(self, max_gamma: int, probe_interval: int, min_gain: float = 0.0) -> None:
        self.max_gamma = max_gamma
        self.probe_interval = probe_interval
        self.min_gain = min_gain
        self.engine = AcceptanceTracker(max_gamma, self.ENGINE_DECAY)
        self.requests: dict[str, AcceptanceTracker] = {}
        # The same, of look-up drafts.
        self.engine_lookup = AcceptanceTracker(max_gamma, self.ENGINE_DECAY)
        self.lookups: dict[str, AcceptanceTracker] = {}
        # Look-up retries: by request, the step from which its next found look-up draft is tried as if it
        # would be accepted, and the wait after that one; and the length of its last look-up draft if that
        # was rejected (a longer one, from a longer match, is tried at once).
        self._steps = 0
        self._lookup_retry: dict[str, tuple[int, int]] = {}
        self._lookup_rejected: dict[str, int] = {}
        self._wait = probe_interval  # steps between probe rounds
        self._since_probe = 0
        self._seen: set[str] = set()
        # Fully accepted probes: their length, by request, which probes again at the next step with twice it.
        self._again: dict[str, int] = {}
        self._probing: set[str] = set()
        self._idle_batch: tuple[tuple[str, ...], int] | None = None  # a batch whose plan was all zeros
        self._idle_age = 0

    def record(self, req_id: str, drafted: int, accepted: int, looked_up: bool = False) -> None:
        """The outcome of a verified round: `accepted` of the `drafted` tokens (of its look-up draft)."""
        if drafted <= 0:
            return
        if looked_up:
            self.engine_lookup.update(drafted, accepted)
            tracker = self.lookups.setdefault(req_id, AcceptanceTracker(self.max_gamma, self.REQUEST_DECAY))
            tracker.update(drafted, accepted)
            wait = self.probe_interval
            self._lookup_rejected.pop(req_id, None)
            if accepted < drafted:  # the next retry waits twice as long as the last
                _, last = self._lookup_retry.get(req_id, (0, self.probe_interval // 2))
                wait = min(2 * last, self.MAX_BACKOFF * self.probe_interval)
                self._lookup_rejected[req_id] = drafted
            self._lookup_retry[req_id] = (self._steps + wait, wait)
            self._idle_batch = None
            return
        self.engine.update(drafted, accepted)
        tracker = self.requests.setdefault(req_id, AcceptanceTracker(self.max_gamma, self.REQUEST_DECAY))
        tracker.update(drafted, accepted)
        self._seen.add(req_id)
        self._idle_batch = None
        if req_id in self._probing:
            self._probing.discard(req_id)
            if accepted == drafted:
                self._again[req_id] = drafted
                self._wait = self.probe_interval

    def release(self, req_ids: set[str]) -> None:
        """Drops what is kept about the requests `req_ids` (vLLM dropped them)."""
        for req_id in req_ids:
            self.requests.pop(req_id, None)
            self.lookups.pop(req_id, None)
            self._lookup_retry.pop(req_id, None)
            self._lookup_rejected.pop(req_id, None)
            self._again.pop(req_id, None)
        self._seen -= req_ids
        self._probing -= req_ids

    def forget(self, live_req_ids: set[str]) -> None:
        """Drops what is kept about every request but `live_req_ids`."""
        known = {*self.requests, *self.lookups, *self._seen, *self._probing, *self._again}
        self.release(known - live_req_ids)

    def accepted_at(self, req_id: str, looked_up: bool = False) -> list[float]:
        """The request's conditional acceptance per draft position, of sparse or of look-up drafts (the
        engine's until it has rounds)."""
        engine = (self.engine_lookup if looked_up else self.engine).estimate(0.5, 1.0)
        tracker = (self.lookups if looked_up else self.requests).get(req_id)
        return tracker.estimate(engine[0], self.PRIOR_STRENGTH) if tracker else engine

    def lookup_accepted_at(self, req_id: str, length: int, match: int) -> list[float]:
        """The acceptance a found look-up draft of `length` tokens, from a match of `match` tokens, is planned
        with: the request's own (the engine's until it has look-up rounds), except where, from a match of
        `TRIED_MATCH` tokens or more, it is tried as if every token would be accepted: before the request's
        first look-up round, after a fully accepted one, when it is longer than the last rejected one (a
        longer match: the answer may have started to repeat) and once its retry is due. A look-up draft
        costs no draft step, so trying one costs little, while never trying would leave a request whose
        answer starts to repeat (the first cycle of a list, a quote) on the estimate of the short chance
        matches before it."""
        if match < self.TRIED_MATCH:
            return self.accepted_at(req_id, looked_up=True)
        due, _ = self._lookup_retry.get(req_id, (0, 0))
        if req_id not in self.lookups or self._steps >= due or length > self._lookup_rejected.get(req_id, 0):
            return [1.0]
        return self.accepted_at(req_id, looked_up=True)

    def costs_changed(self) -> None:
        """The cost model was priced anew: an all-zero plan is checked again at the next step."""
        self._idle_batch = None

    def decide(
        self,
        cost: CostModel,
        drafting: Sequence[tuple[str, float, float]],
        others: Sequence[float],
        probe_cost: CostModel | None = None,
        lookups: Sequence[tuple[int, int]] | None = None,
    ) -> list[Decision]:
        """Draft lengths for the requests `(req_id, context, sparse context)` that may draft this step, in
        a batch that also holds requests of contexts `others` that may not: the drafts (sparse, or from the
        look-up draft request i found, `lookups[i]`: its length and its match's) that maximise the batch's
        predicted tokens per second if that beats plain decoding by more than `min_gain`
        (`CostModel.plan_rounds`), then probes of the sparse drafter for the requests left out, those of a
        due probe round sized by `probe_cost` (the step costs without what rounds were measured to cost
        beyond their forward passes; `cost` if None)."""
        batch = (tuple(req_id for req_id, *_ in drafting), len(others))
        found = lookups is not None and any(length for length, _ in lookups)
        if batch == self._idle_batch and self.idle_steps_ahead() and not found:
            self.repeat_idle()
            return [NOT_PAYING] * len(drafting)
        self._since_probe += 1
        self._steps += 1
        due = self._since_probe >= self._wait
        rows: list[RoundRow] = [(n, sparse, self.accepted_at(req_id)) for req_id, n, sparse in drafting]
        rows += [(n, n, None) for n in others]
        lookup_rows: list[LookupRow] | None = None
        if found:
            assert lookups is not None
            lookup_rows = [
                (length, self.lookup_accepted_at(req_id, length, match)) if length else None
                for (req_id, *_), (length, match) in zip(drafting, lookups, strict=True)
            ] + [None] * len(others)
        planned = cost.plan_rounds(rows, self.max_gamma, self.min_gain, lookup_rows)
        gammas, looked_up = planned.gammas, planned.looked_up
        self._idle_batch, self._idle_age = (None if any(gammas) or found else batch), 1
        paying = [g > 0 for g in gammas]
        first_or_again: list[int] = []  # probe if that pays by the measured costs
        due_only: list[int] = []  # a due probe round's, sized without a round's measured overheads
        grow: dict[int, int] = {}
        idle = False
        for i, (req_id, *_) in enumerate(drafting):
            again = self._again.pop(req_id, 0)
            if paying[i]:
                continue
            # A request that has never drafted probes as soon as that could pay: its own acceptance is unknown
            # until it drafts, and the engine-wide estimate may come from other videos (or be the bare prior).
            new = req_id not in self._seen
            idle |= not new
            if new or again:
                first_or_again.append(i)
                grow[i] = 2 * again
            elif due:
                due_only.append(i)
        # A due probe round re-measures a round's costs too; a request's first probe and the longer ones
        # after accepted probes must pay by the measured costs (else accepted probes would chain on where
        # drafting does not pay).
        drafted = (lookup_rows, looked_up)
        self._probe(cost, rows, gammas, first_or_again, grow, drafted)
        self._probe(probe_cost or cost, rows, gammas, due_only, {}, drafted)
        decisions = []
        for i, (req_id, *_) in enumerate(drafting):
            if paying[i]:
                decisions.append(Decision(gammas[i], "paying", looked_up[i]))
            elif gammas[i]:
                decisions.append(Decision(gammas[i], "probe"))
                self._probing.add(req_id)
            else:
                decisions.append(NOT_PAYING)
        sparse = (d.gamma and not d.looked_up for d in decisions)
        self._seen.update(req_id for (req_id, *_), drafts in zip(drafting, sparse, strict=True) if drafts)
        if due:
            self._since_probe = 0
            if idle:  # a probe round (whether or not any probe could pay): the next one waits longer
                self._wait = min(2 * self._wait, self.MAX_BACKOFF * self.probe_interval)
        return decisions

    def idle_steps_ahead(self) -> int:
        """After a `decide` that drafted nothing: how many of the next steps of the same batch reuse its
        all-zero plan, fewer than `REPLAN_STEPS` steps after it, with no round verified since and no probe
        due (the common step of a batch that does not draft, which then costs almost nothing). That plan
        saw every request of the batch (none is new) and took their pending doublings; only `record` adds
        one, and it drops the idle batch. A caller that knows its batch unchanged may count each of these
        steps with `repeat_idle` instead of calling `decide`, and then needs neither the requests' contexts
        nor anything else `decide` takes; `decide` itself does the same."""
        if self._idle_batch is None:
            return 0
        return max(0, min(self.REPLAN_STEPS - self._idle_age, self._wait - self._since_probe - 1))

    def repeat_idle(self) -> None:
        """A step of the batch of the last `decide`, within `idle_steps_ahead`: counted as `decide` would
        count it, every request not drafting."""
        self._since_probe += 1
        self._steps += 1
        self._idle_age += 1

    def _probe(
        self,
        cost: CostModel,
        rows: list[RoundRow],
        gammas: list[int],
        probing: list[int],
        grow: dict[int, int],
        drafted: tuple[Sequence[LookupRow] | None, list[bool]],
    ) -> None:
        """Sets the probes of the rows `probing` in `gammas`: the fewest drafts that, all drafted together,
        would speed the batch up by more than `min_gain` if every one were accepted (none where none
        would); and for a row after a fully accepted probe, `grow[i]` (twice its length, up to
        `max_gamma`) where that would too, so that a request whose drafts are accepted again reaches long
        rounds in a few steps rather than one position of evidence at a time."""
        if not probing:
            return
        hopeful = list(rows)
        for i in probing:
            hopeful[i] = (rows[i][0], rows[i][1], [1.0])
        fewest = cost.fewest_paying(hopeful, gammas, probing, self.max_gamma, self.min_gain, *drafted)
        if not fewest:
            return
        plain = cost.rate(hopeful, gammas, *drafted) * (1 + self.min_gain)
        for i in probing:
            gammas[i] = fewest
        for i in probing:
            longer = min(grow.get(i, 0), self.max_gamma)
            if longer > fewest:
                tried = [*gammas[:i], longer, *gammas[i + 1 :]]
                if cost.rate(hopeful, tried, *drafted) > plain:
                    gammas[i] = longer
