"""The fixtures run in vLLM (offline `LLM`) and give the same greedy tokens as transformers."""

import gc

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames

MAX_TOKENS = 24
QUESTION = "What happens in the video?"


@pytest.fixture(
    scope="module",
    params=[
        "qwen2_vl",
        pytest.param("qwen2_5_vl", marks=pytest.mark.slow),
        pytest.param("llava_onevision", marks=pytest.mark.slow),
    ],
)
def engine(request):
    path = str(tiny_model(request.param))
    llm = LLM(path, dtype="float32", max_model_len=4096, limit_mm_per_prompt={"video": 1, "image": 1}, seed=0)
    yield path, llm
    del llm
    gc.collect()


def _hf_greedy(path: str, request: dict) -> list[int]:
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    video = request.get("multi_modal_data", {}).get("video")
    inputs = processor(
        text=[request["prompt"]],
        videos=[video[0]] if video is not None else None,
        video_metadata=[video[1]] if video is not None else None,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["text", "video"])
def test_vllm_matches_transformers_greedy(engine, kind: str, request) -> None:
    path, llm = engine
    if kind == "video" and "qwen2_5_vl" in path:
        # Seen on vLLM 0.32 / transformers 5.19: the two disagree from the first token on the tiny
        # Qwen2.5-VL video path (text matches). Strict, so this fails once they agree again.
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="vLLM and transformers differ on Qwen2.5-VL video")
        )
    videos = [synthetic_frames(8, 224, 224)] if kind == "video" else []
    prompt = vllm_request(path, QUESTION if videos else "Tell me about the red car.", videos=videos)
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
    output = llm.generate([prompt], params)[0]
    assert list(output.outputs[0].token_ids) == _hf_greedy(path, prompt)


def test_video_placeholders_match_processor(engine) -> None:
    path, llm = engine
    video = synthetic_frames(6, 112, 168, seed=5)
    request = vllm_request(path, QUESTION, videos=[video])
    processor = AutoProcessor.from_pretrained(path)
    hf_ids = processor(
        text=[request["prompt"]], videos=[video], video_metadata=[request["multi_modal_data"]["video"][1]]
    )["input_ids"][0]
    out = llm.generate([request], SamplingParams(max_tokens=1))[0]
    token = processor.video_token_id
    assert list(out.prompt_token_ids).count(token) == hf_ids.count(token) > 20
