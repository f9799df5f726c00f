"""Check STD's draft step on a GPU where vLLM is not installed, and time it beside the dense and verify steps.

A decoder of Qwen2-VL-7B's language-model shape (random bf16 weights, rotary positions left out) reads and
writes a paged KV cache of 16-token blocks laid out as vLLM's GPU backends hold it (`[blocks, 16, Hkv, D]`
keys and values). Attention is vLLM's own Triton paged-attention kernel (`unified_attention`) where it can
be imported (vLLM installed, or its two kernel files carried in with `prepare`), else a pure-torch gather
that says so in the output. It is launched as vLLM's TRITON_ATTN backend launches it (split-KV scratch
for up to 32 single-token sequences). Step kinds:

- dense: one token per request over its whole context;
- verify: gamma + 1 tokens per request over its whole context, as vLLM 0.32's TRITON_ATTN launches it (its
  2D kernel) and packed (the query tokens as the heads of one split-KV row: FLASH_ATTN's reads);
- draft: one token per request, each layer reading its own compacted block table (K kept visual tokens
  plus the text), as STD's drafter does: replayed as one CUDA graph over persistent tables, lengths,
  positions and slots refreshed in place, as vLLM-style graph pieces with the KV write and attention
  launched between them (vllm-std's drafter today), and op by op;
- floor: a step over 15 tokens, the weights' own cost.

Checks (a failed one makes the exit status 1, after the timings): a draft step replayed, whole and in pieces,
after an in-place update of its inputs gives the logits of the same step run eagerly; the kernel equals the
pure-torch reference on a per-layer table; the cache is unchanged outside the true slots (checksums). Timings
use CUDA events; a step's bandwidth bound is the bytes it must read (weights, plus the KV it reads) over the
best copy bandwidth measured in the run. STD's speed-up at per-position acceptance 0.8 and 0.9 follows from
the measured steps at the run's gamma, and from vllm-std's cost model fitted to them at every gamma (a
projection from measured step costs, not a measurement of STD; `analyse` recomputes both from a report).

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
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from gpu_step_costs import Decoder, Shape, _table, _time, project

from vllm_std.cost_model import CostModel, fit_step_cost, fit_verify_cost

BLOCK = 16
SEQ_THRESHOLD_3D = 32  # vLLM 0.32's TRITON_ATTN: 128 programs / 4 KV heads; more sequences run the 2D kernel
SOFTMAX_SEGMENTS = 16
VERIFY_MODES = ("graph", "packed")
"""A verify step as vLLM 0.32's TRITON_ATTN launches it (its 2D kernel for any query of several tokens: one
program per request and KV head walks the whole context), and packed: each request's query tokens as the query
heads of one row of the split-KV (3D) kernel, reading the context once, as FLASH_ATTN packs GQA queries (a
timing proxy: the new tokens do not mask each other, which costs the same work)."""
DRAFT_MODES = ("graph", "piecewise", "eager")
"""A draft step replayed as one CUDA graph (what STD-owned full graphs give), as vLLM's piecewise graphs with
the KV write and attention launched between them (what vllm-std's drafter runs today), and op by op."""
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


def _version(package: str) -> str | None:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


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
        self._query_starts: dict[tuple[int, int], torch.Tensor] = {}
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}
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
        packed: bool = False,
    ) -> torch.Tensor:
        """Logits of every token: `tokens`/`slots` `[B * n]` (n query tokens per request), `tables`
        `[L, B, W]` physical blocks per layer, `seq_lens` `[B]` (the same in every layer)."""
        x = self.embed[tokens]
        for layer, table in enumerate(tables):
            q, k, v = self.project(x, layer)
            out = torch.empty_like(q)
            self.attend(q, k, v, out, layer, table, seq_lens, slots, max_len, packed)
            x = self.mlp(x, out, layer)
        return self.head(x)

    def project(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.shape
        q, k, v = (F.rms_norm(x, (s.hidden,)) @ self.layers[layer][0]).split(
            [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1
        )
        return q.reshape(-1, s.heads, s.head_dim), k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        layer: int,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        slots: torch.Tensor,
        max_len: int,
        packed: bool = False,
    ) -> None:
        """The KV write into the true slots and paged attention into `out`: the two ops vLLM's piecewise
        graphs leave outside (`unified_kv_cache_update`, `unified_attention_with_output`)."""
        s = self.shape
        k_cache, v_cache = self.caches[layer]
        k_cache.view(-1, s.kv_heads, s.head_dim).index_copy_(0, slots, k.view(-1, s.kv_heads, s.head_dim))
        v_cache.view(-1, s.kv_heads, s.head_dim).index_copy_(0, slots, v.view(-1, s.kv_heads, s.head_dim))
        if self.kernel is None:
            out.copy_(gather_attention(q, k_cache, v_cache, table, seq_lens))
            return
        batch, n = table.shape[0], q.shape[0] // table.shape[0]
        result, group = out, s.heads // s.kv_heads
        if packed and n > 1:  # [B * n, kv * group, D] -> [B, kv * n * group, D]: one row per request
            q = q.view(batch, n, s.kv_heads, group, s.head_dim).transpose(1, 2).reshape(batch, -1, s.head_dim)
            out, n = torch.empty_like(q), 1
        self.kernel(
            q=q,
            k=k_cache,
            v=v_cache,
            out=out,
            cu_seqlens_q=self._starts(batch, n),
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
            seq_threshold_3D=SEQ_THRESHOLD_3D,
            num_par_softmax_segments=SOFTMAX_SEGMENTS,
            **self._segment_scratch(q.shape[1]),
        )
        if out is not result:
            result.copy_(
                out.view(batch, s.kv_heads, -1, group, s.head_dim).transpose(1, 2).reshape(result.shape)
            )

    def _segment_scratch(self, heads: int) -> dict[str, torch.Tensor]:
        """The 3D (split-KV) kernel's partial softmax buffers, as vLLM's Triton backend allocates them: one
        row per sequence up to the threshold (the kernel takes the 3D path only for single-token queries)."""
        if heads not in self._scratch:
            shape = (SEQ_THRESHOLD_3D, heads, SOFTMAX_SEGMENTS)
            self._scratch[heads] = {
                "softmax_segm_output": torch.empty(*shape, self.shape.head_dim, device=self.device),
                "softmax_segm_max": torch.empty(shape, device=self.device),
                "softmax_segm_expsum": torch.empty(shape, device=self.device),
            }
        return self._scratch[heads]

    def _starts(self, batch: int, n: int) -> torch.Tensor:
        """Query start offsets, made once per batch shape (a graph replays over the same tensor)."""
        key = (batch, n)
        if key not in self._query_starts:
            self._query_starts[key] = torch.arange(batch + 1, device=self.device, dtype=torch.int32) * n
        return self._query_starts[key]

    def mlp(self, x: torch.Tensor, out: torch.Tensor, layer: int) -> torch.Tensor:
        _, w_o, w_up, w_down = self.layers[layer]
        x = x + out.flatten(1) @ w_o
        gate, up = (F.rms_norm(x, (self.shape.hidden,)) @ w_up).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ w_down

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.shape.hidden,)) @ self.lm_head


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

    def __init__(self, model: PagedDecoder, inputs: Batch, graph: bool, packed: bool = False) -> None:
        self.model, self.inputs, self.packed = model, inputs, packed
        self.graph = None
        self.logits = self._run()  # warm-up (and, for a graph, the allocations outside the pool)
        if graph and model.device.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()

    def _run(self) -> torch.Tensor:
        b = self.inputs
        return self.model.forward(b.tokens, b.tables, b.seq_lens, b.slots, b.max_len, self.packed)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            self.logits = self._run()
        else:
            self.graph.replay()
        return self.logits


class PiecewiseStep:
    """A draft step as vllm-std runs it today under vLLM's piecewise CUDA graphs: the work between two
    attentions replayed as one graph per piece, the KV write and paged attention launched between them
    (eagerly where there is no GPU)."""

    def __init__(self, model: PagedDecoder, inputs: Batch) -> None:
        self.model, self.inputs = model, inputs
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.logits = model.forward(
            inputs.tokens, inputs.tables, inputs.seq_lens, inputs.slots, inputs.max_len
        )
        if model.device.type != "cuda":
            return
        layers, shape = len(model.layers), model.shape
        pool = torch.cuda.graph_pool_handle()
        self.outs = [
            model.embed.new_empty(inputs.tokens.shape[0], shape.heads, shape.head_dim) for _ in range(layers)
        ]
        self.qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        x = None
        for layer in range(layers + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                if layer == 0:
                    x = model.embed[inputs.tokens]
                else:
                    x = model.mlp(x, self.outs[layer - 1], layer - 1)
                if layer < layers:
                    self.qkv.append(model.project(x, layer))
                else:
                    self.logits = model.head(x)
            self.graphs.append(graph)

    def __call__(self) -> torch.Tensor:
        b, model = self.inputs, self.model
        if not self.graphs:
            self.logits = model.forward(b.tokens, b.tables, b.seq_lens, b.slots, b.max_len)
            return self.logits
        for layer, graph in enumerate(self.graphs):
            graph.replay()
            if layer < len(self.qkv):
                q, k, v = self.qkv[layer]
                model.attend(
                    q, k, v, self.outs[layer], layer, b.tables[layer], b.seq_lens, b.slots, b.max_len
                )
        return self.logits


def checks(model: PagedDecoder, shape: Shape, device: torch.device) -> dict:
    """The correctness checks at a small batch (the failed ones listed under "failed"): a draft step replayed
    after its inputs were updated in place equals it run eagerly, as one graph and as pieces; with vLLM's
    kernel, attention equals the pure-torch reference; a draft step changes the cache only in its true
    slots."""
    context, batch, kept = 40 * BLOCK + 5, 3, 16 * BLOCK

    def inputs(seed: int, grown: int = 0) -> Batch:
        return make_batch(shape, context + grown, batch, 1, kept, seed, device)

    results = {}
    with torch.inference_mode():
        for name, step_kind in (
            ("graph", lambda b: Step(model, b, graph=True)),
            ("piecewise", lambda b: PiecewiseStep(model, b)),
        ):
            first = inputs(1)
            step = step_kind(first)
            first.update(inputs(2, 3))  # other blocks, lengths, slots
            replayed = step().float().clone()
            del step
            # Run right after: the replay wrote the same KV into the same slots, nothing else moved.
            eager = Step(model, inputs(2, 3), graph=False)().float()
            results[f"{name}_vs_eager"] = _relative(replayed, eager)
        if model.kernel is not None:
            results["kernel_vs_torch"] = _kernel_vs_torch(model, inputs(4), shape)
        written = inputs(3)
        before = _row_checksums(model)
        Step(model, written, graph=False)
        changed = torch.cat(before) != torch.cat(_row_checksums(model))
        rows = model.caches[0][0].shape[0] * BLOCK
        true_slots = written.slots.long()[None, :] + rows * torch.arange(len(before), device=device)[:, None]
        changed[true_slots.flatten()] = False
        results["slots_changed_outside_true_slots"] = int(changed.sum())
    results["failed"] = [k for k, v in results.items() if v > (0 if k.startswith("slots") else 2e-2)]
    if results["failed"]:
        print(f"gpu_draft_check: FAILED {results['failed']}: {results}", flush=True)
    return results


def _kernel_vs_torch(model: PagedDecoder, inputs: Batch, shape: Shape) -> float:
    """vLLM's kernel against the pure-torch reference on one layer's per-layer table (the same query, cache
    and new KV): the whole model's logits would add the dtype's rounding of 28 layers to the comparison."""
    q = torch.randn(inputs.tokens.shape[0], shape.heads, shape.head_dim, device=model.device)
    q = q.to(model.caches[0][0].dtype)
    k, v = (torch.randn_like(q[:, : shape.kv_heads]).flatten(1) for _ in range(2))
    kernel, outs = model.kernel, []
    for attention in (kernel, None):
        model.kernel = attention
        out = torch.empty_like(q)
        model.attend(q, k, v, out, 0, inputs.tables[0], inputs.seq_lens, inputs.slots, inputs.max_len)
        outs.append(out.float())
    model.kernel = kernel
    return _relative(*outs)


def _row_checksums(model: PagedDecoder) -> list[torch.Tensor]:
    """One checksum per cache slot of every K and V cache (the bits, position-weighted), in chunks: a copy
    of a cache that fills most of the GPU does not fit beside it."""
    sums = []
    for cache in itertools.chain.from_iterable(model.caches):
        rows = cache.view(cache.shape[0] * BLOCK, -1).view(torch.int16)
        weights = torch.arange(1, rows.shape[1] + 1, device=rows.device, dtype=torch.int64)
        sums.append(torch.cat([(chunk.long() * weights).sum(dim=1) for chunk in rows.split(1 << 16)]))
    return sums


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
    parser.add_argument(
        "command",
        choices=("prepare", "run", "analyse"),
        help="analyse: recompute the speed-ups of the report at --out from its measured steps (no GPU)",
    )
    parser.add_argument("--kernel-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("gpu-draft-check.json"))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="16384,32768,131072")
    parser.add_argument("--max-cached-tokens", type=int, default=1 << 20, help="batch x context at most")
    parser.add_argument("--top-k", type=int, default=1024, help="kept visual tokens per layer (plus text)")
    parser.add_argument("--text", type=int, default=256, help="text tokens the drafter reads besides K")
    parser.add_argument("--gamma", type=int, default=4, help="verify steps check gamma + 1 tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--budget-s", type=float, default=420, help="start no new setting after this many seconds"
    )
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
    if args.command == "analyse":
        return analyse(json.loads(args.out.read_text()), args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
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
        "triton": _version("triton"),
        "attention": "vllm-triton" if kernel else "torch-gather",
        "dtype": args.dtype,
        "gamma": args.gamma,
    }
    try:
        report["checks"] = checks(model, shape, device)
    except Exception as exc:  # the kernel does not compile or capture with this Triton: say so, go on
        if model.kernel is None:
            raise
        report["kernel_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"vLLM's Triton kernel failed ({report['kernel_error']}); pure-torch attention", flush=True)
        model.kernel, report["attention"] = None, "torch-gather"
        report["checks"] = checks(model, shape, device)
    print(json.dumps(report), flush=True)
    bandwidth = copy_bandwidth(device, args.repeats)
    report["copy_bytes_per_second"] = bandwidth
    steps: list[dict] = []
    report["steps"] = steps
    with torch.inference_mode():
        for batch, context in settings:
            if time.monotonic() - started > args.budget_s:
                report.setdefault("skipped_after_budget", []).append([batch, context])
                continue
            sparse = args.top_k + args.text
            kinds = {
                "dense": (make_batch(shape, context, batch, 1, None, 0, device), ("graph",)),
                "verify": (make_batch(shape, context, batch, args.gamma + 1, None, 0, device), VERIFY_MODES),
                "draft": (make_batch(shape, context, batch, 1, sparse, 0, device), DRAFT_MODES),
            }
            if context == min(c for b, c in settings if b == batch):  # the weights' floor, once per batch
                kinds["floor"] = (make_batch(shape, BLOCK - 2, batch, 1, None, 0, device), ("graph",))
            for kind, (inputs, modes) in kinds.items():
                for mode in modes:
                    if mode == "piecewise":
                        step = PiecewiseStep(model, inputs)
                    else:
                        step = Step(model, inputs, graph=mode != "eager", packed=mode == "packed")
                    seconds = _time(lambda step=step: step().argmax(dim=-1).cpu(), device, args.repeats)
                    row = {"kind": kind, "mode": mode, "batch": batch, "seconds": seconds}
                    row["context"] = context if kind != "floor" else BLOCK - 2
                    row["read_context"] = int(inputs.seq_lens[0])
                    read = shape.weight_bytes + batch * row["read_context"] * shape.kv_bytes_per_token
                    row["bandwidth_bound_ratio"] = seconds / (read / bandwidth)
                    steps.append(row)
                    print(json.dumps(row), flush=True)
                    del step
            args.out.write_text(json.dumps(report, indent=2))  # what a killed run leaves
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report["seconds"] = time.monotonic() - started
    return analyse(report, args)


def analyse(report: dict, args: argparse.Namespace) -> int:
    """STD's speed-up from the measured steps: directly at the measured gamma (expected tokens per round over
    gamma draft steps plus one verify, against dense steps), and through vllm-std's cost model fitted to them
    at every gamma. Verify steps are the packed ones (the context read once, as FLASH_ATTN does): vLLM 0.32's
    TRITON_ATTN launch of them does not fit a cost model of bytes read (its 2D kernel's time follows its
    occupancy) and is published as measured. A failed check makes the exit status 1, after the timings."""
    steps, gamma, alphas = report["steps"], report.get("gamma", args.gamma), (0.8, 0.9)
    contexts, batches = (
        sorted({r["context"] for r in steps if r["kind"] == "dense"}),
        sorted({r["batch"] for r in steps}),
    )

    def rows(kind: str, mode: str = "graph") -> list[dict]:
        return [r for r in steps if r["kind"] == kind and r["mode"] == mode]

    def seconds(kind: str, mode: str, batch: int, context: int) -> float:
        return next(r["seconds"] for r in rows(kind, mode) if (r["batch"], r["context"]) == (batch, context))

    report["measured"] = [
        {
            "batch": batch,
            "context": context,
            "drafts": mode,
            "alpha": alpha,
            "gamma": gamma,
            "speedup": (1 - alpha ** (gamma + 1))
            / (1 - alpha)
            * seconds("dense", "graph", batch, context)
            / (gamma * seconds("draft", mode, batch, context) + seconds("verify", "packed", batch, context)),
        }
        for batch, context in sorted({(r["batch"], r["context"]) for r in rows("dense")})
        for mode in DRAFT_MODES
        for alpha in alphas
    ]
    dense_cost = fit_step_cost(
        [r["batch"] for r in rows("dense")],
        [r["context"] for r in rows("dense")],
        [r["seconds"] for r in rows("dense")],
    )
    checked = rows("dense") + rows("verify", "packed")  # a dense step is a verify step of gamma 0
    verify_cost = fit_verify_cost(
        [r["batch"] for r in checked],
        [r["context"] for r in checked],
        [gamma if r["kind"] == "verify" else 0 for r in checked],
        [r["seconds"] for r in checked],
    )
    report["gamma"], report["cost_model"], report["projection"] = gamma, {}, {}
    for mode in DRAFT_MODES:
        draft = rows("draft", mode)
        draft_cost = fit_step_cost(
            [r["batch"] for r in draft], [r["read_context"] for r in draft], [r["seconds"] for r in draft]
        )
        cost = CostModel(dense_cost, draft_cost, verify_cost)
        report["cost_model"][f"{mode} drafts"] = cost.to_json()
        report["projection"][f"{mode} drafts"] = project(
            cost, contexts, batches, args.top_k + args.text, list(alphas), 8
        )
    args.out.write_text(json.dumps(report, indent=2))
    print(_table(report["projection"], alphas))
    return 1 if report["checks"]["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
