"""`vllm-std bench --server LABEL=URL`: the bench's workloads sent to running `vllm serve` instances.

For users whose model only runs as a server (a GPU deployment, a real checkpoint): each server is one
method, started by the user with the settings to compare (say one without speculation, labelled `none`, and
one with STD). A batch goes out as concurrent chat requests at the bench's temperature (greedy by default),
`ignore_eos`, the video as an mp4 data URL; the figures come from the server's `/metrics`, differenced
around the batch exactly as an offline engine's (so a server must serve nothing else during the run). A
server must decode every frame it is sent (`--media-io-kwargs '{"video": {"num_frames": -1}}'`; vLLM's
default keeps 32), or the workloads would not be the ones asked for: the bench stops at the first batch that
shows it.
"""

import argparse
import base64
import json
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vllm_std.bench.engines import Batch, VideoQuestion, delta, figures, labelled

FINISHED = "vllm:request_success"
EVERY_FRAME = json.dumps({"video": {"num_frames": -1}})
"""The server setting that decodes every frame of a video (vLLM's default keeps 32)."""


def parse_server(text: str) -> tuple[str, str]:
    """`LABEL=URL` (argparse type of `--server`)."""
    label, sep, url = text.partition("=")
    if not sep or not label or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected LABEL=URL (say none=http://127.0.0.1:8000), got {text!r}")
    return label, url.rstrip("/")


def scrape(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """A server's `/metrics`, shaped as `vllm_std.bench.engines.snapshot` shapes an offline engine's:
    counters summed over labels (and `BY_LABEL`'s also by their label), histograms as `(count, sum)`, the
    per-position acceptance counter as a list."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if family.type == "histogram":
            count = sum(s.value for s in samples if s.name.endswith("_count"))
            out[family.name] = (count, sum(s.value for s in samples if s.name.endswith("_sum")))
        elif family.type == "counter" and any("position" in s.labels for s in samples):
            by_position: dict[int, float] = {}
            for s in samples:
                position = int(s.labels["position"])
                by_position[position] = by_position.get(position, 0.0) + s.value
            out[family.name] = [by_position.get(i, 0.0) for i in range(max(by_position) + 1)]
        elif family.type == "counter":
            out[family.name] = sum(s.value for s in samples)
            for s in samples:
                if (name := labelled(family.name, s.labels)) is not None:
                    out[name] = out.get(name, 0.0) + s.value
    return out


def served_model(url: str) -> str:
    """The model a server serves (its `/v1/models`): a checkpoint path or hub id."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (OSError, ValueError, LookupError) as e:
        raise SystemExit(f"vllm-std bench: no vLLM server answers at {url}: {e}") from None


class ServerEngine:
    """A running OpenAI-compatible vLLM server as one of the bench's engines, asked at `temperature`."""

    def __init__(self, label: str, url: str, timeout: float = 3600.0, temperature: float = 0.0) -> None:
        from openai import OpenAI

        self.label, self.url, self.temperature = label, url, temperature
        self.model = served_model(url)
        self._client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=timeout, max_retries=0)
        self._media = tempfile.TemporaryDirectory(prefix="vllm-std-bench-")

    def sample(self, batch: Batch, output_len: int, turns: int = 1) -> list[dict[str, Any]]:
        """The batch's conversations, turn by turn (each turn's messages repeat the earlier ones)."""
        urls = [self._video_url(q, i) for i, q in enumerate(batch)]
        conversations: list[list[dict[str, Any]]] = [[] for _ in batch]
        samples = []
        for turn in range(turns):
            for q, url, messages in zip(batch, urls, conversations, strict=True):
                text = {"type": "text", "text": q.question if turn == 0 else q.follow_ups[turn - 1]}
                video = [{"type": "video_url", "video_url": {"url": url}}] if turn == 0 else []
                messages.append({"role": "user", "content": [*video, text]})
            samples.append(self._turn(batch, conversations, output_len))
            for messages, sample in zip(conversations, samples[-1]["answers"], strict=True):
                messages.append({"role": "assistant", "content": sample})
        for s in samples:
            del s["answers"]
        return samples

    def _turn(
        self, batch: Batch, conversations: list[list[dict[str, Any]]], output_len: int
    ) -> dict[str, Any]:
        before = scrape(self.url)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(batch)) as pool:
            asked = zip(conversations, batch, strict=True)
            responses = list(pool.map(lambda mq: self._ask(mq[0], mq[1].output_len(output_len)), asked))
        wall = time.perf_counter() - start
        for question, response in zip(batch, responses, strict=True):
            if response.usage.prompt_tokens < 0.9 * question.prompt_tokens:
                raise SystemExit(
                    f"vllm-std bench: server '{self.label}' made {response.usage.prompt_tokens} prompt "
                    f"tokens where the model makes {question.prompt_tokens}: it decodes fewer frames than "
                    f"it is sent; start it with --media-io-kwargs '{EVERY_FRAME}'"
                )
        return {
            "token_ids": [r.choices[0].token_ids for r in responses],
            "prompt_tokens": [r.usage.prompt_tokens for r in responses],
            "wall_seconds": wall,
            "answers": [r.choices[0].message.content for r in responses],
            **figures(self._settled(before, len(batch)), before),
        }

    def _settled(self, before: dict[str, Any], finished: int, timeout: float = 30.0) -> dict[str, Any]:
        """The metrics once they count the batch's requests as finished: vLLM records them in the same
        event-loop turn that hands out the responses, usually but not always before a scrape can run."""
        deadline = time.monotonic() + timeout
        while True:
            after = scrape(self.url)
            if (delta(after, before, FINISHED) or 0) >= finished or time.monotonic() > deadline:
                return after
            time.sleep(0.05)

    def _video_url(self, question: VideoQuestion, index: int) -> str:
        from vllm_std.fixtures.prompts import VIDEO_FPS
        from vllm_std.fixtures.video import write_mp4

        # At the frame rate offline requests state, so that a processor that samples by time keeps the same.
        path = write_mp4(question.frames, Path(self._media.name) / f"{index}.mp4", fps=VIDEO_FPS)
        return f"data:video/mp4;base64,{base64.b64encode(path.read_bytes()).decode()}"

    def _ask(self, messages: list[dict[str, Any]], output_len: int) -> Any:
        return self._client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=output_len,
            temperature=self.temperature,  # no seed, as offline (`vllm_std.bench.engines.sample`)
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )

    def close(self) -> None:
        self._client.close()
        self._media.cleanup()
