"""The cost model's pure parts: fitting recovers known costs, predictions follow the round arithmetic, and
the gamma it picks never predicts a slowdown."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_std.cost_model import (
    BandwidthModel,
    CostModel,
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


@settings(max_examples=300, deadline=None, database=None)
@given(cost_models, situations, st.lists(st.floats(0, 1), min_size=1, max_size=8), st.integers(0, 16))
def test_best_gamma_never_predicts_a_slowdown(
    model: CostModel, situation: tuple[int, float, float], accepted_at: list[float], max_gamma: int
) -> None:
    batch, context, kept = situation
    sparse = context * kept
    best = model.best_gamma(batch, context, sparse, accepted_at, max_gamma)
    assert 0 <= best <= max_gamma
    chosen = model.speedup(batch, context, sparse, accepted_at, best)
    assert chosen >= 1.0
    assert all(chosen >= model.speedup(batch, context, sparse, accepted_at, g) for g in range(max_gamma + 1))


def test_bandwidth_model_of_the_papers_setting() -> None:
    """Qwen2-VL-7B in bf16 on an H100 (15.2 GB of weights, 57,344 KV bytes per token, 3.35 TB/s): extra
    verify queries are free, and since the drafter reads all the weights too, STD pays only where KV reads
    outweigh them: long videos and batches, not one short request."""
    gpu = BandwidthModel(weight_bytes=15.2e9, kv_bytes_per_token=57_344, bandwidth=3.35e12).cost_model()
    assert gpu.verify(1, 64_000, 8) == pytest.approx(gpu.dense(1, 64_000))
    assert gpu.best_gamma(8, 140_000, 1_024, [0.8], 12) > 0
    assert gpu.speedup(8, 140_000, 1_024, [0.8], 6) > 1.5
    assert gpu.best_gamma(1, 4_000, 1_024, [0.8], 12) == 0
