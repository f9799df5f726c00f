"""Under load, STD drops no request and changes no answer (slow: `bash scripts/test.sh --slow`).

A plain and an STD `vllm serve` (tiny Qwen2-VL; gamma 4, K 256 visual tokens) on 127.0.0.1. WAVES waves of
CONCURRENCY concurrent OpenAI chat requests go to the STD server, mixing long videos (2k visual tokens),
videos (1k), images, text, streamed and not; every CANCEL_EVERY-th request is a stream closed after a
few chunks. The plain server gets the same requests that are not cancelled, as concurrently. Each wave
has its own media, so the prefix cache does not spare the drafter. Checked: every request that is not
cancelled completes, with the plain server's greedy answer; `/health` answers 200 throughout (polled
every half second); STD's metrics count every visual request as scored and every text request as
skipped; the STD server's resident memory (all its processes) does not grow from the second wave to the
last (the first wave warms caches). The figures are written to `load-report.json` in pytest's tmp dir.
"""

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from helpers import (
    Server,
    image_data_url,
    image_part,
    metric_sum,
    served,
    user,
    video_data_url,
    video_part,
)
from openai import AsyncOpenAI

from vllm_std.fixtures.models import tiny_model

pytestmark = pytest.mark.slow

WAVES = 3
CONCURRENCY = 64
CANCEL_EVERY = 8
MAX_TOKENS = 24
STD_SPEC = json.dumps({"method": "std", "num_speculative_tokens": 4, "top_k": 256, "adaptive": False})
MEMORY_GROWTH_LIMIT = 256 * 2**20
"""Bytes the STD server may grow from the second wave to the last: far below what keeping per-request state
would cost (a request's keys of every layer are ~50 KiB per visual token on this fixture), far above
allocator noise."""
KINDS = ("long-video", "video", "image", "text")


def _request(media_dir: Path, wave: int, index: int) -> dict[str, Any]:
    """The index-th request of a wave: its kind, messages, and whether it is streamed and cancelled."""
    kind = KINDS[index % len(KINDS)]
    seed = 1000 * (wave + 1) + index
    parts = {
        "long-video": lambda: [video_part(video_data_url(media_dir, seed, frames=64))],
        "video": lambda: [video_part(video_data_url(media_dir, seed))],
        "image": lambda: [image_part(image_data_url(seed, side=448))],
        "text": lambda: [],
    }[kind]()
    cancel = index % CANCEL_EVERY == CANCEL_EVERY - 1
    return {
        "kind": kind,
        "messages": user(*parts, text=f"Question {index}: what do you see?"),
        "stream": cancel or index % 2 == 1,
        "cancel": cancel,
    }


async def _ask(client: AsyncOpenAI, model: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """The answer's text and finish reason; None for a request cancelled after its third chunk."""
    kwargs = {"model": model, "messages": request["messages"], "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if not request["stream"]:
        choice = (await client.chat.completions.create(**kwargs)).choices[0]
        return {"text": choice.message.content, "finish_reason": choice.finish_reason}
    stream = await client.chat.completions.create(**kwargs, stream=True)
    text, finish, chunks = [], None, 0
    async for chunk in stream:
        chunks += 1
        if request["cancel"] and chunks == 3:
            await stream.close()
            return None
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {"text": "".join(text), "finish_reason": finish}


async def _wave(server: Server, requests_: list[dict[str, Any]]) -> list[Any]:
    """All requests at once; exceptions are returned, not raised, so that one failure hides no other."""
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900) as c:
        model = (await c.models.list()).data[0].id
        return await asyncio.gather(*(_ask(c, model, r) for r in requests_), return_exceptions=True)


def _resident_bytes(server: Server) -> int:
    process = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


class HealthPoller(threading.Thread):
    """GETs `/health` every half second until stopped; keeps every answer that was not 200."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.failures, self.polls = server, [], 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            self.polls += 1
            try:
                status = requests.get(f"{self.server.url}/health", timeout=10).status_code
            except requests.RequestException as error:
                status = repr(error)
            if status != 200:
                self.failures.append((time.monotonic(), status))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


def test_waves_of_concurrent_requests(media_dir: Path, tmp_path: Path) -> None:
    model = str(tiny_model("qwen2_vl"))
    common = (
        *("--dtype", "float32", "--max-model-len", "8192", "--seed", "0"),
        *("--limit-mm-per-prompt", json.dumps({"video": 1, "image": 1})),
        *("--mm-processor-cache-gb", "0"),  # media differ per request: a cache would only grow
    )
    report: dict[str, Any] = {"waves": []}
    with served(model, common, [*common, "--speculative-config", STD_SPEC]) as (plain, std):
        poller = HealthPoller(std)
        poller.start()
        sent = {kind: 0 for kind in KINDS}
        for wave in range(WAVES):
            batch = [_request(media_dir, wave, i) for i in range(CONCURRENCY)]
            kept = [r for r in batch if not r["cancel"]]
            start = time.monotonic()

            async def both(batch: list[dict[str, Any]] = batch, kept: list[dict[str, Any]] = kept) -> Any:
                return await asyncio.gather(_wave(std, batch), _wave(plain, kept))

            std_answers, plain_answers = asyncio.run(both())
            answers = list(zip(batch, std_answers, strict=True))
            failed = [(r["kind"], a) for r, a in answers if isinstance(a, Exception)]
            assert not failed, failed
            completed = [a for r, a in answers if not r["cancel"]]
            assert all(a is not None for a in completed)
            differing = [
                (r["kind"], r["stream"], a, p)
                for r, a, p in zip(kept, completed, plain_answers, strict=True)
                if a != p
            ]
            for request in batch:
                sent[request["kind"]] += 1
            report["waves"].append(
                {
                    "sent": len(batch),
                    "cancelled": len(batch) - len(kept),
                    "completed": len(completed),
                    "identical": len(completed) - len(differing),
                    "seconds": round(time.monotonic() - start, 1),
                    "std_server_resident_mib": round(_resident_bytes(std) / 2**20, 1),
                }
            )
            assert not differing, differing[:3]
        poller.stopped.set()
        poller.join()
        page = requests.get(f"{std.url}/metrics", timeout=10).text
        report |= {
            "health_polls": poller.polls,
            "health_failures": poller.failures,
            "std_requests_scored": metric_sum(page, "vllm:std_requests_scored_total"),
            "std_requests_skipped": metric_sum(page, "vllm:std_requests_skipped_total"),
            "accepted_draft_tokens": metric_sum(page, "vllm:spec_decode_num_accepted_tokens_total"),
        }
    (tmp_path / "load-report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    assert poller.polls > 0 and not poller.failures
    # Cancelled streams were cancelled after their first chunks, so after their prefill: scored too.
    assert report["std_requests_scored"] == WAVES * CONCURRENCY - sent["text"]
    assert report["std_requests_skipped"] == sent["text"]
    assert report["accepted_draft_tokens"] > 0
    resident = [w["std_server_resident_mib"] for w in report["waves"]]
    assert (resident[-1] - resident[1]) * 2**20 < MEMORY_GROWTH_LIMIT, resident
