"""Adaptive gamma end to end: whatever draft lengths the policy picks, the output is the output without
speculation, and vLLM's counters and STD's metrics show what it picked and why.

Timing decides the default policy's choices, so exact choices are asserted only under saved cost profiles
that leave no room for timing: one where drafting is free (every request drafts gamma every step) and one
where a verify step costs a thousand dense steps (nothing is drafted, not even a probe). Both predict a
dense step of a thousand seconds, so the overhead learnt while serving (what a target step takes beyond its
predicted forward pass: nothing here; what a draft step takes beyond a free forward pass: milliseconds) is
too small to tip a decision. The start-up
measurement itself runs in the default case and in `test_tp.py` (two ranks, one deciding).
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import test_std_lossless
from helpers import GREEDY, drafter_report, engine

from vllm_std.cost_model import CostModel, StepCost, VerifyCost
from vllm_std.metrics import spec_decode_counters, std_metrics

GAMMA = 4
DENSE = StepCost(fixed=1e3, per_request=0.0, per_context_token=1e-7)
FREE_DRAFTS = CostModel(
    DENSE, StepCost(0.0, 0.0, 0.0), VerifyCost(DENSE.fixed, 0.0, DENSE.per_context_token, 0.0)
)
COSTLY_VERIFY = dataclasses.replace(
    FREE_DRAFTS, verify=VerifyCost(1e3 * DENSE.fixed, 0.0, 1e3 * DENSE.per_context_token, 0.0)
)
COSTLY_DRAFTS = dataclasses.replace(FREE_DRAFTS, draft=StepCost(1e3 * DENSE.fixed, 0.0, 0.0))
"""A draft step costs a thousand dense steps, a verify step one: only look-up drafts can pay."""


def baseline() -> list[list[int]]:
    """The lossless suite's engine without speculation (run once per test session)."""
    return test_std_lossless.baseline("qwen2_vl", "float32")


def _run(spec: dict[str, Any]) -> tuple[list[list[int]], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The lossless suite's requests (its mixed batch, then a prefix-cache follow-up) under `spec`: outputs,
    vLLM's spec-decode counters, STD's metrics, and what the drafter knows (`helpers.drafter_report`)."""
    args = test_std_lossless.ENGINE_ARGS["qwen2_vl"]
    with engine("qwen2_vl", speculative_config=spec, **args) as llm:
        outputs = test_std_lossless._run(llm, "qwen2_vl")
        return outputs, spec_decode_counters(llm), std_metrics(llm), drafter_report(llm)


def _profile(tmp_path: Path, cost: CostModel) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(cost.to_json()))
    return str(path)


def _costly_drafts(tmp_path: Path) -> dict[str, Any]:
    return {
        "method": "std",
        "num_speculative_tokens": GAMMA,
        "cost_profile": _profile(tmp_path, COSTLY_DRAFTS),
    }


def test_default_adaptive_std_is_lossless() -> None:
    """The defaults (start-up measurement): identical output; every step of every scored request got a
    decision; no more was drafted than chosen."""
    outputs, counters, std, report = _run({"method": "std", "num_speculative_tokens": GAMMA, "top_k": 256})
    assert outputs == baseline()
    decisions = std["gamma_decisions"]
    assert decisions["fixed"] == 0
    count, chosen = std["gamma"]
    assert count == sum(decisions.values()) > 0
    assert counters["num_draft_tokens"] <= chosen
    # What a step without drafts costs beyond its forward pass was measured (also where steps repeat the
    # one before and are noted only one in eight).
    assert report["plain_step_overhead"] > 0


# The policy's choices under these profiles are unit-tested in test_gamma_policy.py; end to end (an engine
# each, about a minute), they run in the slow suite.
@pytest.mark.slow
def test_where_drafting_is_free_every_request_drafts_gamma(tmp_path: Path) -> None:
    outputs, counters, std, _ = _run(
        {"method": "std", "num_speculative_tokens": GAMMA, "cost_profile": _profile(tmp_path, FREE_DRAFTS)}
    )
    assert outputs == baseline()
    decisions = std["gamma_decisions"]
    assert decisions == {"fixed": 0, "paying": decisions["paying"], "probe": 0, "not_paying": 0}
    count, chosen = std["gamma"]
    assert count == decisions["paying"] > 0 and chosen == GAMMA * count
    assert 0 < counters["num_drafts"] <= count


@pytest.mark.slow
def test_where_verify_cannot_pay_nothing_is_drafted(tmp_path: Path) -> None:
    outputs, counters, std, _ = _run(
        {"method": "std", "num_speculative_tokens": GAMMA, "cost_profile": _profile(tmp_path, COSTLY_VERIFY)}
    )
    assert outputs == baseline()
    decisions = std["gamma_decisions"]
    assert decisions == {"fixed": 0, "paying": 0, "probe": 0, "not_paying": decisions["not_paying"]}
    assert decisions["not_paying"] > 0 and std["gamma"][1] == 0
    assert counters.get("num_drafts", 0) == 0
    # One decision per token each scored request sampled (five of the suite's requests, every video scored
    # through chunked prefill, the follow-up's from the prefix cache), also in the steps that repeat an idle
    # plan without planning.
    assert std["requests_scored"] == 5
    assert decisions["not_paying"] == std["gamma"][0] == 5 * GREEDY.max_tokens


def test_where_draft_steps_cannot_pay_look_up_drafts_still_do(tmp_path: Path) -> None:
    """Look-up drafts cost no draft step: where the sparse drafter cannot pay, the requests whose output
    repeats draft from their own text, and only from it."""
    outputs, counters, std, _ = _run(_costly_drafts(tmp_path))
    assert outputs == baseline()
    assert std["draft_tokens"].get("sparse", 0) == 0
    assert std["draft_tokens"]["lookup"] == counters["num_draft_tokens"] > 0
    assert std["gamma_decisions"]["paying"] > 0


@pytest.mark.slow
def test_with_lookup_off_where_draft_steps_cannot_pay_nothing_is_drafted(tmp_path: Path) -> None:
    outputs, counters, std, _ = _run({**_costly_drafts(tmp_path), "lookup": False})
    assert outputs == baseline()
    assert counters.get("num_drafts", 0) == 0 and sum(std["draft_tokens"].values()) == 0
