"""Engines, requests and vLLM's own counters for the end-to-end tests."""

import base64
import dataclasses
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import cv2
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams

from vllm_std.bench.engines import engine as offline_engine
from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import synthetic_image, vllm_request
from vllm_std.fixtures.video import synthetic_frames, write_mp4
from vllm_std.selection import candidate_blocks, visual_mask

BLOCK_SIZE = 128  # vLLM's CPU default KV block size

# Frames per test video: about 1k visual tokens (8 KV blocks of 128) on either fixture family.
VIDEO_FRAMES = {"qwen2_vl": 32, "qwen2_5_vl": 32, "llava_onevision": 64}


def mixed_requests(family: str) -> list[dict[str, Any]]:
    """A batch mixing two videos, an image, a video with an image, and a text-only prompt."""
    path = str(tiny_model(family))
    frames = VIDEO_FRAMES[family]
    # vLLM 0.32's LLaVA-OneVision fails on a batch whose videos differ in length ("Expected multimodal
    # embeddings to be a sequence of 2D tensors"), without speculation too: keep its videos equal.
    short = frames // 2 if family.startswith("qwen") else frames
    image_size = 448 if family.startswith("qwen") else 112
    return [
        vllm_request(path, "What happens in the video?", videos=[synthetic_frames(frames, 224, 224, seed=1)]),
        vllm_request(path, "Describe the first frame.", videos=[synthetic_frames(frames, 224, 224, seed=2)]),
        vllm_request(
            path, "What is in the picture?", images=[synthetic_image(image_size, image_size, seed=3)]
        ),
        vllm_request(
            path,
            "Does the picture appear in the video?",
            videos=[synthetic_frames(short, 224, 224, seed=4)],
            images=[synthetic_image(image_size, image_size, seed=5)],
        ),
        vllm_request(path, "Tell me about the red car."),
    ]


GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def engine(
    family: str, dtype: str = "float32", speculative_config: Any = None, **kwargs: Any
) -> AbstractContextManager[LLM]:
    """An offline engine on a tiny fixture (a context manager), with the tests' defaults."""
    return offline_engine(
        str(tiny_model(family)),
        dtype=dtype,
        max_model_len=kwargs.pop("max_model_len", 8192),
        limit_mm_per_prompt=kwargs.pop("limit_mm_per_prompt", {"video": 1, "image": 1}),
        speculative_config=speculative_config,
        **kwargs,
    )


def token_ids(outputs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _report(worker: Any) -> dict[str, Any]:
    drafter = worker.model_runner.drafter
    scorer = drafter.scorer
    return {
        "history": [
            {
                "req_id": r.req_id,
                "block_scores": r.block_scores.tolist(),
                "kept": r.selection.kept_prompt_blocks.tolist(),
                "num_candidate_blocks": r.selection.num_candidate_blocks,
                "num_visual_tokens": r.selection.num_visual_tokens,
            }
            for r in scorer.history
        ],
        "skip_counts": dict(scorer.skip_counts),
        "live": sorted([*scorer.pending, *scorer.selections, *scorer.skipped]),
        "plain_step_overhead": drafter.rounds.overhead.fixed,
    }


def drafter_reports(llm: LLM) -> list[dict[str, Any]]:
    """What the STD drafter of each worker (TP rank order) knows: recent selections, skip reasons, live
    state, the overhead it measured for a step without drafts."""
    return llm.collective_rpc(_report)


def drafter_report(llm: LLM) -> dict[str, Any]:
    """The drafter report of TP rank 0 (the only worker without tensor parallelism)."""
    return drafter_reports(llm)[0]


@dataclasses.dataclass
class Server:
    """A `vllm serve` process started by `served`: its base URL, its log lines (filled by a reader thread) and
    the process; after `served` exits, `returncode` is its exit status and `killed` says whether it had to be
    killed (it did not stop within a minute of SIGTERM)."""

    url: str
    log: list[str]
    proc: subprocess.Popen
    reader: threading.Thread | None = None
    killed: bool = False

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


def start_server(model: str, *args: str) -> Server:
    """Starts `vllm serve MODEL ARGS` on a free port of 127.0.0.1; does not wait for it (`wait_healthy`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    return Server(f"http://127.0.0.1:{port}", log, proc, reader)


def wait_healthy(server: Server, startup_timeout: float = 420.0) -> None:
    """Polls `/health` until it answers 200; raises, with the log tail, if the process exits or times out."""
    import requests

    deadline = time.monotonic() + startup_timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError("vllm serve exited during start-up:\n" + "".join(server.log[-40:]))
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("vllm serve did not become healthy:\n" + "".join(server.log[-40:]))
        time.sleep(1)


def stop_server(server: Server, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds (recorded in `server.killed`)."""
    if server.proc.poll() is None:
        server.proc.terminate()
    try:
        server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.killed = True
        server.proc.kill()
        server.proc.wait()
    if server.reader is not None:
        server.reader.join(timeout=10)  # the last log lines (a child could hold the pipe: do not hang)


def serve_arg_parser() -> Any:
    """`vllm serve`'s own argument parser, built as vLLM's CLI builds it. Building it loads the general
    plugins, so STD's `--speculative-config` type is installed; `parse_args([model, *flags])` checks a
    command line the way `vllm serve` does before it starts anything."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, split as the shell splits words and at `;`, `&&`, `||`,
    `|` and `&` (no expansion)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in {";", "&&", "||", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def eager_block_scores(
    path: str, request: dict, heads: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer block scores from transformers' eager attention, and the candidate-block mask. `heads`
    restricts the sum to some query heads: those a tensor-parallel rank serves."""
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    processor = AutoProcessor.from_pretrained(path)
    frames, metadata = request["multi_modal_data"]["video"]
    inputs = processor(
        text=[request["prompt"]], videos=[frames], video_metadata=[metadata], return_tensors="pt"
    )
    ids = inputs["input_ids"][0]
    is_visual = ids == processor.video_token_id
    text_start = int(is_visual.nonzero().max()) + 1
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    num_blocks = -(-ids.shape[0] // BLOCK_SIZE)
    blocks = torch.arange(ids.shape[0]) // BLOCK_SIZE
    scores = []
    for probs in attentions:  # [1, H, T, T]
        mass = probs[0, heads, text_start:, :].sum(dim=0).mean(dim=0)  # sum heads, mean text queries -> [T]
        scores.append(torch.zeros(num_blocks).index_add_(0, blocks, mass))
    spans = [(int(is_visual.nonzero().min()), int(is_visual.sum()))]
    return torch.stack(scores), candidate_blocks(visual_mask(ids.shape[0], spans), BLOCK_SIZE)


# --- media and server logs for the OpenAI-server tests ----------------------------------------------

# 32 frames of 224x224 at 2 fps: vLLM's video loader keeps all 32 frames (Qwen2-VL samples 2 fps), which
# gives 16 * 8 * 8 = 1024 visual tokens, 8 KV blocks of which the drafter keeps 2 per layer.
MP4_FRAMES, MP4_FPS = 32, 2.0
# 896x896 images: 32 * 32 = 1024 visual tokens, sparse too.
IMAGE_SIDE = 896


def video_file(media_dir: Path, seed: int, frames: int = MP4_FRAMES) -> Path:
    """An mp4 of `frames` synthetic 224x224 frames at MP4_FPS (written once per seed and length)."""
    path = media_dir / f"video-{seed}-{frames}.mp4"
    return (
        path if path.exists() else write_mp4(synthetic_frames(frames, 224, 224, seed=seed), path, fps=MP4_FPS)
    )


def video_data_url(media_dir: Path, seed: int, frames: int = MP4_FRAMES) -> str:
    data = base64.b64encode(video_file(media_dir, seed, frames).read_bytes()).decode()
    return f"data:video/mp4;base64,{data}"


def video_file_url(media_dir: Path, seed: int) -> str:
    return video_file(media_dir, seed).resolve().as_uri()


def image_data_url(seed: int, fmt: str = "png", side: int = IMAGE_SIDE) -> str:
    rgb = synthetic_image(side, side, seed=seed)
    ok, encoded = cv2.imencode(f".{fmt}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return f"data:image/{fmt};base64,{base64.b64encode(encoded.tobytes()).decode()}"


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any], text: str = "What happens in the video?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def unexpected_tracebacks(log: list[str]) -> list[str]:
    """Log lines saying "Traceback", less vLLM 0.32's own shutdown race.

    That race: on SIGTERM, `AsyncLLM.shutdown` (vllm/v1/engine/async_llm.py:296-308) first shuts the engine
    client down, whose clean-up cancels the output-socket task (vllm/v1/engine/core_client.py:532-545); the
    task then queues an `EngineDeadError` (core_client.py:1221), and the output handler, unless it has
    been cancelled first, logs it with a traceback ("AsyncLLM output_handler failed", async_llm.py:906). It
    is a race between the event loop and the shutdown thread, nothing to do with STD; only that block, and
    only after the shutdown was triggered, is left out.
    """
    text = "".join(log)
    before, trigger, after = text.partition("[shutdown] API server: shutdown triggered")
    race = re.compile(r"^.*\bERROR\b.*\[async_llm\.py:\d+\].*\n?", flags=re.M)
    block = "".join(race.findall(after))
    if "AsyncLLM output_handler failed" in block and "EngineDeadError" in block:
        after = race.sub("", after)
    return [line for line in (before + trigger + after).splitlines() if "Traceback" in line]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the series of `name` on a `/metrics` page whose labels include those given (0 if none)."""
    total = 0.0
    for found_labels, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, flags=re.M):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found_labels))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@contextmanager
def served(model: str, *server_args: list[str] | tuple[str, ...]) -> Iterator[list[Server]]:
    """`vllm serve MODEL ARGS` for each ARGS, started together and healthy; after the block each must exit
    by itself within a minute of SIGTERM, with status 0 and no traceback (vLLM's shutdown race aside)."""
    started: list[Server] = []
    try:
        started = [start_server(model, *args) for args in server_args]
        for server in started:
            wait_healthy(server)
        yield started
    finally:
        for server in started:
            stop_server(server)
    for server, args in zip(started, server_args, strict=True):
        name, tail = " ".join(args), "".join(server.log[-30:])
        assert not server.killed, f"server {name} did not exit within 60 s of SIGTERM:\n{tail}"
        assert server.returncode == 0, f"server {name} exited with {server.returncode}:\n{tail}"
        assert not unexpected_tracebacks(server.log), f"server {name} logged a traceback:\n" + "".join(
            server.log
        )
