"""The `vllm-std bench` command: its arguments, the plan of engines and rounds, and the run that writes
`bench.json`, `bench.md` and the plots (`vllm_std.bench.report`)."""

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_std.bench.analysis import exit_status, fit_cost_model, method_records, pooled_speedups, predict
from vllm_std.bench.engines import Batch, Engine, EngineProcess, engine_processes
from vllm_std.bench.methods import (
    ANSWERS,
    METHODS,
    OPT_IN,
    Method,
    Workload,
    methods,
    suffix_decoding_installed,
)
from vllm_std.bench.server import ServerEngine, parse_server, served_model
from vllm_std.bench.workloads import (
    MAX_TURNS,
    LookupQuestions,
    VideoQuestions,
    file_frames,
    workload_source,
)

_TIMING_ENV = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "OMP_NUM_THREADS",
    "LD_PRELOAD",
)


def source_commit() -> str | None:
    """The git commit vllm-std runs from when it is installed from a checkout (a `+` marks uncommitted
    changes), so that a published run says which code it measured; None for an installed wheel."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")) != package.parent:
            return None
        return git("rev-parse", "HEAD") + ("+" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    import torch
    import vllm

    return {
        "vllm_std": metadata.version("vllm-std"),
        "vllm_std_commit": source_commit(),
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


FOLLOW_UP_TOKENS = 64  # at most, per later turn: its question in the chat template
WARM_UP_SEED = 10**6  # plus a round's seed: other videos than any measured batch's


def sample_methods(
    plan: list[Method],
    rounds: list[tuple[Workload, int]],
    start: Callable[[Method], Engine],
    requests: Callable[[Workload, int], Batch],
    output_len: int,
    interleaved: bool,
    turns: int = 1,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every method's samples of every round (a workload's batch, by seed), by (method, workload) label,
    each turn of the batch's conversations under its own workload (`Workload.turns`); before a workload's
    first round, each engine runs a batch of its shape that is not measured.

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
                order = engines if i % 2 == 0 else engines[::-1]
                if workload not in warm:  # first shapes of a batch size and context: not measured
                    warm.add(workload)
                    warm_up = requests(workload, WARM_UP_SEED + seed)
                    for e in order:
                        e.sample(warm_up, 8, turns)
                batch = requests(workload, seed)
                for e in order:
                    progress.set_postfix_str(f"{workload.label}: {e.label}")
                    by_turn = zip(workload.turns(turns), e.sample(batch, output_len, turns), strict=True)
                    for turn, sample in by_turn:
                        samples.setdefault((e.label, turn.label), []).append(sample)
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
    from vllm_std.bench.report import write_report

    plan = _plan(args)
    model, videos = _workload_source(args)
    answers = _answers(args, isinstance(videos, LookupQuestions))
    base = [Workload(v, b, answers=a) for a in answers for v in args.visual_tokens for b in args.batch]
    workloads = [turn for w in base for turn in w.turns(args.turns)]
    if args.server:
        urls = dict(args.server)
        start: Callable[[Method], Engine] = lambda m: ServerEngine(  # noqa: E731
            m.label, urls[m.label], temperature=args.temperature
        )
    else:
        start = offline_engines(
            model,
            videos.text_tokens,
            base,
            # A later turn's prompt holds the earlier turns: their answers, and a follow-up in the template.
            args.output_len * args.turns + FOLLOW_UP_TOKENS * (args.turns - 1),
            args.dtype,
            args.max_num_batched_tokens,
            args.kv_cache_gib,
            args.log,
            args.temperature,
        )
    rounds = [
        (workload, 1000 * (i * args.repeats + r))
        for i, workload in enumerate(base)
        for r in range(args.repeats)
    ]
    interleaved = args.schedule == "interleaved"
    samples = sample_methods(plan, rounds, start, videos.requests, args.output_len, interleaved, args.turns)
    records = method_records(plan, workloads, samples, args.temperature)
    pooled = pooled_speedups(records)
    cost_model = fit_cost_model(records)
    if cost_model is not None:
        predict(records, cost_model)
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
    return exit_status(records)


def _plan(args: argparse.Namespace) -> list[Method]:
    """The methods to run: one per `--server`, or those of `--methods` (suffix decoding only where it can
    run: the default leaves it out, asking for it stops here, before any model is built)."""
    if args.server:
        return [Method(label, "server") for label, _ in args.server]
    installed = suffix_decoding_installed()
    if args.methods is None:
        args.methods = [m for m in METHODS if m not in OPT_IN and (m != "suffix" or installed)]
    elif "suffix" in args.methods and not installed:
        raise SystemExit(
            "vllm-std bench: --methods suffix needs Arctic Inference, which vLLM's suffix decoding "
            "imports: pip install arctic-inference (CPU: docs/benchmarks.md#suffix-decoding-on-a-cpu)"
        )
    return methods(args.methods, args.gamma, args.top_k)


def offline_engines(
    model: str,
    text_tokens: float,
    workloads: list[Workload],
    output_len: int,
    dtype: str,
    max_num_batched_tokens: int | None = None,
    kv_cache_gib: float | None = None,
    log: str | None = None,
    temperature: float = 0.0,
) -> Callable[[Method], Engine]:
    """Starts a method's offline engine (its vLLM output appended to `log`, if given), sized for the
    largest of `workloads` and sampling at `temperature`."""
    visual_tokens, batch = max(w.visual_tokens for w in workloads), max(w.batch for w in workloads)
    max_model_len = int(visual_tokens * 1.1 + text_tokens + output_len + 256)
    engine_kwargs = {
        "dtype": dtype,
        "max_model_len": max_model_len,
        # By default a workload's prompts all prefill in its first step, so that every later step is a pure
        # decode step (what the step costs and the cost model describe), as in the paper's measurements.
        "max_num_batched_tokens": max_num_batched_tokens or max_model_len * batch,
        "limit_mm_per_prompt": {"video": 1},
        # Every batch brings videos no engine has seen, so vLLM's processed-input cache (4 GiB per engine by
        # default) would only fill: at 8k x4 with ten engines alive, it ran the machine out of memory.
        "mm_processor_cache_gb": 0,
        # Each engine holds what the largest workload needs (a quarter more: block rounding, drafts), not
        # a share of the machine, so that all of a run's engines fit at once (VLLM_CPU_KVCACHE_SPACE is
        # not passed on to them).
        "kv_cache_memory_bytes": int(kv_cache_gib * 2**30)
        if kv_cache_gib
        else kv_cache_bytes(model, dtype, int(batch * max_model_len * 1.25) + 1024),
    }
    return lambda m: EngineProcess(
        m.label, model, engine_kwargs | {"speculative_config": m.speculative_config()}, log, temperature
    )


def _workload_source(args: argparse.Namespace) -> tuple[str, VideoQuestions | LookupQuestions]:
    """The model and its requests (`workloads.workload_source`); with `--server`, the model defaults to the
    first server's."""
    if args.model is None and args.server:
        args.model = served_model(args.server[0][1])
    frames = file_frames(args.video) if args.video else None
    model, videos = workload_source(args.model, args.question, args.frame_side, frames)
    args.model = model
    return model, videos


def _answers(args: argparse.Namespace, lookup: bool) -> list[str]:
    """`--answers`, resolved once the model is known (`lookup`: the look-up fixture) and written back: both
    by default on the fixture (cycling only with `--turns` > 1), cycling for other models. One-pass is
    refused for other models (their answers are not the fixture's) and with follow-ups (its video has one
    clip: a follow-up could only ask for the same answer again, which its context then holds)."""
    if args.answers is None:
        args.answers = list(ANSWERS) if lookup and args.turns == 1 else ["cycling"]
    elif "one-pass" in args.answers and not lookup:
        raise SystemExit(
            "vllm-std bench: error: argument --answers: one-pass needs the look-up fixture (--model sparse "
            f"or a folder it was retrained into), not {args.model}"
        )
    elif "one-pass" in args.answers and args.turns > 1:
        raise SystemExit(
            "vllm-std bench: error: argument --answers: one-pass has no follow-ups (its video has one clip): "
            "run it with --turns 1"
        )
    return args.answers


def _answer_kinds(text: str) -> list[str]:
    """`--answers` (argparse type): comma-separated values of ANSWERS, each once."""
    kinds = list(dict.fromkeys(text.split(",")))
    if any(k not in ANSWERS for k in kinds):
        raise argparse.ArgumentTypeError(f"expected comma-separated {', '.join(ANSWERS)}; got {text!r}")
    return kinds


def _temperature(text: str) -> float:
    """`--temperature` (argparse type): a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: greedy), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument(
        "--model",
        help="checkpoint folder or hub id; `sparse` for the trained look-up fixture, `sparse-spread` for "
        "that model with spread next-token distributions (for --temperature > 0) (default: the tiny "
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
        help="comma-separated: none, std (fixed gamma), std_onehot (std verifying argmax drafts as one-hot, "
        '`"draft_probs": false`: the comparison for --temperature > 0; only when named), adaptive, '
        'adaptive_sparse (adaptive without look-up drafts, `"lookup": false`), ngram, '
        "suffix (vLLM's suffix decoding; it needs `pip install arctic-inference`), streaming (the paper's "
        "StreamingLLM drafter), recent_visual, random (default: all but std_onehot, suffix where installed)",
    )
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        metavar="T",
        help="sampling temperature of every request, offline or --server (default 0: greedy, every output "
        "compared token by token with no speculation's; above 0 outputs are not compared)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        choices=range(1, MAX_TURNS + 1),
        default=1,
        metavar=f"1..{MAX_TURNS}",
        help="turns of a conversation about each video: every later turn is a follow-up question whose "
        "video KV comes from the prefix cache; each turn is its own workload in the results",
    )
    parser.add_argument(
        "--answers",
        type=_answer_kinds,
        metavar="cycling,one-pass",
        help="the look-up fixture's workloads: cycling (a clip's 12 words, cycling for all of --output-len) "
        "and one-pass (one clip of all 48 content words: an answer of 49 tokens, none twice, at which the "
        "output stops whatever --output-len says), each its own column (`4k x4 one-pass`). Default: both "
        "on the fixture (cycling only with --turns > 1: one-pass has no follow-ups, and is refused with "
        "them); cycling for other models, which refuse one-pass",
    )
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
    parser.add_argument("--log", help="a file for the offline engines' vLLM logs (default: the terminal)")
