"""`vllm-std demo`: the main job on the embedded default (a tiny fixture and a synthetic video).

Runs the same requests through vLLM twice, without speculation and with STD, in one process one engine at a
time, and prints whether the outputs are identical, STD's acceptance (from vLLM's own counters) and the
ratio of decode time per output token. On the random-weight fixture attention is not sparse, so acceptance
at small K is low: the demo shows the mechanics and the losslessness, not the paper's speedup.
"""

import argparse
import gc
import json
import time
from typing import Any

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import prompt_token_count, vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.metrics import acceptance_rate, spec_decode_counters, std_metrics


def _run(
    path: str, requests: list[dict], speculative_config: Any, max_tokens: int, prompt_tokens: int
) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        path,
        dtype="float32",
        max_model_len=prompt_tokens + max_tokens + 64,
        # A video item is encoded in one go: the encoder budget must hold all of its tokens.
        max_num_batched_tokens=max(8192, prompt_tokens),
        limit_mm_per_prompt={"video": 1},
        speculative_config=speculative_config,
        seed=0,
        disable_log_stats=False,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    # Warm up with text only: a warm-up on the video would put it in the prefix cache (and STD skips those).
    llm.generate([{"prompt": "Hello"}], SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    counters = spec_decode_counters(llm)
    std = std_metrics(llm)
    del llm
    gc.collect()
    return {
        "outputs": outputs,
        "seconds": elapsed,
        "counters": counters,
        "std": std,
        "tpot": _time_per_output_token(outputs),
    }


def _time_per_output_token(outputs: list[Any]) -> float:
    """Mean decode time per output token after the first (vLLM's engine-core timestamps), in seconds."""
    per_request = [
        (o.metrics.last_token_ts - o.metrics.first_token_ts) / (len(o.outputs[0].token_ids) - 1)
        for o in outputs
        if o.metrics is not None and len(o.outputs[0].token_ids) > 1
    ]
    return sum(per_request) / len(per_request) if per_request else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    path = str(tiny_model(args.family))
    requests = [
        vllm_request(
            path, args.question, videos=[synthetic_frames(args.frames, args.size, args.size, seed=s)]
        )
        for s in range(args.batch)
    ]
    spec = {"method": "std", "num_speculative_tokens": args.gamma, "top_k": args.top_k}
    print(f"model: {path}")
    print(
        f"video: {args.frames} frames of {args.size}x{args.size}, batch {args.batch}; STD: {json.dumps(spec)}"
    )

    prompt_tokens = prompt_token_count(path, requests[0])
    dense = _run(path, requests, None, args.max_tokens, prompt_tokens)
    std = _run(path, requests, spec, args.max_tokens, prompt_tokens)

    identical = [
        list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        for a, b in zip(dense["outputs"], std["outputs"], strict=True)
    ]
    counters = std["counters"]
    generated = sum(len(o.outputs[0].token_ids) for o in std["outputs"])
    print(f"prompt tokens per request: {prompt_tokens}; generated {generated} tokens in all")
    print(f"first output: {std['outputs'][0].outputs[0].text[:120]!r}")
    print(f"outputs identical with and without STD: {all(identical)} ({sum(identical)}/{len(identical)})")
    if counters.get("num_draft_tokens"):
        rate = acceptance_rate(counters)
        mean_len = 1 + counters["num_accepted_tokens"] / counters["num_drafts"]
        drafts = counters["num_draft_tokens"]
        print(f"acceptance: {rate:.1%} of {drafts:.0f} draft tokens; mean accepted length {mean_len:.2f}")
    else:
        print("acceptance: no drafts were made")
    selection = std["std"]
    if selection.get("visual_tokens"):
        kept, visual = selection["kept_visual_tokens"], selection["visual_tokens"]
        skipped = ", ".join(f"{n:.0f} {reason}" for reason, n in selection["requests_skipped"].items() if n)
        print(
            f"drafter reads {kept:.0f} of {visual:.0f} visual tokens per layer ({kept / visual:.1%}); "
            f"{selection['requests_scored']:.0f} requests scored; not drafted: {skipped or 'none'}"
        )
    off_ms, std_ms = dense["tpot"] * 1e3, std["tpot"] * 1e3
    print(
        f"time per output token: {off_ms:.2f} ms without speculation, {std_ms:.2f} ms with STD "
        f"(speedup {off_ms / std_ms:.2f}x); generate(): {dense['seconds']:.2f} s vs {std['seconds']:.2f} s"
    )
    return 0 if all(identical) else 1
