"""Engines, requests and vLLM's own counters for the end-to-end tests."""

import dataclasses
import gc
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import synthetic_image, vllm_request
from vllm_std.fixtures.video import synthetic_frames
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


@contextmanager
def engine(
    family: str, dtype: str = "float32", speculative_config: Any = None, **kwargs: Any
) -> Iterator[LLM]:
    llm = LLM(
        str(tiny_model(family)),
        dtype=dtype,
        max_model_len=kwargs.pop("max_model_len", 8192),
        limit_mm_per_prompt=kwargs.pop("limit_mm_per_prompt", {"video": 1, "image": 1}),
        speculative_config=speculative_config,
        seed=0,
        disable_log_stats=False,
        **kwargs,
    )
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def token_ids(outputs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _report(worker: Any) -> dict[str, Any]:
    scorer = worker.model_runner.drafter.scorer
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
    }


def drafter_reports(llm: LLM) -> list[dict[str, Any]]:
    """What the STD drafter of each worker (TP rank order) knows: recent selections, skip reasons, live
    state."""
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
