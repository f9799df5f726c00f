"""The block scores computed inside vLLM equal an eager-attention computation in transformers.

vLLM never materialises attention probabilities; STD recomputes the text-to-key attention mass from the
queries and keys it captures during (chunked) prefill. transformers' eager attention returns the full
probability matrices, so the same scores follow from them directly, on the same checkpoint and prompt.

The video has no more temporal than spatial patches (16 frames of 448x448: 8x16x16): on longer videos
vLLM 0.32 and transformers 5.19 give the text after a Qwen2-VL video different M-RoPE positions, so the
two models themselves differ there (seen with 32 frames of 224x224; not an STD matter).
"""

import pytest
import torch
from helpers import BLOCK_SIZE, drafter_report, eager_block_scores, engine
from vllm import SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.selection import select_blocks

TOP_K = 256


# test_tp.py compares chunked-prefill scores with eager attention per rank; the chunked case here is slow.
@pytest.mark.parametrize(
    "max_num_batched_tokens",
    [pytest.param(512, id="chunked-prefill", marks=pytest.mark.slow), pytest.param(4096, id="one-chunk")],
)
def test_vllm_scores_match_eager_attention(max_num_batched_tokens: int) -> None:
    path = str(tiny_model("qwen2_vl"))
    request = vllm_request(
        path, "What happens in the video?", videos=[synthetic_frames(16, 448, 448, seed=7)]
    )
    spec = {"method": "std", "num_speculative_tokens": 4, "top_k": TOP_K}
    with engine("qwen2_vl", speculative_config=spec, max_num_batched_tokens=max_num_batched_tokens) as llm:
        llm.generate([request], SamplingParams(max_tokens=8, temperature=0.0))
        record = drafter_report(llm)["history"][-1]
        # A later request: the first one's per-request state must be gone once vLLM dropped it.
        llm.generate([vllm_request(path, "Tell me about the red car.")], SamplingParams(max_tokens=4))
        live = drafter_report(llm)["live"]
    assert record["req_id"] not in live and len(live) <= 1

    expected, candidates = eager_block_scores(path, request)
    got = torch.tensor(record["block_scores"])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(torch.tensor(record["kept"]), select_blocks(expected, candidates, TOP_K // BLOCK_SIZE))
