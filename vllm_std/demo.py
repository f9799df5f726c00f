"""`vllm-std demo`: the main job on the embedded default (a tiny fixture and a synthetic video)."""

import argparse
import time

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames


def run_demo(args: argparse.Namespace) -> int:
    from vllm import LLM, SamplingParams

    path = str(tiny_model(args.family))
    video = synthetic_frames(args.frames, args.size, args.size)
    request = vllm_request(path, args.question, videos=[video])
    print(f"model: {path}\nvideo: {args.frames} frames of {args.size}x{args.size}")

    llm = LLM(path, dtype="float32", max_model_len=32768, limit_mm_per_prompt={"video": 1}, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    start = time.perf_counter()
    output = llm.generate([request], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    tokens = output.outputs[0].token_ids
    print(f"prompt tokens: {len(output.prompt_token_ids)}")
    print(f"generated {len(tokens)} tokens in {elapsed:.2f} s: {output.outputs[0].text!r}")
    return 0
