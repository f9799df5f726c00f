"""Check STD's draft step on a GPU where vLLM is not installed, and time it beside the dense and verify steps.

A decoder of Qwen2-VL-7B's language-model shape (random bf16 weights, rotary positions left out) reads and
writes a paged KV cache of 16-token blocks laid out as vLLM's GPU backends hold it (`[blocks, 16, Hkv, D]`
keys and values). Attention is vLLM's own Triton paged-attention kernel (`unified_attention`) where it can
be imported (vLLM installed, or its two kernel files carried in with `prepare`), else a pure-torch gather
that says so in the output. Three kinds of step:

- dense: one token per request over its whole context;
- verify: gamma + 1 tokens per request over its whole context (how vLLM verifies drafts);
- draft: one token per request, each layer reading its own compacted block table (K kept visual tokens
  plus the text), as STD's drafter does; timed replayed as a CUDA graph over persistent tables, lengths,
  positions and slots refreshed in place, and launched op by op.

Checks (a failed check exits 1): a draft step replayed after an in-place update of its inputs gives the
logits of the same step run eagerly; with every block kept, a draft step gives the dense step's logits;
the cache is unchanged outside the true slots. Timings use CUDA events; the draft step's bandwidth bound
is the bytes it must read (weights, plus the kept KV) over the best copy bandwidth measured in the run.
vllm-std's cost model, fitted to the timings, projects STD's speed-up at per-position acceptance 0.8 and
0.9 (a projection from measured step costs, not a measurement of STD).

    python scripts/gpu_draft_check.py prepare --kernel-dir /tmp/std-kernels   # where vLLM is installed
    python scripts/gpu_draft_check.py run --kernel-dir /tmp/std-kernels --out gpu-draft-check.json
"""

import argparse
import dataclasses
import importlib
import inspect
import itertools
import json
import shutil
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from gpu_step_costs import Decoder, Shape, _table, _time, project

from vllm_std.cost_model import CostModel, fit_step_cost, fit_verify_cost

BLOCK = 16
KERNEL = "vllm.v1.attention.ops.triton_unified_attention"
KERNEL_FILES = ("triton_unified_attention.py", "triton_attention_helpers.py")

# ---------------------------------------------------------------------------------------- vLLM's kernel

STUBS = {
    "vllm/__init__.py": "",
    "vllm/envs.py": "VLLM_BATCH_INVARIANT = False\n",
    "vllm/logger.py": "import logging\n\ninit_logger = logging.getLogger\n",
    "vllm/triton_utils/__init__.py": "import triton\nimport triton.language as tl\n\nHAS_TRITON = True\n",
    "vllm/platforms/__init__.py": textwrap.dedent(
        """\
        import torch


        class _Platform:
            def fp8_dtype(self):
                return torch.float8_e4m3fn

            def is_device_capability_family(self, family):
                if not torch.cuda.is_available():
                    return False
                major, minor = torch.cuda.get_device_capability()
                return (10 * major + minor) // 10 == family // 10


        current_platform = _Platform()
        """
    ),
    "vllm/v1/__init__.py": "",
    "vllm/v1/attention/__init__.py": "",
    "vllm/v1/attention/ops/__init__.py": "",
}


def prepare(kernel_dir: Path) -> None:
    """Copies vLLM's Triton paged-attention kernel and its helpers out of the installed vLLM, with stubs for
    the five vLLM names they import, so that they load where vLLM is not installed (64 KB)."""
    from vllm.v1 import kv_cache_interface
    from vllm.v1.attention import ops

    for path, text in STUBS.items():
        (kernel_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (kernel_dir / path).write_text(text)
    for name in KERNEL_FILES:
        shutil.copy(Path(ops.__file__).parent / name, kernel_dir / "vllm/v1/attention/ops" / name)
    enum = inspect.getsource(kv_cache_interface.KVQuantMode)
    (kernel_dir / "vllm/v1/kv_cache_interface.py").write_text(
        f"import enum\nfrom enum import Enum, IntEnum\n\n\n{enum}"
    )


def load_kernel(kernel_dir: Path | None) -> Callable | None:
    """vLLM's `unified_attention`: from `kernel_dir` (prepared), else from an installed vLLM, else None."""
    if kernel_dir is not None:
        sys.path.insert(0, str(kernel_dir))
    try:
        kernel = importlib.import_module(KERNEL).unified_attention
        if not importlib.import_module("vllm.triton_utils").HAS_TRITON:  # vLLM turned Triton off (a CPU)
            raise RuntimeError("vLLM has Triton turned off on this platform")
        return kernel
    except Exception as exc:  # no vLLM, no triton, or triton too old for the kernel
        print(
            f"vLLM's Triton kernel not loaded ({type(exc).__name__}: {exc}); pure-torch attention", flush=True
        )
        return None


# ------------------------------------------------------------------------------------------ the decoder


def gather_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """Pure-torch paged attention with FlashAttention's semantics for `n` query tokens per request (the last
    `n` of its `seq_lens` keys, causal), graph-safe: fixed shapes, lengths only in the mask."""
    batch, width = table.shape
    n = q.shape[0] // batch
    keys = k_cache[table.long()].flatten(1, 2)  # [B, W * BLOCK, Hkv, D]
    values = v_cache[table.long()].flatten(1, 2)
    group = q.shape[1] // keys.shape[2]
    keys, values = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (keys, values))
    position = seq_lens[:, None] - n + torch.arange(n, device=q.device)[None, :]  # [B, n]
    visible = torch.arange(width * BLOCK, device=q.device)[None, None, :] <= position[:, :, None]
    query = q.view(batch, n, q.shape[1], q.shape[2]).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None])
    return out.transpose(1, 2).reshape(q.shape)


class PagedDecoder(Decoder):
    """The work of a decoder step over a paged cache: projections, KV write into the true slots, paged
    attention through a per-layer block table, gated MLP, logits (weights: `gpu_step_costs.Decoder`'s)."""

    def __init__(
        self, shape: Shape, num_blocks: int, device: torch.device, kernel: Callable | None, dtype: torch.dtype
    ) -> None:
        super().__init__(shape, device)
        self.kernel = kernel
        self.layers = [tuple(w.to(dtype) for w in layer) for layer in self.layers]
        self.lm_head = self.lm_head.to(dtype)
        self.embed = torch.randn(shape.vocab, shape.hidden, dtype=dtype, device=device)
        cache_shape = (num_blocks, BLOCK, shape.kv_heads, shape.head_dim)
        self.caches = [
            (
                torch.randn(cache_shape, dtype=dtype, device=device),
                torch.randn(cache_shape, dtype=dtype, device=device),
            )
            for _ in range(shape.layers)
        ]

    def forward(
        self,
        tokens: torch.Tensor,
        tables: torch.Tensor,
        seq_lens: torch.Tensor,
        slots: torch.Tensor,
        max_len: int,
    ) -> torch.Tensor:
        """Logits of every token: `tokens`/`slots` `[B * n]` (n query tokens per request), `tables`
        `[L, B, W]` physical blocks per layer, `seq_lens` `[B]` (the same in every layer)."""
        s = self.shape
        x = self.embed[tokens]
        batch, n = tables.shape[1], tokens.shape[0] // tables.shape[1]
        starts = torch.arange(batch + 1, device=self.device, dtype=torch.int32) * n
        for (w_qkv, w_o, w_up, w_down), (k_cache, v_cache), table in zip(
            self.layers, self.caches, tables, strict=True
        ):
            q, k, v = (F.rms_norm(x, (s.hidden,)) @ w_qkv).split(
                [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1
            )
            k_cache.view(-1, s.kv_heads, s.head_dim).index_copy_(0, slots, k.view(-1, s.kv_heads, s.head_dim))
            v_cache.view(-1, s.kv_heads, s.head_dim).index_copy_(0, slots, v.view(-1, s.kv_heads, s.head_dim))
            q = q.view(-1, s.heads, s.head_dim)
            if self.kernel is None:
                out = gather_attention(q, k_cache, v_cache, table, seq_lens)
            else:
                out = torch.empty_like(q)
                self.kernel(
                    q=q,
                    k=k_cache,
                    v=v_cache,
                    out=out,
                    cu_seqlens_q=starts,
                    max_seqlen_q=n,
                    seqused_k=seq_lens,
                    max_seqlen_k=max_len,
                    softmax_scale=s.head_dim**-0.5,
                    causal=True,
                    window_size=(-1, -1),
                    block_table=table,
                    softcap=0,
                    q_descale=None,
                    k_descale=None,
                    v_descale=None,
                )
            x = x + out.flatten(1) @ w_o
            gate, up = (F.rms_norm(x, (s.hidden,)) @ w_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w_down
        return F.rms_norm(x, (s.hidden,)) @ self.lm_head


# ------------------------------------------------------------------------------------------ the steps


@dataclasses.dataclass
class Batch:
    """Persistent step inputs (a CUDA graph replays over their addresses; updates go in place)."""

    tokens: torch.Tensor
    tables: torch.Tensor  # [L, B, W]
    seq_lens: torch.Tensor
    slots: torch.Tensor
    max_len: int

    def update(self, other: "Batch") -> None:
        for name in ("tokens", "tables", "seq_lens", "slots"):
            getattr(self, name).copy_(getattr(other, name))


def make_batch(
    shape: Shape, context: int, batch: int, n: int, kept: int | None, seed: int, device: torch.device
) -> Batch:
    """`batch` requests of `context` cached tokens each, in disjoint blocks (block 0 unused), `n` new tokens
    at the end. `kept`: the drafter's view, every layer keeping `kept` tokens' worth of other prompt blocks
    (chosen per layer at random) before the blocks that hold the new tokens; None: every block."""
    generator = torch.Generator().manual_seed(seed)
    total = -(-(context + n) // BLOCK)
    tail = -(-(context % BLOCK + n) // BLOCK)  # blocks holding the new tokens
    head = total - tail
    keep = head if kept is None else min(head, kept // BLOCK)
    tables = torch.zeros(shape.layers, batch, keep + tail, dtype=torch.int32)
    for row in range(batch):
        physical = 1 + row * total + torch.arange(total, dtype=torch.int32)
        for layer in range(shape.layers):
            chosen = torch.randperm(head, generator=generator)[:keep].sort().values
            tables[layer, row] = physical[torch.cat([chosen, torch.arange(head, total)])]
    positions = context + torch.arange(n)
    slots = torch.stack([(1 + row * total) * BLOCK + positions for row in range(batch)]).flatten()
    seq_lens = torch.full((batch,), keep * BLOCK + context % BLOCK + n, dtype=torch.int32)
    tokens = torch.randint(shape.vocab, (batch * n,), generator=generator)
    # The kernel's longest length is fixed at capture: the table's width bounds every update of it.
    return Batch(
        tokens.to(device), tables.to(device), seq_lens.to(device), slots.to(device), (keep + tail) * BLOCK
    )


class Step:
    """One step kind, run eagerly or replayed as a CUDA graph captured over a persistent `Batch`."""

    def __init__(self, model: PagedDecoder, inputs: Batch, graph: bool) -> None:
        self.model, self.inputs = model, inputs
        self.graph = None
        self.logits = self._run()  # warm-up (and, for a graph, the allocations outside the pool)
        if graph and model.device.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()

    def _run(self) -> torch.Tensor:
        b = self.inputs
        return self.model.forward(b.tokens, b.tables, b.seq_lens, b.slots, b.max_len)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            self.logits = self._run()
        else:
            self.graph.replay()
        return self.logits


def checks(model: PagedDecoder, shape: Shape, device: torch.device) -> dict[str, float]:
    """The correctness checks at a small batch (raises SystemExit on a failure): a draft step replayed after
    its inputs were updated in place equals it run eagerly; with vLLM's kernel, the draft step equals the
    pure-torch reference; a draft step changes the cache only in its true slots."""
    context, batch, kept = 40 * BLOCK + 5, 3, 16 * BLOCK
    results = {}
    with torch.inference_mode():
        first = make_batch(shape, context, batch, 1, kept, 1, device)
        step = Step(model, first, graph=True)
        first.update(
            make_batch(shape, context + 3, batch, 1, kept, 2, device)
        )  # other blocks, lengths, slots
        replayed = step().float().clone()
        eager = Step(model, make_batch(shape, context + 3, batch, 1, kept, 2, device), graph=False)()
        results["graph_vs_eager"] = _relative(replayed, eager.float())
        if model.kernel is not None:
            kernel, model.kernel = model.kernel, None
            reference = Step(model, make_batch(shape, context + 3, batch, 1, kept, 2, device), graph=False)()
            model.kernel = kernel
            results["kernel_vs_torch"] = _relative(eager.float(), reference.float())
        inputs = make_batch(shape, context, batch, 1, kept, 3, device)
        before = [(k.clone(), v.clone()) for k, v in model.caches]
        Step(model, inputs, graph=False)
        changed = 0
        for (k, v), (k0, v0) in zip(model.caches, before, strict=True):
            for now, then in ((k, k0), (v, v0)):
                diff = (now != then).view(-1, shape.kv_heads * shape.head_dim).any(dim=1)
                diff[inputs.slots.long()] = False
                changed += int(diff.sum())
        results["slots_changed_outside_true_slots"] = changed
    failed = [k for k, v in results.items() if v > (0 if k.startswith("slots") else 2e-2)]
    if failed:
        raise SystemExit(f"gpu_draft_check: FAILED {failed}: {results}")
    return results


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1))


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Best bytes per second of a large device copy (read plus write)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / _time(lambda: dst.copy_(src), device, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "run"))
    parser.add_argument("--kernel-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("gpu-draft-check.json"))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="16384,32768,131072")
    parser.add_argument("--max-cached-tokens", type=int, default=1 << 20, help="batch x context at most")
    parser.add_argument("--top-k", type=int, default=1024, help="kept visual tokens per layer (plus text)")
    parser.add_argument("--text", type=int, default=256, help="text tokens the drafter reads besides K")
    parser.add_argument("--gamma", type=int, default=4, help="verify steps check gamma + 1 tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a small shape, to try the script on a CPU")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16"),
        help="float16 for Triton's CPU interpreter",
    )
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.kernel_dir or Path("std-kernels"))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(2, 256, 4, 2, 64, 512, 1000) if args.tiny else Shape()
    kernel = load_kernel(args.kernel_dir)
    torch.manual_seed(0)
    batches, contexts = ([int(x) for x in v.split(",")] for v in (args.batches, args.contexts))
    settings = [(b, c) for b, c in itertools.product(batches, contexts) if b * c <= args.max_cached_tokens]
    most = max(b * (-(-(c + args.gamma + 1) // BLOCK)) for b, c in settings)
    model = PagedDecoder(shape, 1 + max(most, 3 * 64), device, kernel, getattr(torch, args.dtype))
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "attention": "vllm-triton" if kernel else "torch-gather",
        "dtype": args.dtype,
        "checks": checks(model, shape, device),
    }
    bandwidth = copy_bandwidth(device, args.repeats)
    report["copy_bytes_per_second"] = bandwidth
    steps = []
    with torch.inference_mode():
        for batch, context in settings:
            sparse = args.top_k + args.text
            kinds = {
                "dense": (make_batch(shape, context, batch, 1, None, 0, device), ("graph",)),
                "verify": (make_batch(shape, context, batch, args.gamma + 1, None, 0, device), ("graph",)),
                "draft": (make_batch(shape, context, batch, 1, sparse, 0, device), ("graph", "eager")),
            }
            for kind, (inputs, modes) in kinds.items():
                for mode in modes:
                    step = Step(model, inputs, graph=mode == "graph")
                    seconds = _time(lambda step=step: step().argmax(dim=-1).cpu(), device, args.repeats)
                    row = {"kind": kind, "mode": mode, "batch": batch, "context": context, "seconds": seconds}
                    if kind == "draft":
                        row["read_context"] = int(inputs.seq_lens[0])
                        read = shape.weight_bytes + batch * row["read_context"] * shape.kv_bytes_per_token
                        row["bandwidth_bound_ratio"] = seconds / (read / bandwidth)
                    steps.append(row)
                    print(json.dumps(row), flush=True)
                    del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["steps"] = steps

    def graph_rows(kind: str) -> list[dict]:
        return [r for r in steps if r["kind"] == kind and r["mode"] == "graph"]

    dense, draft, verify = graph_rows("dense"), graph_rows("draft"), graph_rows("verify")
    checked = dense + verify  # a dense step is a verify step of gamma 0
    cost = CostModel(
        fit_step_cost(
            [r["batch"] for r in dense], [r["context"] for r in dense], [r["seconds"] for r in dense]
        ),
        fit_step_cost(
            [r["batch"] for r in draft], [r["read_context"] for r in draft], [r["seconds"] for r in draft]
        ),
        fit_verify_cost(
            [r["batch"] for r in checked],
            [r["context"] for r in checked],
            [args.gamma if r["kind"] == "verify" else 0 for r in checked],
            [r["seconds"] for r in checked],
        ),
    )
    report["cost_model"] = cost.to_json()
    report["projection"] = project(cost, contexts, batches, args.top_k + args.text, [0.8, 0.9], 8)
    args.out.write_text(json.dumps(report, indent=2))
    print(_table({"graph draft steps": report["projection"]}, (0.8, 0.9)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
