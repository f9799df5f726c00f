"""Time the steps of STD's cost model on an accelerator where vLLM is not installed, and project STD there.

A decoder of a given shape (default: Qwen2-VL-7B's language model) with random bf16 weights and a random
KV cache runs one step in plain torch: `q` query tokens per request over `context` cached tokens, batch
`batch`. Attention is split along the KV (flash-decoding, as vLLM's GPU backends do), so a one-token step
is bound by memory as it is in vLLM. Each step is timed twice: replayed as a CUDA graph (how vLLM runs its
dense and verify steps) and launched op by op (STD's draft steps run vLLM's model outside its CUDA graphs;
vLLM's compiled kernels launch fewer ops than this, so the truth lies between the two). vllm-std's cost
model is fitted to these times and gives STD's predicted speed-up at the paper's settings for assumed
acceptances: a projection from measured step costs, not a measurement of STD. With vLLM installed,
`vllm-std calibrate` measures the engine's own steps instead.

    python scripts/gpu_step_costs.py --out docs/benchmarks/gpu-step-costs
"""

import argparse
import dataclasses
import itertools
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_std.cost_model import (
    BandwidthModel,
    CostModel,
    StepCost,
    fit_step_cost,
    fit_verify_cost,
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's dimensions (default: Qwen2-VL-7B's language model, from its config.json)."""

    layers: int = 28
    hidden: int = 3584
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 18944
    vocab: int = 152064

    @property
    def weight_bytes(self) -> int:
        per_layer = self.hidden * (
            (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim
        )
        per_layer += 3 * self.hidden * self.intermediate
        return 2 * (self.layers * per_layer + self.hidden * self.vocab)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * 2 * self.kv_heads * self.head_dim


class Decoder:
    """The work of one decode step of a pre-norm GQA decoder: projections, split-KV attention, gated MLP and
    the logits of every query token. Rotary embeddings and sampling are left out (a few elementwise
    kernels)."""

    def __init__(self, shape: Shape, device: torch.device) -> None:
        self.shape, self.device = shape, device
        s, dt = shape, torch.bfloat16
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim

        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.empty(rows, cols, dtype=dt, device=device).normal_(std=0.02)

        self.layers = [
            (
                weight(s.hidden, qkv),
                weight(s.heads * s.head_dim, s.hidden),
                weight(s.hidden, 2 * s.intermediate),
                weight(s.intermediate, s.hidden),
            )
            for _ in range(s.layers)
        ]
        self.lm_head = weight(s.hidden, s.vocab)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fill_cache(self, batch: int, context: int, splits: int) -> None:
        """Random KV for `batch` requests of `context` tokens, laid out as `splits` chunks per request so
        that each chunk is one row of the attention kernel's batch."""
        s = self.shape
        self.cache = []
        chunk = context // splits
        for _ in range(s.layers):
            k, v = (
                torch.randn(
                    batch * splits, s.kv_heads, chunk, s.head_dim, dtype=torch.bfloat16, device=self.device
                )
                for _ in range(2)
            )
            self.cache.append((k, v))
        self.splits = splits

    def step(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Logits of every token of `x` (`batch` requests' query tokens in order)."""
        for weights, cache in zip(self.layers, self.cache, strict=True):
            x = self.layer(x, batch, self.splits, *weights, *cache)
        return F.rms_norm(x, (self.shape.hidden,)) @ self.lm_head

    def layer(
        self,
        x: torch.Tensor,
        batch: int,
        splits: int,
        wqkv: torch.Tensor,
        wo: torch.Tensor,
        wgu: torch.Tensor,
        wd: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        s = self.shape
        tokens = x.shape[0]
        queries = tokens // batch
        group = s.heads // s.kv_heads
        h = F.rms_norm(x, (s.hidden,))
        qkv = h @ wqkv
        q = qkv[:, : s.heads * s.head_dim].view(batch, queries, s.kv_heads, group, s.head_dim)
        k_new = qkv[:, s.heads * s.head_dim : (s.heads + s.kv_heads) * s.head_dim]
        v_new = qkv[:, (s.heads + s.kv_heads) * s.head_dim :]
        # The new tokens' KV is written into the cache (at the end of each request's last chunk).
        for cache, new in ((k_cache, k_new), (v_cache, v_new)):
            last = cache.view(batch, splits, *cache.shape[1:])[:, -1, :, -queries:]
            last.copy_(new.reshape(batch, queries, s.kv_heads, s.head_dim).transpose(1, 2))
        # [batch, kv_heads, queries * group, head_dim]: a KV head's query heads share its reads.
        q = q.permute(0, 2, 1, 3, 4).reshape(batch, s.kv_heads, queries * group, s.head_dim)
        out = _attend(q.repeat_interleave(splits, dim=0), k_cache, v_cache, batch, splits)
        out = out.view(batch, s.kv_heads, queries, group, s.head_dim).permute(0, 2, 1, 3, 4)
        x = x + out.reshape(tokens, s.heads * s.head_dim) @ wo
        gate, up = (F.rms_norm(x, (s.hidden,)) @ wgu).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ wd


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, splits: int) -> torch.Tensor:
    """Attention of each request's queries over its `splits` KV chunks, merged by their log-sum-exp."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    if splits == 1:
        return out
    out = out.view(batch, splits, *out.shape[1:])
    lse = lse.view(batch, splits, *lse.shape[1:])
    weights = torch.softmax(lse, dim=1).unsqueeze(-1).to(out.dtype)
    return (weights * out).sum(dim=1)


def _splits(batch: int, context: int, kv_heads: int, processors: int) -> int:
    """KV chunks per request: enough rows for two waves of the processors, no chunk under 256 tokens."""
    splits = 1
    while batch * kv_heads * splits < 2 * processors and context // (2 * splits) >= 256:
        splits *= 2
    return splits


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` timed blocks of 5 calls each."""
    if device.type != "cuda":
        import time

        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 5e3)
    return sorted(samples)[len(samples) // 2]


MODES = ("graph", "eager")
"""How a step is launched: replayed as a CUDA graph (vLLM's dense and verify steps), or op by op (STD's draft
steps run outside vLLM's CUDA graphs). Each step ends by reading its greedy tokens back, as a draft step
does."""


def measure(model: Decoder, batch: int, queries: int, mode: str, repeats: int) -> float:
    x = torch.randn(batch * queries, model.shape.hidden, dtype=torch.bfloat16, device=model.device)

    def step() -> torch.Tensor:
        return model.step(x, batch)

    with torch.inference_mode():
        for _ in range(2):
            step()
        if mode != "graph" or model.device.type != "cuda":
            return _time(lambda: step().argmax(dim=-1).cpu(), model.device, repeats)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()

        def replay() -> None:
            graph.replay()
            logits.argmax(dim=-1).cpu()

        seconds = _time(replay, model.device, repeats)
        return seconds


def kv_bandwidth(model: Decoder, batch: int, context: int, repeats: int) -> float:
    """Bytes per second of the attention kernels alone over the cache (one query token per request)."""
    s = model.shape
    q = torch.randn(
        batch * model.splits,
        s.kv_heads,
        s.heads // s.kv_heads,
        s.head_dim,
        dtype=torch.bfloat16,
        device=model.device,
    )

    def attend() -> None:
        for k, v in model.cache:
            _attend(q, k, v, batch, model.splits)

    with torch.inference_mode():
        attend()
        seconds = _time(attend, model.device, repeats)
    return batch * context * s.kv_bytes_per_token / seconds


def project(
    model: CostModel,
    contexts: list[int],
    batches: list[int],
    sparse: int,
    alphas: list[float],
    max_gamma: int,
) -> list[dict[str, float]]:
    """Best fixed gamma and its predicted speed-up per setting, acceptance `alpha` at every position."""
    rows = []
    for context, batch, alpha in itertools.product(contexts, batches, alphas):
        speedups = [model.speedup(batch, context, sparse, [alpha], g) for g in range(1, max_gamma + 1)]
        best = max(range(max_gamma), key=lambda i: speedups[i])
        rows.append(
            {
                "context": context,
                "batch": batch,
                "alpha": alpha,
                "best_gamma": best + 1,
                "speedup": speedups[best],
                "speedup_gamma6": speedups[5] if max_gamma >= 6 else math.nan,
            }
        )
    return rows


def _table(projection: dict[str, list[dict[str, float]]], alphas: tuple[float, ...]) -> str:
    """Markdown: per context and batch, each cost model's best gamma and predicted speed-up at `alphas`."""
    names = list(projection)
    header = ["context", "batch", *(f"{name}, α {alpha}" for alpha in alphas for name in names)]
    cells: dict[tuple[float, float], list[str]] = {}
    for alpha in alphas:
        for name in names:
            for row in projection[name]:
                if row["alpha"] == alpha:
                    cell = f"{row['speedup']:.2f}x (g {row['best_gamma']})"
                    cells.setdefault((row["context"], row["batch"]), []).append(cell)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (context, batch), row_cells in cells.items():
        lines.append(f"| {int(context) // 1024}k | {int(batch)} | " + " | ".join(row_cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", default="1024,2048,16384,32768,65536,131072")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--queries", default="1,2,4,7,10", help="query tokens per request (gamma + 1)")
    parser.add_argument("--max-cached-tokens", type=int, default=524288, help="batch x context at most")
    parser.add_argument("--sparse-context", type=int, default=1024, help="K plus text, the drafter's context")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a small shape, to try the script on a CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(2, 256, 4, 2, 64, 512, 1000) if args.tiny else Shape()
    processors = (
        torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    )
    torch.manual_seed(0)
    model = Decoder(shape, device)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    queries = [int(q) for q in args.queries.split(",")]
    steps: list[dict[str, float]] = []
    bandwidth: list[dict[str, float]] = []
    for batch, context in itertools.product(batches, contexts):
        if batch * context > args.max_cached_tokens:
            continue
        model.fill_cache(batch, context, _splits(batch, context, shape.kv_heads, processors))
        bandwidth.append(
            {
                "batch": batch,
                "context": context,
                "bytes_per_second": kv_bandwidth(model, batch, context, args.repeats),
            }
        )
        for q, mode in itertools.product(queries, MODES):
            seconds = measure(model, batch, q, mode, args.repeats)
            steps.append({"batch": batch, "context": context, "queries": q, "mode": mode, "seconds": seconds})
            print(f"batch {batch} context {context} queries {q} {mode}: {seconds * 1e3:.3f} ms", flush=True)
        model.cache = []
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def rows(mode: str, one_query: bool) -> list[dict[str, float]]:
        return [s for s in steps if s["mode"] == mode and (s["queries"] == 1) == one_query]

    def step_fit(mode: str) -> StepCost:
        chosen = rows(mode, True)
        return fit_step_cost(
            [s["batch"] for s in chosen], [s["context"] for s in chosen], [s["seconds"] for s in chosen]
        )

    dense = step_fit("graph")
    verify_rows = rows("graph", False) + rows("graph", True)
    verify = fit_verify_cost(
        [s["batch"] for s in verify_rows],
        [s["context"] for s in verify_rows],
        [s["queries"] - 1 for s in verify_rows],
        [s["seconds"] for s in verify_rows],
    )
    drafters = {mode: CostModel(dense, step_fit(mode), verify) for mode in MODES}
    peak = max(b["bytes_per_second"] for b in bandwidth)
    io = BandwidthModel(shape.weight_bytes, shape.kv_bytes_per_token, peak).cost_model()
    fit_errors = [
        abs(verify(s["batch"], s["context"], s["queries"] - 1) / s["seconds"] - 1) for s in verify_rows
    ]
    paper = {
        "contexts": [16384, 32768, 65536, 131072],
        "batches": batches,
        "sparse": args.sparse_context,
        "alphas": [0.6, 0.7, 0.8, 0.9],
        "max_gamma": 9,
    }
    projection = {
        name: project(m, paper["contexts"], paper["batches"], paper["sparse"], paper["alphas"], 9)
        for name, m in {
            **{f"drafter_{mode}": m for mode, m in drafters.items()},
            "bandwidth_model": io,
        }.items()
    }
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "shape": dataclasses.asdict(shape),
        "weight_bytes": shape.weight_bytes,
        "kv_bytes_per_token": shape.kv_bytes_per_token,
        "steps": steps,
        "kv_bandwidth": bandwidth,
        "fit": {
            "dense": dataclasses.asdict(dense),
            "verify": dataclasses.asdict(verify),
            "verify_max_relative_error": max(fit_errors),
            **{f"draft_{mode}": dataclasses.asdict(m.draft) for mode, m in drafters.items()},
        },
        "profile": drafters["eager"].to_json(),
        "projection_settings": paper,
        "projection": projection,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_costs.json").write_text(json.dumps(result, indent=1))
    (args.out / "projection.md").write_text(_table(projection, alphas=(0.7, 0.8)))
    print(json.dumps(result["fit"], indent=1))
    print(_table(projection, alphas=(0.7, 0.8)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
