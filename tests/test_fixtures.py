"""The tiny checkpoints and synthetic videos: deterministic, loadable by transformers, sized as predicted."""

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vllm_std.fixtures.models import FAMILIES, TinyModelSpec, build_tiny_model, tiny_model
from vllm_std.fixtures.prompts import chat_prompt
from vllm_std.fixtures.video import (
    frames_for_qwen_vl_tokens,
    qwen_vl_video_tokens,
    synthetic_frames,
    write_mp4,
)


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path: Path) -> None:
    spec = TinyModelSpec(num_layers=2)
    a = build_tiny_model(spec, tmp_path / "a")
    b = build_tiny_model(spec, tmp_path / "b")
    assert _sha(a) == _sha(b)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert _sha(build_tiny_model(TinyModelSpec(num_layers=2, seed=1), tmp_path / "c")) != _sha(a)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_in_transformers(family: str) -> None:
    path = tiny_model(family)
    _, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in _.parameters()) < 10_000_000


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_varied(family: str) -> None:
    """64 greedy tokens must not collapse to a few ids, or identical-output tests would prove little."""
    path = tiny_model(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(text=[chat_prompt(path, "Describe the red car.")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 64
    assert len(set(new)) >= 32, new


@pytest.mark.parametrize(("frames", "size"), [(2, 56), (8, 224), (16, 112), (4, 448)])
def test_qwen_vl_placeholder_count_matches_processor(qwen2_vl_path: str, frames: int, size: int) -> None:
    processor = AutoProcessor.from_pretrained(qwen2_vl_path)
    video = synthetic_frames(frames, size, size)
    inputs = processor(
        text=[chat_prompt(qwen2_vl_path, "Q?", num_videos=1)], videos=[video], return_tensors="pt"
    )
    placeholders = int((inputs["input_ids"] == processor.video_token_id).sum())
    assert placeholders == qwen_vl_video_tokens(frames, size, size)


def test_frames_for_token_budget() -> None:
    for tokens in (300, 1024, 16_384, 65_536):
        n = frames_for_qwen_vl_tokens(tokens, 448, 448)
        assert qwen_vl_video_tokens(n, 448, 448) >= tokens > qwen_vl_video_tokens(n - 2, 448, 448)


def test_synthetic_frames_are_seeded_and_moving() -> None:
    a, b = synthetic_frames(6, 56, 84, seed=3), synthetic_frames(6, 56, 84, seed=3)
    assert a.shape == (6, 56, 84, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, synthetic_frames(6, 56, 84, seed=4))


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = synthetic_frames(12, 112, 140)
    path = write_mp4(frames, tmp_path / "v.mp4")
    cap = cv2.VideoCapture(str(path))
    read = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        read.append(frame)
    assert len(read) == 12 and read[0].shape == (112, 140, 3)
