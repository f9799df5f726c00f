"""The cost model's pure parts: fitting recovers known costs, predictions follow the round arithmetic, and
the draft lengths it plans for a batch are the fastest and never predict a slowdown."""

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_std.cost_model import (
    BandwidthModel,
    CostModel,
    LookupRow,
    RoundRow,
    StepCost,
    VerifyCost,
    fit_step_cost,
    fit_verify_cost,
    tokens_per_round,
)

DENSE = StepCost(fixed=3e-3, per_request=1e-3, per_context_token=3e-7)
CPU_VERIFY = VerifyCost(fixed=4e-3, per_query=1e-3, per_context_token=3e-7, query_growth=0.6)


def test_fit_step_cost_recovers_the_coefficients() -> None:
    points = [(b, ctx) for b in (1, 2, 4) for ctx in (1_000, 4_000, 16_000)]
    fitted = fit_step_cost(*zip(*points, strict=True), [DENSE(b, ctx) for b, ctx in points])
    assert dataclasses.astuple(fitted) == pytest.approx(dataclasses.astuple(DENSE), rel=1e-6)


def test_fit_verify_cost_recovers_the_coefficients() -> None:
    points = [(b, ctx, g) for b in (1, 4) for ctx in (1_000, 16_000) for g in (1, 3, 6)]
    seconds = [CPU_VERIFY(b, ctx, g) for b, ctx, g in points]
    fitted = fit_verify_cost(*zip(*points, strict=True), seconds)
    assert dataclasses.astuple(fitted) == pytest.approx(dataclasses.astuple(CPU_VERIFY), rel=1e-6)


def test_fits_never_go_negative() -> None:
    """Noise that would make a coefficient negative is clipped: more work never predicts a cheaper step."""
    fitted = fit_step_cost([1, 1, 2], [100, 200, 100], [0.010, 0.009, 0.020])
    assert min(fitted.fixed, fitted.per_request, fitted.per_context_token) >= 0


@pytest.mark.parametrize(
    ("accepted_at", "gamma", "expected"),
    [
        ([1.0], 4, 5.0),
        ([0.0], 4, 1.0),
        ([0.5], 3, 1 + 0.5 + 0.25 + 0.125),
        ([0.9, 0.5], 3, 1 + 0.9 + 0.45 + 0.225),
        ([], 3, 1.0),
    ],
)
def test_tokens_per_round(accepted_at: list[float], gamma: int, expected: float) -> None:
    assert tokens_per_round(accepted_at, gamma) == pytest.approx(expected)


def test_speedup_by_hand() -> None:
    model = CostModel(DENSE, DENSE, CPU_VERIFY)
    tokens = tokens_per_round([0.8], 4)
    round_seconds = 4 * DENSE(2, 1_500) + CPU_VERIFY(2, 30_000, 4)
    expected = tokens * DENSE(2, 30_000) / round_seconds
    assert model.speedup(2, 30_000, 1_500, [0.8], 4) == pytest.approx(expected)
    assert model.speedup(2, 30_000, 1_500, [0.8], 0) == 1.0


costs = st.builds(StepCost, st.floats(1e-4, 1e-2), st.floats(0, 1e-2), st.floats(0, 1e-6))
verify_costs = st.builds(
    VerifyCost, st.floats(1e-4, 1e-2), st.floats(0, 1e-2), st.floats(0, 1e-6), st.floats(0, 1)
)


cost_models = st.builds(CostModel, costs, costs, verify_costs)
situations = st.tuples(st.integers(1, 16), st.floats(100, 200_000), st.floats(0, 1))
"""(batch, context, fraction of the context the drafter reads)"""


acceptances = st.lists(st.floats(0, 1), min_size=1, max_size=4)
round_rows = st.tuples(st.floats(100, 200_000), st.floats(0, 1), st.one_of(st.none(), acceptances)).map(
    lambda r: (r[0], r[0] * r[1], r[2])
)
"""(context, context the drafter reads, acceptance per position or None for a request that cannot draft)"""


@settings(max_examples=300, deadline=None, database=None)
@given(
    cost_models,
    st.lists(round_rows, min_size=1, max_size=3),
    st.integers(0, 3),
    st.sampled_from([0.0, 0.0, 0.05, 0.3]),
)
def test_plan_is_the_fastest_round_and_never_a_slowdown(
    model: CostModel, rows: list[RoundRow], max_gamma: int, min_gain: float
) -> None:
    """Against every combination of draft lengths: the plan is the fastest (up to rounding) where that
    beats plain decoding by more than `min_gain`, and all zeros where it does not; it never drafts where
    a request cannot."""
    plan = model.plan(rows, max_gamma, min_gain)
    plain = model.rate(rows, [0] * len(rows))
    choices = [range(max_gamma + 1) if accepted_at is not None else [0] for *_, accepted_at in rows]
    fastest = max(model.rate(rows, list(gammas)) for gammas in itertools.product(*choices))
    assert all(0 <= g <= max_gamma for g in plan)
    assert all(g == 0 for g, (*_, accepted_at) in zip(plan, rows, strict=True) if accepted_at is None)
    if fastest <= plain * (1 + min_gain) * (1 - 1e-9):
        assert plan == [0] * len(rows)
    elif fastest > plain * (1 + min_gain) * (1 + 1e-9):
        assert model.rate(rows, plan) == pytest.approx(fastest, rel=1e-9)
    if any(plan):
        assert model.rate(rows, plan) > plain * (1 + min_gain)


lookup_rows = st.one_of(st.none(), st.tuples(st.integers(0, 3), acceptances))
"""A request's look-up draft: its length and acceptance per position, or None."""


@settings(max_examples=300, deadline=None, database=None)
@given(
    cost_models,
    st.lists(st.tuples(round_rows, lookup_rows), min_size=1, max_size=3),
    st.integers(0, 3),
    st.sampled_from([0.0, 0.0, 0.05, 0.3]),
)
def test_plan_with_lookups_is_the_fastest_round(
    model: CostModel, table: list[tuple[RoundRow, LookupRow]], max_gamma: int, min_gain: float
) -> None:
    """Against every combination of each request's choices (none, a sparse draft of each length, its look-up
    draft cut to each length): the plan is the fastest where that beats plain decoding by more than
    `min_gain`, all zeros where it does not; a look-up draft never runs past what was looked up."""
    rows, lookups = [row for row, _ in table], [lookup for _, lookup in table]
    plan = model.plan_rounds(rows, max_gamma, min_gain, lookups)
    plain = model.rate(rows, [0] * len(rows))

    def choices(row: RoundRow, lookup: LookupRow) -> list[tuple[int, bool]]:
        sparse = range(1, max_gamma + 1) if row[2] is not None else []
        looked = range(1, min(lookup[0], max_gamma) + 1) if lookup is not None else []
        return [(0, False), *((g, False) for g in sparse), *((g, True) for g in looked)]

    def rate(combination: tuple[tuple[int, bool], ...]) -> float:
        gammas, looked_up = zip(*combination, strict=True)
        return model.rate(rows, gammas, lookups, looked_up)

    fastest = max(map(rate, itertools.product(*map(choices, rows, lookups))))
    chosen = tuple(zip(plan.gammas, plan.looked_up, strict=True))
    assert all(c in choices(row, lookup) for c, row, lookup in zip(chosen, rows, lookups, strict=True))
    if fastest <= plain * (1 + min_gain) * (1 - 1e-9):
        assert plan.gammas == [0] * len(rows)
    elif fastest > plain * (1 + min_gain) * (1 + 1e-9):
        assert rate(chosen) == pytest.approx(fastest, rel=1e-9)


def test_a_lookup_draft_costs_no_draft_step() -> None:
    """Where a sparse draft does not pay (a short context on the CPU), the same acceptance from a look-up
    draft does: it costs only its share of the verify step."""
    model = CostModel(DENSE, StepCost(2e-3, 2e-4, 3e-7), CPU_VERIFY)
    row = (4_000, 1_600, [0.9])
    assert model.plan([row], 6, min_gain=0.1) == [0]
    plan = model.plan_rounds([row], 6, 0.1, [(4, [0.9])])
    assert plan.looked_up == [True] and plan.gammas[0] > 0
    assert model.plan_rounds([row], 6, 0.1, [None]).gammas == [0]


def test_a_small_predicted_gain_is_not_worth_drafting() -> None:
    """A request predicted 5 % faster drafts with no margin and not with a 10 % one (the model's error)."""
    model = CostModel(DENSE, StepCost(2e-3, 2e-4, 3e-7), CPU_VERIFY)
    row = (32_000, 1_600, [0.85])
    gamma = model.plan([row], 6)[0]
    assert 1.03 < model.speedup(1, 32_000, 1_600, [0.85], gamma) < 1.1
    assert model.plan([row], 6, min_gain=0.1) == [0]
    assert model.fewest_paying([row], [0], [0], 6, min_gain=0.1) == 0
    assert model.fewest_paying([row], [0], [0], 6) == gamma


@settings(max_examples=100, deadline=None, database=None)
@given(cost_models, situations, acceptances, st.integers(0, 8))
def test_a_uniform_round_is_the_speedup(
    model: CostModel, situation: tuple[int, float, float], accepted_at: list[float], gamma: int
) -> None:
    """A batch of alike requests all drafting `gamma`: the batch rate's gain is the per-request speedup."""
    batch, context, kept = situation
    rows = [(context, context * kept, accepted_at)] * batch
    gain = model.rate(rows, [gamma] * batch) / model.rate(rows, [0] * batch)
    assert gain == pytest.approx(model.speedup(batch, context, context * kept, accepted_at, gamma), rel=1e-9)


def test_a_shared_round_weighs_the_whole_batch() -> None:
    """Draft steps and the verify step are shared: a request that pays alone does not when three requests
    that cannot draft would wait for its drafts, and of two requests only the one that is accepted drafts."""
    model = CostModel(DENSE, StepCost(2e-3, 2e-4, 3e-7), CPU_VERIFY)
    likely, unlikely, waiting = (32_000, 1_600, [0.9]), (32_000, 1_600, [0.1]), (32_000, 32_000, None)
    assert model.plan([likely], 6) == [2]
    assert model.plan([likely, waiting, waiting, waiting], 6) == [0, 0, 0, 0]
    assert model.plan([likely, unlikely], 6) == [2, 0]
    assert model.plan([unlikely], 6) == [0]


def test_bandwidth_model_of_the_papers_setting() -> None:
    """Qwen2-VL-7B in bf16 on an H100 (15.2 GB of weights, 57,344 KV bytes per token, 3.35 TB/s): extra
    verify queries are free, and since the drafter reads all the weights too, STD pays only where KV reads
    outweigh them: long videos and batches, not one short request."""
    gpu = BandwidthModel(weight_bytes=15.2e9, kv_bytes_per_token=57_344, bandwidth=3.35e12).cost_model()
    assert gpu.verify(1, 64_000, 8) == pytest.approx(gpu.dense(1, 64_000))
    assert min(gpu.plan([(140_000, 1_024, [0.8])] * 8, 12)) > 0
    assert gpu.speedup(8, 140_000, 1_024, [0.8], 6) > 1.5
    assert gpu.plan([(4_000, 1_024, [0.8])], 12) == [0]
