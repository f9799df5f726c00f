"""`vllm serve MODEL --speculative-config std` with the OpenAI client: same answers, drafts on /metrics."""

import base64
import re
from pathlib import Path

import pytest
import requests
from helpers import served
from openai import OpenAI

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.video import synthetic_frames, write_mp4

COMMON = ("--dtype", "float32", "--max-model-len", "8192", "--seed", "0")


@pytest.fixture(scope="module")
def video_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = write_mp4(synthetic_frames(32, 224, 224, seed=3), tmp_path_factory.mktemp("video") / "v.mp4")
    return "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _ask(url: str, video_url: str) -> list[str]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    answers = []
    for question in ("What happens in the video?", "Describe the last frame."):
        reply = client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": video_url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            max_tokens=32,
            temperature=0.0,
        )
        answers.append(reply.choices[0].message.content)
    return answers


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, flags=re.M))


def test_std_server_answers_like_plain_server(video_url: str) -> None:
    model = str(tiny_model("qwen2_vl"))
    with served(model, *COMMON) as (url, _):
        expected = _ask(url, video_url)
    with served(model, *COMMON, "--speculative-config", "std") as (url, log):
        got = _ask(url, video_url)
        metrics = requests.get(f"{url}/metrics", timeout=10).text

    assert got == expected
    assert all(len(a) > 10 for a in got)
    assert _metric(metrics, "vllm:spec_decode_num_drafts_total") > 0
    assert _metric(metrics, "vllm:spec_decode_num_accepted_tokens_total") > 0
    assert any("STD on: gamma=6 top_k=1024" in line for line in log)


def test_bad_std_config_stops_serve_with_one_line() -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("vllm")
    spec = '{"method": "std", "num_speculative_tokens": 0}'
    out = subprocess.run(
        [exe, "serve", str(tiny_model("qwen2_vl")), "--speculative-config", spec],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    error = out.stderr.strip().splitlines()[-1]
    assert "speculative_config.num_speculative_tokens" in error and "1 to 32" in error
    assert "Traceback" not in out.stderr
