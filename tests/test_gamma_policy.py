"""The adaptive gamma policy on synthetic costs and acceptance (pure, no vLLM): it never picks draft lengths
predicted slower than plain decoding for the batch, learns acceptance per position, stops drafting where it
cannot pay, probes now and then, and starts again when acceptance comes back. Also the pieces the proposer
feeds it: the per-step overhead, mixed-step costs, and saved cost profiles."""

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cost_model import CPU_VERIFY, DENSE, cost_models, situations

from vllm_std.calibration import StepOverhead
from vllm_std.cost_model import CostModel, LookupRow, RoundPlan, RoundRow, VerifyCost
from vllm_std.gamma_policy import NOT_PAYING, AcceptanceTracker, Decision, GammaPolicy

# A CPU-like engine: extra verify queries cost (query_growth 0.6), drafting reads 1/20 of the context.
CPU = CostModel(DENSE, DENSE, CPU_VERIFY)
CONTEXT, SPARSE = 32_000.0, 1_600.0
MATCH = 5  # a look-up draft's match: n-gram matches reach 5 tokens inside an answer that repeats


def test_tracker_counts_reached_and_accepted_positions() -> None:
    tracker = AcceptanceTracker(max_gamma=4, decay=1.0)
    tracker.update(drafted=4, accepted=2)  # positions 0, 1 accepted; 2 reached and rejected; 3 not reached
    assert tracker.reached == [1, 1, 1, 0]
    assert tracker.accepted == [1, 1, 0, 0]
    tracker.update(drafted=2, accepted=2)  # a shorter round, all accepted: position 2 not reached
    assert tracker.reached == [2, 2, 1, 0]
    assert tracker.accepted == [2, 2, 0, 0]
    # Each position's counts plus two pseudo-rounds at the estimate of the position before.
    assert tracker.estimate(0.5, strength=2.0) == pytest.approx([3 / 4, 7 / 8, 7 / 12, 7 / 12])


def test_tracker_forgets_old_rounds() -> None:
    tracker = AcceptanceTracker(max_gamma=1, decay=0.5)
    tracker.update(1, 1)
    tracker.update(1, 0)
    assert tracker.reached == [1.5] and tracker.accepted == [0.5]


histories = st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)), max_size=12)
"""Verified rounds of one request: (drafted, accepted)."""


@settings(max_examples=200, deadline=None, database=None)
@given(
    cost_models,
    st.lists(st.tuples(situations, histories), min_size=1, max_size=3),
    st.lists(st.floats(100, 200_000), max_size=2),
    st.integers(1, 8),
    st.integers(1, 5),
    st.sampled_from([0.0, 0.1]),
)
def test_decisions_never_predict_a_slowdown(
    cost: CostModel,
    requests: list[tuple[tuple[int, float, float], list[tuple[int, int]]]],
    others: list[float],
    max_gamma: int,
    probe_interval: int,
    min_gain: float,
) -> None:
    """Whatever the costs, the batch and the histories: the "paying" lengths are the cost model's plan for
    the batch, which never predicts a gain of `min_gain` or less; the requests the plan leaves out probe
    together in rounds whose spacing doubles from `probe_interval` (a request that has not drafted yet, at
    once), all with the fewest drafts that would speed the batch up by more than `min_gain` if all of them
    were accepted, unless not even that would."""
    policy = GammaPolicy(max_gamma, probe_interval, min_gain)
    drafting = []
    for i, ((_, context, kept), rounds) in enumerate(requests):
        for drafted, accepted in rounds:
            policy.record(f"r{i}", min(drafted, max_gamma), min(accepted, drafted, max_gamma))
        drafting.append((f"r{i}", context, context * kept))
    rows: list[RoundRow] = [(n, sparse, policy.accepted_at(r)) for r, n, sparse in drafting]
    rows += [(n, n, None) for n in others]
    plan = cost.plan(rows, max_gamma, min_gain)
    assert not any(plan) or cost.rate(rows, plan) > cost.rate(rows, [0] * len(rows)) * (1 + min_gain)
    new = {i for i, (_, rounds) in enumerate(requests) if not rounds}
    # The probe rounds the decisions are checked against: rejected (here: never verified) probes back off,
    # each round waiting twice as long as the one before.
    since, wait = 0, probe_interval
    for _ in range(12 * probe_interval):
        decisions = policy.decide(cost, drafting, others)
        since += 1
        due = since >= wait
        idle = any(not plan[i] and i not in new for i in range(len(drafting)))
        expected = list(plan)
        first = [i for i in range(len(drafting)) if not plan[i] and i in new]
        later = [i for i in range(len(drafting)) if not plan[i] and i not in new and due]
        for group in (first, later):  # the new requests' probes, then a due round's
            gamma = _fewest_together(cost, rows, expected, group, max_gamma, min_gain)
            for i in group:
                expected[i] = gamma
        for i, decision in enumerate(decisions):
            reason = "paying" if plan[i] else ("probe" if expected[i] else "not_paying")
            assert (decision.gamma, decision.reason) == (expected[i], reason)
        new = {i for i in new if not expected[i]}  # a request that could not probe yet stays new
        if due:
            since = 0
            if idle:
                wait = min(2 * wait, GammaPolicy.MAX_BACKOFF * probe_interval)


def _fewest_together(
    cost: CostModel,
    rows: list[RoundRow],
    gammas: list[int],
    group: list[int],
    max_gamma: int,
    min_gain: float,
) -> int:
    """The fewest drafts that the requests `group` drafting together, on top of `gammas`, need to speed the
    batch up by more than `min_gain` if all their drafts are accepted (0: none)."""
    hopeful = [(n, sparse, [1.0]) if i in group else (n, sparse, a) for i, (n, sparse, a) in enumerate(rows)]
    without = cost.rate(hopeful, gammas) * (1 + min_gain)
    for gamma in range(1, max_gamma + 1) if group else ():
        if cost.rate(hopeful, [gamma if i in group else g for i, g in enumerate(gammas)]) > without:
            return gamma
    return 0


def _run(policy: GammaPolicy, cost: CostModel, accept: bool, steps: int) -> list[int]:
    """Steps of one request whose drafts are all accepted (or all rejected); the gammas it drafted."""
    gammas = []
    for _ in range(steps):
        gamma = policy.decide(cost, [("r", CONTEXT, SPARSE)], [])[0].gamma
        policy.record("r", gamma, gamma if accept else 0)
        gammas.append(gamma)
    return gammas


def test_learns_to_draft_where_acceptance_is_high() -> None:
    policy = GammaPolicy(max_gamma=8, probe_interval=4)
    gammas = _run(policy, CPU, accept=True, steps=40)
    assert gammas[-10:] == [gammas[-1]] * 10 and gammas[-1] >= 2
    assert gammas[-1] == CPU.plan([(CONTEXT, SPARSE, [1.0])], 8)[0] or policy.accepted_at("r")[0] < 1


def test_stops_drafting_where_acceptance_is_low_then_resumes() -> None:
    """A changed pattern is noticed both ways: drafting stops within a few rounds of rejections, probes
    continue at a spacing that doubles from `probe_interval` while they are rejected, and accepted probes
    bring drafting back."""
    policy = GammaPolicy(max_gamma=8, probe_interval=4)
    _run(policy, CPU, accept=True, steps=40)
    rejecting = _run(policy, CPU, accept=False, steps=80)
    first_zero = rejecting.index(0)
    assert first_zero <= 6
    idle = rejecting[first_zero:]
    probes = [i for i, gamma in enumerate(idle) if gamma]
    assert set(idle) == {0, 1}
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:3] == [8, 16, 32] and set(gaps[3:]) <= {32}
    accepting = _run(policy, CPU, accept=True, steps=40)
    assert accepting[-1] >= 2


def test_accepted_probes_double_until_the_plan_drafts() -> None:
    """A request whose drafts were rejected and are now accepted again: its first probe drafts the fewest
    tokens that would pay, each fully accepted probe is followed at the next step by one twice as long (up
    to gamma), and once its estimate has caught up the plan drafts for it: one round per doubling instead
    of one round per position of evidence."""
    policy = GammaPolicy(max_gamma=8, probe_interval=4)
    for _ in range(3):
        policy.record("r", 4, 0)
    decisions = []
    for _ in range(20):
        decision = policy.decide(CPU, [("r", CONTEXT, SPARSE)], [])[0]
        policy.record("r", decision.gamma, decision.gamma)
        decisions.append((decision.gamma, decision.reason))
    first = next(i for i, (gamma, _) in enumerate(decisions) if gamma)
    assert decisions[first : first + 5] == [
        (1, "probe"),
        (2, "probe"),
        (4, "probe"),
        (8, "probe"),
        (8, "probe"),
    ]
    assert decisions[-1] == (8, "paying")
    assert {gamma for gamma, _ in decisions[first + 3 :]} == {8}


def test_a_new_request_starts_from_the_engine_wide_acceptance() -> None:
    policy = GammaPolicy(max_gamma=6, probe_interval=16)
    assert policy.accepted_at("new") == [0.5] * 6  # nothing learnt yet
    for _ in range(50):
        policy.record("old", 6, 6)
    assert min(policy.accepted_at("new")) > 0.9
    policy.forget({"new"})
    assert "old" not in policy.requests


def test_a_new_request_probes_at_once() -> None:
    """Before any round, the bare prior (1/2 per position) does not pay at this context, but the request's
    own acceptance is unknown: it probes at its first step, then with the batch's probe rounds (every
    `probe_interval` steps at first, counted from its first step here)."""
    policy = GammaPolicy(max_gamma=6, probe_interval=16)
    assert CPU.plan([(CONTEXT, SPARSE, policy.accepted_at("new"))], 6) == [0]
    first = policy.decide(CPU, [("new", CONTEXT, SPARSE)], [])[0]
    assert first.reason == "probe" and first.gamma > 0
    policy.record("new", first.gamma, 0)
    reasons = [policy.decide(CPU, [("new", CONTEXT, SPARSE)], [])[0].reason for _ in range(15)]
    assert reasons == ["not_paying"] * 14 + ["probe"]


class _CountingPlans(CostModel):
    plans = 0

    def plan_rounds(
        self,
        rows: Sequence[RoundRow],
        max_gamma: int,
        min_gain: float = 0.0,
        lookups: Sequence[LookupRow] | None = None,
    ) -> RoundPlan:
        type(self).plans += 1
        return super().plan_rounds(rows, max_gamma, min_gain, lookups)


def test_idle_requests_probe_together_and_idle_plans_are_rechecked() -> None:
    """Three requests that do not pay: after their first-step probes, they probe in the same steps (one
    verify step for all); between probes the all-zero plan is reused, re-planned every `REPLAN_STEPS`
    steps, at once when the batch changes, a round is verified or a probe is due."""
    cost = _CountingPlans(CPU.dense, CPU.draft, CPU.verify)
    _CountingPlans.plans = 0
    policy = GammaPolicy(max_gamma=6, probe_interval=16)
    batch = [(f"r{i}", CONTEXT, SPARSE) for i in range(3)]
    for req_id, *_ in batch:
        policy.record(req_id, 4, 0)  # rounds of its own, all rejected: nothing pays
    steps = [[d.reason for d in policy.decide(cost, batch, [])] for _ in range(112)]
    probe_steps = [i for i, reasons in enumerate(steps) if "probe" in reasons]
    assert probe_steps == [15, 47, 111] and all(steps[i] == ["probe"] * 3 for i in probe_steps)
    # Plans at the first step, at each probe round, and `REPLAN_STEPS` (32) steps after the last plan:
    # steps 0, 15, 47, 79, 111; none in between.
    assert GammaPolicy.REPLAN_STEPS == 32 and _CountingPlans.plans == 5
    policy.decide(cost, batch[:2], [])  # the batch changed
    policy.record("r0", 1, 0)
    policy.decide(cost, batch[:2], [])  # a round was verified
    assert _CountingPlans.plans == 7


def test_steps_ahead_of_an_idle_plan_decide_as_planning_would() -> None:
    """The proposer counts the steps of an unchanged batch that `idle_steps_ahead` covers with
    `repeat_idle` instead of calling `decide`: each step gets the decisions `decide` would give it, probes
    in the same steps, and `decide` runs for few of them."""

    def run(skip: bool) -> tuple[list[list[str]], int]:
        policy = GammaPolicy(max_gamma=6, probe_interval=16)
        batch = [(f"r{i}", CONTEXT, SPARSE) for i in range(3)]
        for req_id, *_ in batch:
            policy.record(req_id, 4, 0)
        steps: list[list[str]] = []
        ahead = decided = 0
        while len(steps) < 300:
            if skip and ahead:
                policy.repeat_idle()
                ahead -= 1
                steps.append(["not_paying"] * len(batch))
                continue
            decisions = policy.decide(CPU, batch, [])
            decided += 1
            steps.append([d.reason for d in decisions])
            ahead = 0 if any(d.gamma for d in decisions) else policy.idle_steps_ahead()
            for (req_id, *_), decision in zip(batch, decisions, strict=True):
                if decision.gamma:
                    policy.record(req_id, decision.gamma, 0)  # the probe's round, verified: rejected
        return steps, decided

    (planned, every_step), (repeated, fewer) = run(skip=False), run(skip=True)
    assert repeated == planned and every_step == 300
    assert [i for i, reasons in enumerate(planned) if "probe" in reasons] == [15, 47, 111, 239]
    # `decide` at the first step, at each probe and the step after it (its round verified), and every
    # `REPLAN_STEPS` (32) steps after a plan in between: 14 of 300.
    assert fewer == 14


def test_probe_rounds_re_measure_what_rounds_cost_beyond_their_forward_passes() -> None:
    """Rounds measured to cost so much beyond their forward passes (a noisy moment) that no gamma pays, not
    even fully accepted: the due probe round still probes, sized by the costs without that part, since only
    rounds measure it again (without that, one bad measurement would stop drafting for the engine's life).
    A fully accepted probe is followed by a longer one only where the measured costs say it pays, else
    accepted probes would chain on where drafting does not pay."""
    row = ("r", CONTEXT, SPARSE)
    costly_rounds = CPU.with_overhead(0.0, per_round=10 * CPU.dense(1, CONTEXT))
    assert costly_rounds.fewest_paying([(CONTEXT, SPARSE, [1.0])], [0], [0], 6, 0.1) == 0

    def steps(probe_cost: CostModel | None) -> list[Decision]:
        policy = GammaPolicy(6, 16, 0.1)
        policy.record("r", 4, 0)  # not new: its first rounds were rejected
        decisions = [policy.decide(costly_rounds, [row], [], probe_cost)[0] for _ in range(16)]
        if decisions[-1].gamma:
            policy.record("r", decisions[-1].gamma, decisions[-1].gamma)  # fully accepted
        return [*decisions, policy.decide(costly_rounds, [row], [], probe_cost)[0]]

    assert steps(None) == [NOT_PAYING] * 17
    with_probes = steps(CPU)
    assert with_probes[:15] == [NOT_PAYING] * 15 and with_probes[16] == NOT_PAYING
    assert with_probes[15].reason == "probe" and with_probes[15].gamma > 0


def test_never_drafts_where_verify_cannot_pay() -> None:
    """Verify steps 100x a dense step: even perfect acceptance cannot pay, so nothing is drafted, not even
    probes."""
    slow_verify = VerifyCost(100 * DENSE.fixed, 0.0, 100 * DENSE.per_context_token, 0.0)
    policy = GammaPolicy(max_gamma=6, probe_interval=8)
    assert _run(policy, CostModel(DENSE, DENSE, slow_verify), accept=True, steps=64) == [0] * 64


def test_per_draft_overhead_makes_drafting_less_attractive() -> None:
    """What each verified draft and each draft step cost outside the forward pass count against every
    gamma, more the longer."""
    slowed = CPU.with_overhead(0.0, per_draft=1e-3)
    slow_drafter = CPU.with_overhead(0.0, per_draft_step=1e-3)
    assert slow_drafter.draft(2, SPARSE) == pytest.approx(CPU.draft(2, SPARSE) + 1e-3)
    for gamma in range(1, 8):
        assert slowed.verify(2, CONTEXT, gamma) == pytest.approx(CPU.verify(2, CONTEXT, gamma) + 2e-3 * gamma)
        before = CPU.speedup(1, CONTEXT, SPARSE, [0.7], gamma)
        assert slowed.speedup(1, CONTEXT, SPARSE, [0.7], gamma) < before
        assert slow_drafter.speedup(1, CONTEXT, SPARSE, [0.7], gamma) < before


def test_overhead_makes_drafting_more_attractive_never_less() -> None:
    """A per-step cost that dense and verify steps share raises every gamma's speedup (more tokens per
    step amortise it), so a policy that has not measured it yet errs toward plain decoding."""
    for gamma in range(1, 8):
        base = CPU.speedup(1, CONTEXT, SPARSE, [0.7], gamma)
        assert CPU.with_overhead(5e-3).speedup(1, CONTEXT, SPARSE, [0.7], gamma) > base


def test_step_seconds_of_a_mixed_step() -> None:
    dense_only = CPU.step_seconds([(1_000, 0), (3_000, 0)])
    assert dense_only == pytest.approx(CPU.dense(2, 2_000))
    verify_only = CPU.step_seconds([(2_000, 4), (2_000, 4)])
    assert verify_only == pytest.approx(CPU.verify(2, 2_000, 4))
    mixed = CPU.step_seconds([(2_000, 0), (2_000, 4)])
    assert dense_only < mixed < verify_only


def test_step_overhead_is_the_median_residual_of_decode_steps() -> None:
    overhead = StepOverhead()
    assert (overhead.fixed, overhead.rounds()) == (0.0, (0.0, 0.0, 0.0))
    for _ in range(10):
        overhead.observe(0.005, predicted_forward=0.003, drafts=0)
    overhead.observe(30.0, predicted_forward=0.003, drafts=0)  # an idle gap between requests
    overhead.observe(0.001, predicted_forward=0.003, drafts=0)  # never negative
    assert overhead.fixed == pytest.approx(0.002)
    # Steps verifying drafts: what they cost beyond the fixed part, per round and per verified draft.
    for drafts in (2, 4, 8, 8):
        overhead.observe(0.003 + 0.002 + 3e-4 + 1e-4 * drafts, predicted_forward=0.003, drafts=drafts)
    # Drafting rounds: what they take beyond the predicted forward passes, per round and per draft step.
    for steps in (1, 3, 6):
        overhead.observe_drafting(0.004 * steps + 2e-4 + 5e-4 * steps, predicted=(0.004 * steps, steps))
    assert overhead.fixed == pytest.approx(0.002)
    assert overhead.rounds() == pytest.approx((3e-4 + 2e-4, 1e-4, 5e-4))
    faster = StepOverhead()
    faster.observe_drafting(0.001, predicted=(0.004, 1))  # never negative
    assert faster.rounds() == (0.0, 0.0, 0.0)
    assert StepOverhead.decode_rows([(100, 1, 90), (200, 5, 150)]) == [(101, 0), (205, 4)]
    assert StepOverhead.decode_rows([(100, 1, 90), (0, 512, 1_000)]) is None  # a prefill chunk


def test_a_round_overhead_seen_on_single_drafts_is_not_charged_per_draft() -> None:
    """Probes of one draft that each cost 2 ms more than a plain step: that is a cost per round until longer
    rounds show a cost per draft, so a batch whose long rounds pay still drafts."""
    overhead = StepOverhead()
    for _ in range(8):
        overhead.observe(0.010, predicted_forward=0.008, drafts=0)
        overhead.observe(0.012 + 0.002, predicted_forward=0.010, drafts=1)
        overhead.observe_drafting(0.004 + 0.001, predicted=(0.004, 1))
    assert overhead.rounds() == pytest.approx((0.003, 0.0, 0.0))
    batch = [(16_000, 400, [1.0])] * 4
    assert CPU.with_overhead(overhead.fixed, *overhead.rounds()).plan(batch, 6) == [6] * 4
    per_draft = CPU.with_overhead(overhead.fixed, per_draft=0.002, per_draft_step=0.001)
    assert per_draft.plan(batch, 6) == [0] * 4


def test_cost_profile_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**CPU.to_json(), "measured_with": {"model": "m"}}))
    assert CostModel.load(path) == CPU
    path.write_text(json.dumps({"dense": {}}))
    with pytest.raises(ValueError, match="not a 'vllm-std cost profile v1' file"):
        CostModel.load(path)


def test_look_up_drafts_are_chosen_by_their_own_acceptance() -> None:
    """Each request's look-up drafts have an acceptance of their own: a request whose look-ups are rejected
    stops taking them, while one whose look-ups are accepted keeps drafting from them, not from the sparse
    drafter (whose draft steps cost more for the same acceptance)."""
    policy = GammaPolicy(max_gamma=6, probe_interval=16, min_gain=0.1)
    for _ in range(8):
        policy.record("copies", 6, 6, looked_up=True)
        policy.record("invents", 6, 0, looked_up=True)
        policy.record("copies", 6, 6)
        policy.record("invents", 6, 6)
    assert policy.accepted_at("copies", looked_up=True)[0] > 0.9
    assert policy.accepted_at("invents", looked_up=True)[0] < 0.1 < 0.9 < policy.accepted_at("invents")[0]
    drafting = [("copies", CONTEXT, SPARSE), ("invents", CONTEXT, SPARSE)]
    copies, invents = policy.decide(CPU, drafting, [], lookups=[(6, MATCH), (6, MATCH)])
    assert copies.looked_up and copies.gamma == 6 and copies.reason == "paying"
    assert not invents.looked_up
    # Without look-up drafts found, both draft sparse.
    assert not any(d.looked_up for d in policy.decide(CPU, drafting, [], lookups=[(0, 0), (0, 0)]))


def test_a_found_look_up_draft_is_tried_first_and_retried_later() -> None:
    """A request's first look-up draft is tried as if it would be accepted, even where its sparse drafts
    are (a look-up costs no draft step, and its acceptance is unknown until tried); one whose look-ups were
    rejected tries again once its retry is due, each rejected retry doubling the wait."""
    policy = GammaPolicy(max_gamma=6, probe_interval=16, min_gain=0.1)
    for _ in range(4):
        policy.record("r", 6, 6)
    drafting = [("r", CONTEXT, SPARSE)]
    assert policy.decide(CPU, drafting, [], lookups=[(6, MATCH)])[0].looked_up
    policy.record("r", 6, 0, looked_up=True)
    steps = 0
    while not policy.decide(CPU, drafting, [], lookups=[(6, MATCH)])[0].looked_up:
        steps += 1
    assert steps == 15  # the first retry is due `probe_interval` steps after the rejected round
    policy.record("r", 6, 0, looked_up=True)
    steps = 0
    while not policy.decide(CPU, drafting, [], lookups=[(6, MATCH)])[0].looked_up:
        steps += 1
    assert steps == 31


def test_look_up_drafts_of_chance_matches_are_not_tried_as_if_accepted() -> None:
    """In an answer that does not repeat, its latest token or two match earlier text by chance, and what
    followed them there is rejected. Such a look-up draft is planned with the look-up acceptance learnt
    (here the prior), so a request whose sparse drafts are accepted keeps drafting them; a look-up draft of
    a longer match is tried as if it would be accepted, and one of a chance match is taken where look-ups
    are accepted."""
    for match in (1, GammaPolicy.TRIED_MATCH - 1):
        policy = GammaPolicy(max_gamma=6, probe_interval=16, min_gain=0.1)
        for _ in range(4):
            policy.record("r", 6, 6)
        drafting = [("r", CONTEXT, SPARSE)]
        assert policy.lookup_accepted_at("r", 6, match) == policy.accepted_at("r", looked_up=True)
        chance = policy.decide(CPU, drafting, [], lookups=[(6, match)])[0]
        assert not chance.looked_up and chance.gamma == 6
        assert policy.decide(CPU, drafting, [], lookups=[(6, GammaPolicy.TRIED_MATCH)])[0].looked_up
        for _ in range(8):
            policy.record("r", 6, 6, looked_up=True)
        assert policy.decide(CPU, drafting, [], lookups=[(6, match)])[0].looked_up


def test_a_new_request_probes_once_the_engine_overheads_show_that_drafting_pays() -> None:
    """On a small model a draft step's forward pass costs about what a dense step's does: drafting pays
    only by what the engine spends around each target step, unknown at its first steps. A request that
    could not probe then probes as soon as the measured overhead makes drafting pay, not at the next due
    probe round."""
    forward_only = CostModel(DENSE, DENSE, CPU_VERIFY)
    row = [(CONTEXT, CONTEXT, [1.0])]
    assert forward_only.plan(row, 6) == [0]  # even fully accepted drafts do not pay on forward passes alone
    engine = forward_only.with_overhead(0.02)
    assert engine.plan(row, 6) == [6]
    policy = GammaPolicy(max_gamma=6, probe_interval=16)
    drafting = [("new", CONTEXT, CONTEXT)]
    assert policy.decide(forward_only, drafting, []) == [NOT_PAYING]
    policy.costs_changed()
    decision = policy.decide(engine, drafting, [])[0]
    assert decision.reason == "probe" and decision.gamma > 0


def test_a_longer_or_following_look_up_draft_is_tried_at_once() -> None:
    """After rejected short look-ups (chance matches of a word or two), a longer look-up draft (a longer
    match: the answer started to repeat) is tried before its retry is due; after a fully accepted look-up
    round the next look-up draft is tried again, so a repeating answer keeps drafting from it."""
    policy = GammaPolicy(max_gamma=6, probe_interval=16, min_gain=0.1)
    for _ in range(4):
        policy.record("r", 6, 6)
    drafting = [("r", CONTEXT, SPARSE)]
    assert policy.decide(CPU, drafting, [], lookups=[(1, MATCH)])[0].looked_up
    policy.record("r", 1, 0, looked_up=True)
    assert not policy.decide(CPU, drafting, [], lookups=[(1, MATCH)])[0].looked_up
    assert policy.decide(CPU, drafting, [], lookups=[(6, MATCH)])[0].looked_up
    policy.record("r", 6, 6, looked_up=True)
    assert policy.accepted_at("r", looked_up=True)[0] < 0.9  # one accepted round after a rejected one
    for _ in range(4):
        decision = policy.decide(CPU, drafting, [], lookups=[(6, MATCH)])[0]
        assert decision.looked_up and decision.gamma == 6
        policy.record("r", 6, 6, looked_up=True)
    policy.record("r", 6, 2, looked_up=True)  # rejected: as long a draft is planned by what was learnt
    assert policy.lookup_accepted_at("r", 6, MATCH) == policy.accepted_at("r", looked_up=True) != [1.0]


def test_step_overhead_settles_after_its_first_plain_steps() -> None:
    overhead = StepOverhead()
    assert overhead.settling
    for _ in range(StepOverhead.SETTLED):
        overhead.observe(0.005, predicted_forward=0.003, drafts=0)
    assert not overhead.settling
    drafting = StepOverhead()  # an engine that drafts at every step sees no plain step
    for _ in range(StepOverhead.WINDOW):
        drafting.observe(0.006, predicted_forward=0.003, drafts=4)
    assert not drafting.settling
