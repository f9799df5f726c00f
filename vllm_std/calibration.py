"""The cost model the adaptive gamma policy weighs, measured on the engine it runs in.

At start-up (before any request, so free KV blocks may be written) each worker times forward passes of the
target model through the runner, exactly as drafting runs them: one-token dense steps, verify steps over
`g + 1` tokens and sparse draft steps with per-layer block tables, at a short and a long context and at
batch 1 and a few. Every tensor-parallel rank runs the same steps (they hold collectives); rank 0's fit is the
one used, since rank 0 decides every draft length. What a forward pass does not show (scheduling, input
preparation, sampling: the same for a dense and a verify step) is measured while serving by `StepOverhead`.
"""

import argparse
import collections
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_std.backends.base import AttentionAdapter
from vllm_std.cost_model import CostModel, fit_step_cost, fit_verify_cost
from vllm_std.draft_step import keep_all_round
from vllm_std.selection import kv_slots

if TYPE_CHECKING:
    from vllm_std.runner_view import RunnerView
    from vllm_std.sparse_drafter import SparseDrafter


class StartupCalibration:
    """Times forward passes over scratch KV blocks and fits `CostModel` to them."""

    REPEATS = 7
    MAX_BATCH = 4
    MAX_CONTEXT = 32_768

    def __init__(
        self, view: "RunnerView", adapter: AttentionAdapter, max_gamma: int, drafter: "SparseDrafter"
    ) -> None:
        self.view, self.adapter, self.max_gamma, self.drafter = view, adapter, max_gamma, drafter
        fits = view.runner.max_num_tokens // (max_gamma + 1)
        self.batch = max(1, min(self.MAX_BATCH, view.max_num_seqs, fits))
        block_size = view.block_size
        # Block 0 is vLLM's null block; every row gets blocks of its own, so no row reads another's KV.
        blocks_per_row = (view.num_kv_blocks - 1) // self.batch
        long = min(self.MAX_CONTEXT, view.max_model_len, blocks_per_row * block_size) - max_gamma - 1
        self.contexts = sorted({min(8 * block_size, long), long})

    def run(self) -> CostModel:
        shapes: list[tuple[str, int, int, int]] = []  # (kind, batch, context, gamma)
        for batch in sorted({1, self.batch}):
            for context in self.contexts:
                shapes += [("dense", batch, context, 0), ("draft", batch, context, 0)]
                shapes += [("verify", batch, context, gamma) for gamma in sorted({1, self.max_gamma})]
        passes = [
            self._forward(batch, context, gamma + 1, kind == "draft")
            for kind, batch, context, gamma in shapes
        ]
        for forward in passes:  # untimed: first runs of a shape pay for allocations
            forward()
        # Every round times each shape once, so that a change of the machine's speed during the calibration
        # (other tenants of a shared CPU) falls on dense, draft and verify steps alike: the policy weighs
        # their ratios. Each timed pass follows an untimed one of its shape, as a served step follows one
        # like it: right after a pass over a long context, a short one ran up to twice as long on the CPU,
        # which made short-context steps look dearer than they are.
        seconds: list[list[float]] = [[] for _ in shapes]
        for _ in range(self.REPEATS):
            for times, forward in zip(seconds, passes, strict=True):
                forward()
                start = time.perf_counter()
                forward()
                times.append(time.perf_counter() - start)
        measured = collections.defaultdict(list)
        for (kind, batch, context, gamma), times in zip(shapes, seconds, strict=True):
            point = (batch, context, gamma) if kind == "verify" else (batch, context)
            measured[kind].append((*point, statistics.median(times)))
        return CostModel(
            fit_step_cost(*zip(*measured["dense"], strict=True)),
            fit_step_cost(*zip(*measured["draft"], strict=True)),
            fit_verify_cost(*zip(*measured["verify"], strict=True)),
        )

    def _forward(self, batch: int, context: int, query_len: int, sparse: bool) -> Callable[[], None]:
        """A forward over `batch` rows reading `context` cached tokens plus `query_len` new ones, run as a
        draft step runs (`sparse`: the drafter's own path, its full graphs where it has them) or as the target
        builds it, from its inputs to its logits on the host."""
        view, block_size = self.view, self.view.block_size
        seq_len = context + query_len
        num_blocks = -(-seq_len // block_size)
        table = 1 + torch.arange(batch * num_blocks, dtype=torch.int32).view(batch, num_blocks)
        positions = (context + torch.arange(query_len)).repeat(batch)
        rows = torch.arange(batch).repeat_interleave(query_len)
        slots = kv_slots(table, rows, positions, block_size)
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
        common = view.common_metadata(seq_lens, table, slots, query_len)
        tokens = torch.ones(batch * query_len, dtype=torch.int64)

        if sparse:
            draft_round = keep_all_round(
                list(table), [context] * batch, len(view.layer_names), block_size, view.device
            )
            rows, device_tokens = list(range(batch)), tokens.to(view.device)

            def draft() -> None:
                logits = self.drafter.forward(draft_round, rows, 0, device_tokens)
                float(logits[-1, 0])  # waits for the device

            return draft

        def forward() -> None:
            logits = view.draft_logits(tokens, positions, slots, view.dense_metadata(common))
            float(logits[-1, 0])  # waits for the device

        return forward


class StepOverhead:
    """Seconds per target step beyond its forward pass, from the steps actually served: the time between
    the end of one drafting round and the start of the next, less the forward pass the calibrated model
    predicts for that step. A fixed part (scheduling, input preparation, sampling), from steps that verify
    no drafts; what a verify step costs beyond that, as a part per round and a part per verified draft
    (vLLM's speculative bookkeeping and rejection sampling); and what a drafting round takes beyond its
    predicted forward passes (the policy, block tables, metadata, argmax), per round and per draft step.
    Each is taken from medians over recent steps, so an idle gap between requests does not count.

    Per round and per draft are told apart by a line through the median of each length seen: with one
    length only (single-draft probes), it is all per round. Charging it per draft instead would price a
    round of 6 drafts for 4 requests at 24 times what one draft showed, and stop a batch from drafting where
    it pays."""

    WINDOW = 64
    SETTLED = 16

    def __init__(self) -> None:
        self._plain: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._verify: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.WINDOW)
        self._drafting: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.WINDOW)
        self._observed = 0

    def observe(self, seconds: float, predicted_forward: float, drafts: int) -> None:
        self._observed += 1
        residual = max(seconds - predicted_forward, 0.0)
        if drafts:
            self._verify.append((drafts, residual))
        else:
            self._plain.append(residual)

    def observe_drafting(self, seconds: float, predicted: tuple[float, int]) -> None:
        """A drafting round that took `seconds` against `(forward seconds, draft steps)` predicted."""
        forward, steps = predicted
        self._drafting.append((steps, max(seconds - forward, 0.0)))

    @property
    def settling(self) -> bool:
        """The engine's first steps: too few plain ones yet for their median to hold still (for at most
        `WINDOW` steps, as an engine that drafts at every step sees none)."""
        return len(self._plain) < self.SETTLED and self._observed < self.WINDOW

    @property
    def fixed(self) -> float:
        return statistics.median(self._plain) if self._plain else 0.0

    def rounds(self) -> tuple[float, float, float]:
        """`(per round, per verified draft, per draft step)`: what a drafting round and its verify step cost
        beyond a plain step's overhead."""
        fixed = self.fixed
        verify_round, per_draft = _line([(d, r - fixed) for d, r in self._verify])
        drafting_round, per_step = _line(list(self._drafting))
        return verify_round + drafting_round, per_draft, per_step

    @staticmethod
    def decode_rows(rows: Sequence[tuple[int, int, int]]) -> list[tuple[float, int]] | None:
        """`(context, drafts verified)` per row of a step whose rows `(chunk start, query length, prompt
        length)` all decode; None for a step holding any prefill (its cost is not a decode step's)."""
        if any(start < prompt for start, _, prompt in rows):
            return None
        return [(start + query, query - 1) for start, query, _ in rows]


def _line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """`(intercept, slope)`, both >= 0, of a least-squares line through the median `y` of each `x` in
    `points`, weighted by how often each `x` was seen; `(0, 0)` without points."""
    by_x: dict[int, list[float]] = collections.defaultdict(list)
    for x, y in points:
        by_x[x].append(y)
    if not by_x:
        return 0.0, 0.0
    xs = np.array(sorted(by_x), dtype=float)
    ys = np.array([statistics.median(by_x[int(x)]) for x in xs])
    weights = np.array([len(by_x[int(x)]) for x in xs], dtype=float)
    slope = 0.0
    if len(xs) > 1:
        mean_x, mean_y = np.average(xs, weights=weights), np.average(ys, weights=weights)
        slope = max(
            float(np.sum(weights * (xs - mean_x) * (ys - mean_y)) / np.sum(weights * (xs - mean_x) ** 2)), 0.0
        )
    intercept = float(np.average(ys - slope * xs, weights=weights))
    if intercept < 0:  # through the origin instead
        intercept, slope = 0.0, max(float(np.sum(weights * xs * ys) / np.sum(weights * xs**2)), 0.0)
    return intercept, slope


class CostProfileExtension:
    """A worker extension (vLLM's `worker_extension_cls`) through which `vllm-std calibrate` reads the cost
    model that the worker's drafter measured at start-up."""

    def std_cost_model(self) -> dict[str, Any] | None:
        cost = getattr(getattr(self.model_runner, "drafter", None), "cost", None)  # type: ignore[attr-defined]
        return cost.to_json() if cost is not None else None


def run_calibrate(args: argparse.Namespace) -> int:
    """`vllm-std calibrate`: start an engine with adaptive STD, take rank 0's measured cost model, save it
    as a profile for `"cost_profile"` (measured with the same model, gamma, context and parallelism)."""
    from vllm_std.bench.command import environment
    from vllm_std.bench.engines import engine

    spec = {"method": "std", "num_speculative_tokens": args.gamma}
    with engine(
        args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        speculative_config=spec,
        worker_extension_cls=f"{__name__}.{CostProfileExtension.__name__}",
    ) as llm:
        profile = llm.collective_rpc("std_cost_model")[0]
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    profile["measured_with"] = {**settings, "environment": environment()}
    Path(args.out).write_text(json.dumps(profile, indent=2, default=str))
    use = json.dumps({"method": "std", "cost_profile": str(args.out)})
    print(f"wrote {args.out}; use it with --speculative-config '{use}'")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder or hub id, as given to `vllm serve`")
    parser.add_argument("--out", default="std-cost-profile.json")
    parser.add_argument("--gamma", type=int, default=6, help="num_speculative_tokens (the most drafted)")
    parser.add_argument("--max-model-len", type=int, default=None, help="the longest context measured")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
