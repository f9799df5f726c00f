"""`vllm-std bench`: STD against no speculation, vLLM's ngram and suffix decoding and baseline selections, on
the same requests.

Each method has its own offline engine (`vllm_std.bench_engines`, one process each); by default all are alive
at once and take turns on every batch, so that they share the machine's drift. A workload is a number of
visual tokens and a batch size; its batches are the same for every method, each with its own synthetic
videos (so vLLM's prefix cache spares no prefill). Figures come from vLLM's own metrics (per-request time per
output token, spec-decode counters) and STD's (drafting time), differenced around each batch. From them the
run fits the cost model (`vllm_std.cost_model`): dense one-token steps from the runs without speculation,
STD's draft and verify steps from its runs, and sets the model's predicted speedup beside each measured one.
Outputs, in `--out`: `bench.json` (all figures and the environment), `bench.md` (a table shaped like the
paper's Table 1) and PNG plots (`vllm_std.bench_report`)."""

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vllm_std.bench_engines import Batch, Engine, EngineProcess, VideoQuestion, engine_processes
from vllm_std.bench_server import ServerEngine, parse_server, served_model
from vllm_std.cost_model import CostModel, fit_step_cost, fit_verify_cost
from vllm_std.gamma_policy import REASONS


@dataclasses.dataclass(frozen=True)
class Method:
    """A speculative config under a readable label (`None`: no speculation)."""

    label: str
    kind: str  # "none", "std", "adaptive", "ngram", "suffix", "streaming", "random"; "server": a `--server`
    gamma: int = 0  # for "adaptive", the most drafted
    top_k: int = 0

    def speculative_config(self) -> dict[str, Any] | None:
        if self.kind == "none":
            return None
        if self.kind == "ngram":
            return {"method": "ngram", "num_speculative_tokens": self.gamma, "prompt_lookup_max": 4}
        if self.kind == "suffix":
            return {"method": "suffix", "num_speculative_tokens": self.gamma}
        selection = self.kind if self.kind in ("streaming", "random") else "attention"
        return {
            "method": "std",
            "num_speculative_tokens": self.gamma,
            "top_k": self.top_k,
            "selection": selection,
            "adaptive": self.kind == "adaptive",
        }


@dataclasses.dataclass(frozen=True)
class Workload:
    visual_tokens: int
    batch: int

    @property
    def label(self) -> str:
        return (
            f"{self.visual_tokens // 1024}k x{self.batch}"
            if self.visual_tokens >= 1024
            else (f"{self.visual_tokens} x{self.batch}")
        )


METHODS = ["none", "std", "adaptive", "ngram", "suffix", "streaming", "random"]


def suffix_decoding_installed() -> bool:
    """Whether vLLM's suffix decoding can run: it imports Arctic Inference's suffix tree."""
    return importlib.util.find_spec("arctic_inference") is not None


def methods(kinds: list[str], gammas: list[int], top_ks: list[int]) -> list[Method]:
    """Every method to run: STD (fixed gamma) at each gamma with the first K and at each K with the first
    gamma; the baselines at the first gamma and K; adaptive STD up to the largest gamma, at the first K."""
    gamma, k = gammas[0], top_ks[0]
    out = [Method("none", "none")] if "none" in kinds else []
    if "adaptive" in kinds:
        out.append(Method(f"adaptive g<={max(gammas)} K{k}", "adaptive", max(gammas), k))
    if "std" in kinds:
        sweep = dict.fromkeys([(g, k) for g in gammas] + [(gamma, kk) for kk in top_ks])
        out += [Method(f"std g{g} K{kk}", "std", g, kk) for g, kk in sweep]
    out += [Method(f"{kind} g{gamma}", kind, gamma) for kind in ("ngram", "suffix") if kind in kinds]
    baselines = [kind for kind in ("streaming", "random") if kind in kinds]
    out += [Method(f"{kind} g{gamma} K{k}", kind, gamma, k) for kind in baselines]
    if "none" in kinds and len(out) > 1:
        # Adaptive STD and no speculation in a second engine each, last and in reverse order: how far two
        # identical engines differ on this machine (the run's noise), how far adaptive STD's timing-driven
        # choices differ between engines, and, run one after another, (none, adaptive, ..., adaptive, none)
        # pooled per method cancels a steady drift of the machine.
        out += [dataclasses.replace(m, label=f"{m.label} again") for m in out if m.kind == "adaptive"]
        out.append(Method("none again", "none"))
    return out


# --- requests ------------------------------------------------------------------------------------------


FrameSource = Callable[[int, int, int, int], np.ndarray]
"""`(num_frames, height, width, seed) -> [num_frames, height, width, 3]` uint8 RGB."""


def file_frames(paths: list[str]) -> FrameSource:
    """Frames from the user's video files (request i reads file i mod n), evenly spaced over the file and
    resized, so that a workload's number of visual tokens is met from real footage."""
    import cv2

    def frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
        capture = cv2.VideoCapture(paths[seed % len(paths)])
        decoded = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            decoded.append(cv2.cvtColor(cv2.resize(frame, (width, height)), cv2.COLOR_BGR2RGB))
        capture.release()
        if not decoded:
            raise SystemExit(f"vllm-std bench: cannot read frames from {paths[seed % len(paths)]}")
        picks = np.linspace(0, len(decoded) - 1, num_frames).round().astype(int)
        return np.stack([decoded[i] for i in picks])

    return frames


class VideoQuestions:
    """A question about a video of about the requested number of visual tokens, synthetic or from files
    (the model's processor decides the exact count; it is measured and reported)."""

    def __init__(self, model: str, question: str, frame_side: int, frames: FrameSource | None = None) -> None:
        from vllm_std.fixtures.prompts import prompt_token_count, vllm_request
        from vllm_std.fixtures.video import synthetic_frames

        self.question, self.side = question, frame_side
        self._frames = frames or synthetic_frames
        probe = [
            prompt_token_count(
                model, vllm_request(model, question, videos=[self._frames(n, frame_side, frame_side, 0)])
            )
            for n in (4, 8)
        ]
        self.tokens_per_frame = (probe[1] - probe[0]) / 4
        self.text_tokens = probe[0] - 4 * self.tokens_per_frame

    def frames_for(self, visual_tokens: int) -> int:
        return max(2, 2 * round(visual_tokens / self.tokens_per_frame / 2))

    def requests(self, workload: Workload, seed: int) -> Batch:
        frames, side = self.frames_for(workload.visual_tokens), self.side
        tokens = round(self.text_tokens + frames * self.tokens_per_frame)
        return [
            VideoQuestion(self.question, self._frames(frames, side, side, seed + i), tokens)
            for i in range(workload.batch)
        ]


class LookupQuestions:
    """The trained sparse fixture's task (`vllm_std.fixtures.sparse`): a video of one visual token per tile
    and a question whose answer sits in one short marked clip; held-out episodes, one per request."""

    tokens_per_frame = 0.5

    def __init__(self, model: str) -> None:
        from vllm_std.fixtures.prompts import prompt_token_count
        from vllm_std.fixtures.sparse import sparse_request

        self.text_tokens = prompt_token_count(model, sparse_request(model, 64)[0]) - 64

    def requests(self, workload: Workload, seed: int) -> Batch:
        from vllm_std.fixtures.sparse import episode_question, sparse_episode

        episodes = [sparse_episode(workload.visual_tokens, seed + i) for i in range(workload.batch)]
        tokens = round(self.text_tokens + workload.visual_tokens)
        return [VideoQuestion(*episode_question(ep), tokens) for ep in episodes]


# --- measuring ---------------------------------------------------------------------------------------


def _pooled(values: list[Any]) -> Any:
    """Sums one metric's differences over batches: numbers, `(count, sum)` pairs, per-position lists."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], (tuple, list)):
        return type(present[0])(map(sum, zip(*present, strict=True)))
    return sum(present)


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One method on one workload, its batches (`vllm_std.bench_engines.sample`) pooled: outputs, time per
    output token, acceptance and STD's drafting time."""
    concatenated = ("token_ids", "prompt_tokens")
    pooled = {
        key: _pooled([s[key] for s in samples])
        for key in samples[0]
        if key not in (*concatenated, "gamma_decisions")
    }
    token_ids = [ids for s in samples for ids in s["token_ids"]]
    prompt_tokens = [n for s in samples for n in s["prompt_tokens"]]
    tpot, decode = pooled["tpot"], pooled["decode"]
    drafts, draft_tokens = pooled["drafts"] or 0, pooled["draft_tokens"] or 0
    accepted = pooled["accepted_tokens"] or 0
    draft_time = pooled["draft_time"] or (0, 0.0)
    chosen = pooled["chosen_gamma"] or (0, 0.0)
    return {
        "token_ids": token_ids,
        "prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "batches": len(samples),
        "wall_seconds": pooled["wall_seconds"],
        "output_tokens_per_second": sum(map(len, token_ids)) / pooled["wall_seconds"],
        "tpot_seconds": tpot[1] / tpot[0],
        # Per batch, in the order run: how far the machine moved between batches (the spread of a ratio).
        "tpot_seconds_by_batch": [s["tpot"][1] / s["tpot"][0] for s in samples],
        "decode_seconds": decode[1] / decode[0],
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "accepted_at": conditional_acceptance([n / drafts for n in pooled["accepted_per_pos"] or []])
        if drafts
        else [],
        "draft_steps": draft_time[0],
        "draft_seconds": draft_time[1],
        "mean_chosen_gamma": chosen[1] / chosen[0] if chosen[0] else None,
        "gamma_decisions": {
            reason: _pooled([s["gamma_decisions"][reason] for s in samples]) for reason in REASONS
        },
    }


def conditional_acceptance(reached: list[float]) -> list[float]:
    """vLLM counts, per position i, the rounds whose first i + 1 drafts were all accepted; the cost model
    wants the chance that draft i + 1 is accepted given drafts 1..i were."""
    previous = [1.0, *reached[:-1]] if reached else []
    return [r / p if p > 0 else 0.0 for r, p in zip(reached, previous, strict=True)]


def pooled_speedups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each method run twice (a `... again` run), its speedup over no speculation with both runs of each
    pooled: time per output token of the two runs without speculation over the method's two, from their
    means over all batches, and the median over batches of the same ratio batch by batch (the same requests
    on all four engines, back to back), which a stall of the machine during one batch does not move. The
    runs go none, method, ..., method again, none again, so a steady drift of the machine cancels. Also, as
    the run's noise, the second engine without speculation against the first (`none again`)."""
    by_label = {(r["method"], r["workload"]): r for r in records}
    out = []
    for r in records:
        workload = r["workload"]
        none = [by_label.get((label, workload)) for label in ("none", "none again")]
        again = by_label.get((f"{r['method']} again", workload))
        if None in none:
            continue
        if r["method"] == "none again":
            base, runs = none[:1], [r]
        elif r["kind"] != "none" and again is not None:
            base, runs = none, [r, again]
        else:
            continue
        by_batch = [
            sum(b) / sum(m)
            for b, m in zip(
                zip(*(x["tpot_seconds_by_batch"] for x in base), strict=True),
                zip(*(x["tpot_seconds_by_batch"] for x in runs), strict=True),
                strict=True,
            )
        ]
        out.append(
            {
                "method": r["method"],
                "workload": workload,
                "speedup_tpot": sum(x["tpot_seconds"] for x in base) / sum(x["tpot_seconds"] for x in runs),
                "speedup_tpot_median": statistics.median(by_batch),
                "speedup_tpot_by_batch": by_batch,
            }
        )
    return out


# --- the cost model from the measurements ---------------------------------------------------------------


def fit_cost_model(records: list[dict[str, Any]], output_len: int) -> CostModel | None:
    """Dense steps from the runs without speculation; draft and verify steps from STD's runs (a step's
    context is the prompt plus half the output; a draft step's, the kept visual tokens plus text)."""
    dense = [r for r in records if r["kind"] == "none"]
    std = [r for r in records if r["kind"] == "std" and r["draft_steps"]]
    if len(dense) < 1 or not std:
        return None
    context = lambda r: r["prompt_tokens"] + output_len / 2  # noqa: E731
    dense_cost = fit_step_cost(
        [r["batch"] for r in dense], [context(r) for r in dense], [r["tpot_seconds"] for r in dense]
    )
    draft_cost = fit_step_cost(
        [r["batch"] for r in std],
        [r["sparse_context"] + output_len / 2 for r in std],
        [r["draft_step_seconds"] for r in std],
    )
    verify_cost = fit_verify_cost(
        [r["batch"] for r in std],
        [context(r) for r in std],
        [r["gamma"] for r in std],
        [r["verify_step_seconds"] for r in std],
    )
    return CostModel(dense_cost, draft_cost, verify_cost)


def step_costs(record: dict[str, Any], gamma: int) -> None:
    """Adds the per-step costs of an STD-family run: drafting time per draft step and the verify step time
    (a drafting step's decode time less its drafting). Drafting steps are counted per engine step, and
    decode time per request; a batch's requests decode in the same steps, so the workload's decode time is
    one request's times the number of batches."""
    steps = record["draft_steps"]
    if not steps:
        return
    decode = record["decode_seconds"] * record["batches"]
    record["draft_step_seconds"] = record["draft_seconds"] / steps / gamma
    record["verify_step_seconds"] = (decode - record["draft_seconds"]) / steps


# --- the command ---------------------------------------------------------------------------------------


_TIMING_ENV = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "OMP_NUM_THREADS",
    "LD_PRELOAD",
)


def environment() -> dict[str, Any]:
    import torch
    import vllm

    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # What decides the timings on a CPU as much as the method: where vLLM binds its OpenMP threads and
        # whether the engine core shares the front end's process (docs/benchmarks.md, "Measuring on a CPU").
        **{name: os.environ.get(name) for name in _TIMING_ENV},
    }


WARM_UP_SEED = 10**6  # plus a round's seed: other videos than any measured batch's


def sample_methods(
    plan: list[Method],
    rounds: list[tuple[Workload, int]],
    start: Callable[[Method], Engine],
    requests: Callable[[Workload, int], Batch],
    output_len: int,
    interleaved: bool,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every method's samples of every round (a workload's batch, by seed), by (method, workload) label;
    before a workload's first round, each engine runs a batch of its shape that is not measured.

    Interleaved, all engines are alive at once and every round's batch runs on each in turn, the order
    reversed every other round (A B C, C B A, ...), so that a drift of the machine's speed falls on every
    method alike; sequential, one engine at a time runs all rounds (models too large to hold one engine per
    method)."""
    groups = [plan] if interleaved else [[m] for m in plan]
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    progress = tqdm(total=len(plan) * len(rounds), desc="batches", unit="batch")
    for group in groups:
        starting = tqdm(group, desc="starting engines", unit="engine", leave=False)
        with engine_processes(start(m) for m in starting) as engines:
            warm: set[Workload] = set()
            for i, (workload, seed) in enumerate(rounds):
                turns = engines if i % 2 == 0 else engines[::-1]
                if workload not in warm:  # first shapes of a batch size and context: not measured
                    warm.add(workload)
                    warm_up = requests(workload, WARM_UP_SEED + seed)
                    for e in turns:
                        e.sample(warm_up, 8)
                batch = requests(workload, seed)
                for e in turns:
                    progress.set_postfix_str(f"{workload.label}: {e.label}")
                    samples.setdefault((e.label, workload.label), []).append(e.sample(batch, output_len))
                    progress.update()
    progress.close()
    return samples


def kv_cache_bytes(model: str, dtype: str, tokens: int) -> int:
    """KV cache bytes for `tokens` tokens of `model` (its text model's layers, KV heads and head size)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if dtype == "auto":
        dtype = str(getattr(text, "torch_dtype", None) or config.torch_dtype or "bfloat16")
    element = torch.empty((), dtype=getattr(torch, dtype.removeprefix("torch."))).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element * tokens


def run(args: argparse.Namespace) -> int:
    from vllm_std.bench_report import write_report

    plan = _plan(args)
    model, videos = _workload_source(args)
    workloads = [Workload(v, b) for v in args.visual_tokens for b in args.batch]
    if args.server:
        urls = dict(args.server)
        start: Callable[[Method], Engine] = lambda m: ServerEngine(m.label, urls[m.label])  # noqa: E731
    else:
        start = _offline_engines(args, model, videos.text_tokens)
    rounds = [
        (workload, 1000 * (i * args.repeats + r))
        for i, workload in enumerate(workloads)
        for r in range(args.repeats)
    ]
    samples = sample_methods(
        plan, rounds, start, videos.requests, args.output_len, interleaved=args.schedule == "interleaved"
    )
    records: list[dict[str, Any]] = []
    reference: dict[str, list[list[int]]] = {}
    for method in plan:
        for workload in workloads:
            record = summarize(samples[method.label, workload.label])
            token_ids = record.pop("token_ids")
            reference.setdefault(workload.label, token_ids)
            record |= dataclasses.asdict(method) | dataclasses.asdict(workload)
            record["method"], record["workload"] = method.label, workload.label
            record["identical_to_no_speculation"] = token_ids == reference[workload.label]
            if method.top_k:
                record["sparse_context"] = (
                    min(method.top_k, workload.visual_tokens)
                    + record["prompt_tokens"]
                    - workload.visual_tokens
                )
            if method.gamma and method.kind != "adaptive":  # adaptive's length varies: no per-step cost
                step_costs(record, method.gamma)
            records.append(record)
    none = {r["workload"]: r for r in records if r["method"] == "none"}
    for r in records:
        if r["workload"] in none:
            r["speedup_tpot"] = none[r["workload"]]["tpot_seconds"] / r["tpot_seconds"]
            r["speedup_tpot_by_batch"] = [
                a / b
                for a, b in zip(
                    none[r["workload"]]["tpot_seconds_by_batch"], r["tpot_seconds_by_batch"], strict=True
                )
            ]
            r["speedup_throughput"] = (
                r["output_tokens_per_second"] / none[r["workload"]]["output_tokens_per_second"]
            )
    pooled = pooled_speedups(records)
    cost_model = fit_cost_model(records, args.output_len)
    if cost_model is not None:
        for r in records:
            if r["kind"] in ("std", "streaming", "random") and r["accepted_at"]:
                r["predicted_speedup"] = cost_model.speedup(
                    r["batch"],
                    r["prompt_tokens"] + args.output_len / 2,
                    r["sparse_context"] + args.output_len / 2,
                    r["accepted_at"],
                    r["gamma"],
                )
    result = {
        "command": vars(args),
        "model": model,
        "environment": environment(),
        "tokens_per_frame": videos.tokens_per_frame,
        "cost_model": dataclasses.asdict(cost_model) if cost_model else None,
        "records": records,
        "pooled": pooled,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    write_report(result, out)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and plots")
    return 0 if all(r["identical_to_no_speculation"] for r in records) else 1


def _plan(args: argparse.Namespace) -> list[Method]:
    """The methods to run: one per `--server`, or those of `--methods` (suffix decoding only where it can
    run: the default leaves it out, asking for it stops here, before any model is built)."""
    if args.server:
        return [Method(label, "server") for label, _ in args.server]
    installed = suffix_decoding_installed()
    if args.methods is None:
        args.methods = [m for m in METHODS if m != "suffix" or installed]
    elif "suffix" in args.methods and not installed:
        raise SystemExit(
            "vllm-std bench: --methods suffix needs Arctic Inference, which vLLM's suffix decoding "
            "imports: pip install arctic-inference (CPU: docs/benchmarks.md#suffix-decoding-on-a-cpu)"
        )
    return methods(args.methods, args.gamma, args.top_k)


def _offline_engines(args: argparse.Namespace, model: str, text_tokens: float) -> Callable[[Method], Engine]:
    """Starts a method's offline engine, sized for the run's largest workload."""
    max_model_len = int(max(args.visual_tokens) * 1.1 + text_tokens + args.output_len + 256)
    # By default a workload's prompts all prefill in its first step, so that every later step is a pure
    # decode step (what the step costs and the cost model describe), as in the paper's measurements.
    batched_tokens = args.max_num_batched_tokens or max_model_len * max(args.batch)
    engine_kwargs = {
        "dtype": args.dtype,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": batched_tokens,
        "limit_mm_per_prompt": {"video": 1},
        # Every batch brings videos no engine has seen, so vLLM's processed-input cache (4 GiB per engine by
        # default) would only fill: at 8k x4 with ten engines alive, it ran the machine out of memory.
        "mm_processor_cache_gb": 0,
        # Each engine holds what the largest workload needs (a quarter more: block rounding, drafts), not
        # a share of the machine, so that all of a run's engines fit at once (VLLM_CPU_KVCACHE_SPACE is
        # not passed on to them).
        "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)
        if args.kv_cache_gib
        else kv_cache_bytes(model, args.dtype, int(max(args.batch) * max_model_len * 1.25) + 1024),
    }
    return lambda m: EngineProcess(
        m.label, model, engine_kwargs | {"speculative_config": m.speculative_config()}
    )


def _workload_source(args: argparse.Namespace) -> tuple[str, "VideoQuestions | LookupQuestions"]:
    """The model and its requests: the tiny random fixture (default), the trained sparse fixture
    (`--model sparse`), or the user's model with synthetic videos or `--video` files. With `--server`, the
    model defaults to the first server's."""
    if args.model is None and args.server:
        args.model = served_model(args.server[0][1])
    if args.model == "sparse":
        from vllm_std.fixtures.sparse import sparse_model

        model = str(sparse_model())
        return model, LookupQuestions(model)
    if args.model is None:
        from vllm_std.fixtures.models import tiny_model

        args.model = str(tiny_model("qwen2_vl"))
    frames = file_frames(args.video) if args.video else None
    return args.model, VideoQuestions(args.model, args.question, args.frame_side, frames)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument(
        "--model",
        help="checkpoint folder or hub id; `sparse` for the trained look-up fixture (default: the tiny "
        "random-weight Qwen2-VL fixture)",
    )
    parser.add_argument(
        "--video",
        type=lambda s: s.split(","),
        help="comma-separated video files to sample frames from instead of synthetic videos",
    )
    parser.add_argument("--visual-tokens", type=ints, default=[1024, 4096], help="comma-separated")
    parser.add_argument("--batch", type=ints, default=[1, 4], help="comma-separated batch sizes")
    parser.add_argument("--gamma", type=ints, default=[4], help="comma-separated num_speculative_tokens")
    parser.add_argument("--top-k", type=ints, default=[512], help="comma-separated K (visual tokens kept)")
    parser.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        help="comma-separated: none, std (fixed gamma), adaptive, ngram, suffix (vLLM's suffix decoding; it "
        "needs `pip install arctic-inference`), streaming, random (default: all, suffix where installed)",
    )
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="batches per workload, each of other videos (the same for every method); figures pool them",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="vLLM's prefill budget per step (default: a whole workload, so that decode steps are pure)",
    )
    parser.add_argument(
        "--schedule",
        choices=["interleaved", "sequential"],
        default="interleaved",
        help="interleaved (default): every method's engine alive at once, taking turns batch by batch; "
        "sequential: one engine at a time (models too large to hold one engine per method)",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV cache per engine (default: what the largest workload needs)",
    )
    parser.add_argument("--question", default="What happens in the video?")
    parser.add_argument("--frame-side", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--server",
        type=parse_server,
        action="append",
        metavar="LABEL=URL",
        help="a running `vllm serve` to measure instead of offline engines (repeat it, one per method; the "
        "first, say none=URL without speculation, is the reference; each must serve nothing else meanwhile); "
        "--methods, --gamma, --top-k, --dtype and --schedule then do not apply",
    )
    parser.add_argument("--out", default="bench-results")
