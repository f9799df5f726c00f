"""`vllm-std demo`: the main job on the embedded default, the trained look-up fixture shipped in the package.

Each request asks about a long synthetic video whose answer sits in a short clip that the question picks
(`vllm_std.fixtures.sparse`): the case STD is for. The same requests run without speculation, with STD as a
user gets it (adaptive gamma), and with STD's drafter reading the paper's StreamingLLM selection and a random
one at the same K, all engines alive at once and taking turns batch by batch (`vllm_std.bench`). It prints
whether every output is identical to no speculation, STD's acceptance and speed, and the baselines'
acceptance; vLLM's own logs go to a file unless `--verbose`.
"""

import argparse
import tempfile
from typing import Any

from vllm_std.bench.analysis import summarize
from vllm_std.bench.command import offline_engines, sample_methods
from vllm_std.bench.methods import Method, Workload
from vllm_std.bench.workloads import LookupQuestions, workload_source

BASELINE_NAMES = {
    "streaming": "streaming (attention sinks + the most recent tokens: the paper's baseline)",
    "recent_visual": "recent_visual (all text + the most recent visual blocks)",
    "random": "random (all text + random visual blocks)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ints = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument(
        "--model",
        default="sparse",
        help="`sparse` (default): the trained look-up fixture; a folder it was retrained into; or any "
        "checkpoint folder, asked `--question` about synthetic videos",
    )
    parser.add_argument("--visual-tokens", type=int, default=8192, help="visual tokens per video")
    parser.add_argument(
        "--batch", type=int, default=4, help="requests generated together, each its own video"
    )
    parser.add_argument("--batches", type=int, default=2, help="batches, each of other videos")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--gamma", type=int, default=6, help="num_speculative_tokens (adaptive STD's cap)")
    parser.add_argument("--top-k", type=int, default=1024, help="visual tokens each layer's drafter keeps")
    parser.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="STD as users get it: each step drafts what the measured costs say pays, up to gamma "
        "(--no-adaptive: gamma tokens at every step, as in the paper)",
    )
    parser.add_argument(
        "--baselines",
        type=ints,
        default=["streaming", "random"],
        help=f"comma-separated selections to compare at the same gamma and K: {', '.join(BASELINE_NAMES)} "
        "(empty: none)",
    )
    parser.add_argument("--question", default="What happens in the video?", help="for a model of your own")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's logs instead of saving them")
    parser.add_argument("--log", help="where vLLM's logs go (default: a new file in the temp folder)")


def run_demo(args: argparse.Namespace) -> int:
    unknown = [b for b in args.baselines if b not in BASELINE_NAMES]
    if unknown:
        raise SystemExit(f"vllm-std demo: unknown --baselines {unknown}; choose from {list(BASELINE_NAMES)}")
    log = None if args.verbose else (args.log or tempfile.mkstemp(prefix="vllm-std-demo-", suffix=".log")[1])
    model, videos = workload_source(args.model, args.question, frame_side=224)
    lookup = isinstance(videos, LookupQuestions)
    workload = Workload(args.visual_tokens, args.batch)
    if args.adaptive:
        std = Method(
            f"STD (adaptive, gamma <= {args.gamma}, K {args.top_k})", "adaptive", args.gamma, args.top_k
        )
    else:
        std = Method(f"STD (fixed gamma {args.gamma}, K {args.top_k})", "std", args.gamma, args.top_k)
    plan = [Method("none", "none"), std]
    plan += [Method(b, b, args.gamma, args.top_k) for b in args.baselines]
    what = "the trained look-up fixture" if lookup else model
    print(
        f"vllm-std demo: {what}; questions about videos of {args.visual_tokens} visual tokens, "
        f"batch {args.batch} x {args.batches} batches, {args.max_tokens} tokens each"
    )
    print(f"engines: no speculation, {', '.join(m.label for m in plan[1:])}")
    print(f"vLLM's logs: {log}" if log else "vLLM's logs: below")
    start = offline_engines(model, videos.text_tokens, [workload], args.max_tokens, "float32", log=log)
    rounds = [(workload, 1000 * r) for r in range(args.batches)]
    samples = sample_methods(plan, rounds, start, videos.requests, args.max_tokens, interleaved=True)
    figures = {m.label: summarize(samples[m.label, workload.label]) for m in plan}
    if lookup:
        _show_answer(model, workload, figures["none"]["token_ids"][0])
    return _report(plan, figures)


def _show_answer(model: str, workload: Workload, token_ids: list[int]) -> None:
    """The first request: where its answer sits in the video, and the model's answer (the clip's words)."""
    from transformers import AutoTokenizer

    from vllm_std.fixtures.sparse import MARKERS, question, sparse_episode

    episode = sparse_episode(workload.visual_tokens, seed=0)
    first, length = episode.clip
    answer = AutoTokenizer.from_pretrained(model).decode(token_ids).split()
    right = answer == episode.answer_words(len(answer))
    print(
        f'first request: "{question(MARKERS[episode.marker])}" The answer is in visual tokens '
        f"{first}-{first + length - 1} of {workload.visual_tokens}; the model says: "
        f"{' '.join(answer[:10])} ... ({'' if right else 'not '}the clip's words)"
    )


def _report(plan: list[Method], figures: dict[str, dict[str, Any]]) -> int:
    none, std = (figures[m.label] for m in plan[:2])
    speculative = plan[1:]
    identical = [figures[m.label]["token_ids"] == none["token_ids"] for m in speculative]
    requests = len(none["token_ids"])
    differ = [m.label for m, same in zip(speculative, identical, strict=True) if not same]
    verdict = "yes" if not differ else f"NO ({', '.join(differ)} differ)"
    print(
        f"outputs identical to no speculation: {verdict}, all {len(identical)} drafters on all {requests} "
        "requests"
        if not differ
        else f"outputs identical to no speculation: {verdict}"
    )
    print(f"{plan[1].label}: {_acceptance(std)}")
    print(
        f"  time per output token {std['tpot_seconds'] * 1e3:.2f} ms, without speculation "
        f"{none['tpot_seconds'] * 1e3:.2f} ms: {none['tpot_seconds'] / std['tpot_seconds']:.2f}x"
    )
    if len(plan) > 2:
        print(f"the same drafter, other selections (fixed gamma {plan[2].gamma}, K {plan[2].top_k}):")
    for m in plan[2:]:
        f = figures[m.label]
        print(
            f"  {BASELINE_NAMES[m.kind]}: {_acceptance(f)}, {none['tpot_seconds'] / f['tpot_seconds']:.2f}x"
        )
    return 0 if all(identical) else 1


def _acceptance(f: dict[str, Any]) -> str:
    if not f["draft_tokens"]:
        return "no drafts"
    looked_up = f.get("lookup_share")
    source = f", {looked_up:.0%} of them look-up drafts" if looked_up else ""
    return (
        f"acceptance {f['acceptance_rate']:.0%} of {f['draft_tokens']:.0f} draft tokens "
        f"(mean accepted length {f['mean_acceptance_length']:.2f}{source})"
    )
