"""`PrefillScorer` driven as the runner drives it, without an engine: a step is planned before its forward
pass (`GPUModelRunnerModelForwardPatch`), the layer hooks observe it, and the plan is closed after."""

import torch

from vllm_std.capture import BatchRow, PrefillScorer, VisualRequest
from vllm_std.config import STDConfig

NUM_LAYERS, BLOCK_SIZE, HEADS, HEAD_SIZE = 3, 16, 2, 8
PROMPT = 8 * BLOCK_SIZE  # six blocks of video, then two of text
VIDEO = (0, 6 * BLOCK_SIZE)


def scorer_with_request() -> PrefillScorer:
    config = STDConfig.parse({"top_k": 2 * BLOCK_SIZE, "min_visual_tokens": 1})
    scorer = PrefillScorer(config, NUM_LAYERS, BLOCK_SIZE, HEAD_SIZE**-0.5)
    scorer.admit(VisualRequest("r", PROMPT, (VIDEO,)))
    return scorer


def read_keys(req_id: str, num_tokens: int) -> torch.Tensor:
    return torch.randn(num_tokens, HEADS, HEAD_SIZE, generator=torch.Generator().manual_seed(0))


def test_a_prompt_every_layer_saw_is_selected() -> None:
    scorer = scorer_with_request()
    scorer.plan_step([BatchRow("r", 0, PROMPT, 0)])
    for layer in range(NUM_LAYERS):
        scorer.observe(layer, torch.randn(PROMPT, 2 * HEADS, HEAD_SIZE), read_keys)
    scorer.end_step()
    assert "r" in scorer.selections and not scorer.planned


def test_a_step_its_layers_did_not_show_leaves_the_prompt_unscored() -> None:
    """A step whose layers ran no hook (replayed as a full CUDA graph), or only some: the prompt decodes
    without drafts, counted as `incomplete_capture`, rather than waiting forever for its scores."""
    for seen in (0, 1):
        for chunks in ((PROMPT,), (PROMPT - 4, 4)):  # the completing chunk, or an earlier one
            scorer = scorer_with_request()
            start = 0
            for size in chunks:
                scorer.plan_step([BatchRow("r", 0, size, start)])
                observed = seen if size == chunks[0] else NUM_LAYERS
                for layer in range(observed):
                    scorer.observe(layer, torch.randn(size, 2 * HEADS, HEAD_SIZE), read_keys)
                scorer.end_step()
                start += size
                if "r" not in scorer.pending:
                    break
            assert scorer.skipped == {"r": "incomplete_capture"}, (seen, chunks)
            assert "r" not in scorer.selections and not scorer.planned
