"""STD's GPU attention adapters (TRITON_ATTN, FLASH_ATTN), checked on this CPU with vLLM's own code.

vLLM's Triton paged-attention kernel and its `TritonAttentionImpl` (forward and KV write) run here under
Triton's interpreter (`TRITON_INTERPRET=1`, with `vllm.triton_utils` re-enabled: vLLM turns Triton off on a
CPU). A pure-torch paged-attention reference with FlashAttention's `block_table` / `seqused_k` /
`cu_seqlens_q` semantics is anchored to that kernel, then checks the metadata the FLASH_ATTN adapter builds
(FlashAttention's kernels themselves need a GPU). The metadata comes from vLLM's real builders.

Shapes: the tiny fixture's GQA (4 query heads on 2 KV heads of 32), GPU block size 16, three requests of
different lengths, each with a partial last block."""

import dataclasses
import functools
import importlib
import importlib.machinery
import inspect
import re
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from vllm_std.backends import adapter_for
from vllm_std.backends.base import split_cache_keys
from vllm_std.draft_graphs import (
    MAX_GRAPH_BATCH,
    GraphInputs,
    agreed,
    full_graphs_allowed,
    graph_sizes,
    padded_size,
)
from vllm_std.draft_step import DraftRequest, DraftRound
from vllm_std.fixtures.models import tiny_model
from vllm_std.selection import RequestSelection

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 4, 2, 32, 16
NUM_LAYERS, NUM_BLOCKS = 2, 24
SCALE = HEAD_SIZE**-0.5
SEQ_LENS = [70, 37, 5]  # tokens in the cache per request (with the new ones), each ending inside a block


# ------------------------------------------------------------------------------------------ the reference


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal paged attention as FlashAttention reads it: request `i`'s queries `query_start_loc[i:i+2]` are
    the last tokens of its `seq_lens[i]` keys, which are token by token the blocks `block_table[i]` of
    `key_cache` `[blocks, block_size, Hkv, D]`, in table order."""
    out = torch.empty_like(query)
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start_loc[i].item(), query_start_loc[i + 1].item()
        blocks = block_table[i, : -(-seq_len // block_size)].long()
        keys = key_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        values = value_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", query[start:end].double(), keys.double()) * scale
        first = seq_len - (end - start)  # position of the first query
        visible = torch.arange(seq_len)[None, :] <= first + torch.arange(end - start)[:, None]
        weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", weights, values.double()).to(query.dtype)
    return out


def split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value caches `[blocks, block_size, Hkv, D]` of vLLM's logical `[blocks, Hkv, block_size,
    2 * D]` layer cache, as the GPU backends split it."""
    return kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)


# ----------------------------------------------------------------------------------- vLLM's Triton on CPU


@pytest.fixture(scope="module")
def triton_cpu() -> Iterator[types.SimpleNamespace]:
    yield from interpreted_triton()


def interpreted_triton() -> Iterator[types.SimpleNamespace]:
    """vLLM's Triton attention modules, imported with Triton on and interpreted."""
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as triton_utils

    if not triton.knobs.runtime.interpret:
        pytest.fail(
            "TRITON_INTERPRET=1 must be set before triton is first imported (tests/conftest.py sets it)"
        )
    modules = [
        "vllm.v1.attention.ops.triton_attention_helpers",
        "vllm.v1.attention.ops.triton_unified_attention",
        "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
        "vllm.v1.attention.backends.triton_attn",
    ]
    # First as vLLM loads them on a CPU (Triton off), so that everything they import is loaded that way
    # too; then these four again with Triton on; then Triton off again for every later import and test.
    for name in modules:
        importlib.import_module(name)
    names = ("HAS_TRITON", "triton", "tl", "tldevice")
    saved = {name: getattr(triton_utils, name) for name in names}
    triton_utils.HAS_TRITON, triton_utils.triton, triton_utils.tl, triton_utils.tldevice = (
        True,
        triton,
        tl,
        tldevice,
    )
    try:
        loaded = {name: importlib.reload(sys.modules[name]) for name in modules}
    finally:
        for name, value in saved.items():
            setattr(triton_utils, name, value)
    yield types.SimpleNamespace(backend=loaded["vllm.v1.attention.backends.triton_attn"])
    for name in modules:  # vLLM's own CPU modules back for the tests after these
        importlib.reload(sys.modules[name])


@pytest.fixture(scope="module")
def vllm_config() -> Any:
    return tiny_vllm_config()


def tiny_vllm_config() -> Any:
    """A resolved engine config of the tiny fixture (its heads are the shapes above)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(tiny_model("qwen2_vl")), max_model_len=4096).create_engine_config()


def builder(backend_module: Any, vllm_config: Any) -> Any:
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32
    )
    names = [f"layers.{i}.attn" for i in range(NUM_LAYERS)]
    cls = next(
        v
        for k, v in vars(backend_module).items()
        if k.endswith("MetadataBuilder") and k != "AttentionMetadataBuilder"
    )
    with set_current_vllm_config(vllm_config):
        return cls(spec, names, vllm_config, torch.device("cpu"))


@dataclasses.dataclass
class Batch:
    """Three requests of one new token each (a draft step), a random paged cache, per-layer compacted
    tables that keep some blocks of each prompt."""

    kv_cache: torch.Tensor  # [blocks, Hkv, block_size, 2 * D]
    query: torch.Tensor
    tables: torch.Tensor  # [L, B, W] compacted physical tables
    seq_lens: torch.Tensor  # [B] compacted lengths (the same in every layer)
    dense_table: torch.Tensor  # [B, W] every block
    dense_lens: torch.Tensor
    slots: torch.Tensor  # [B] true slots of the new tokens


def draft_batch(seed: int = 0, keep_all: bool = False) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, generator=generator)
    query = torch.randn(len(SEQ_LENS), NUM_HEADS, HEAD_SIZE, generator=generator)
    physical = (
        torch.randperm(NUM_BLOCKS - 1, generator=generator)[: sum(-(-n // BLOCK_SIZE) for n in SEQ_LENS)] + 1
    )
    width = max(-(-n // BLOCK_SIZE) for n in SEQ_LENS)
    dense_table = torch.zeros(len(SEQ_LENS), width, dtype=torch.int32)
    tables = torch.zeros(NUM_LAYERS, len(SEQ_LENS), width, dtype=torch.int32)
    seq_lens, slots, used = [], [], 0
    for row, n in enumerate(SEQ_LENS):
        count = -(-n // BLOCK_SIZE)
        blocks = physical[used : used + count].int()
        used += count
        dense_table[row, :count] = blocks
        # Each layer keeps other full blocks before the last (which holds the new token): one of them is
        # dropped per layer where there are at least two.
        kept = [list(range(count - 1)) for _ in range(NUM_LAYERS)]
        if not keep_all and count > 2:
            for layer in range(NUM_LAYERS):
                del kept[layer][layer % (count - 1)]
        for layer in range(NUM_LAYERS):
            row_blocks = blocks[[*kept[layer], count - 1]]
            tables[layer, row, : row_blocks.shape[0]] = row_blocks
        seq_lens.append((len(kept[0])) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE + 1)
        slots.append(int(blocks[-1]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE)
    return Batch(
        kv_cache,
        query,
        tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        dense_table,
        torch.tensor(SEQ_LENS, dtype=torch.int32),
        torch.tensor(slots),
    )


def common(batch: Batch, table: torch.Tensor, seq_lens: torch.Tensor) -> Any:
    from vllm.v1.attention.backend import CommonAttentionMetadata

    num = seq_lens.shape[0]
    query_start_loc = torch.arange(num + 1, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        query_start_loc_cpu=query_start_loc,
        seq_lens=seq_lens,
        num_reqs=num,
        num_actual_tokens=num,
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=table,
        slot_mapping=batch.slots,
        causal=True,
    )


def reference_for_layer(batch: Batch, layer: int) -> torch.Tensor:
    key_cache, value_cache = split(batch.kv_cache)
    starts = torch.arange(len(SEQ_LENS) + 1)
    return paged_attention(
        batch.query, key_cache, value_cache, batch.tables[layer], batch.seq_lens, starts, SCALE
    )


def test_reference_is_dense_attention_over_the_kept_blocks() -> None:
    """The reference itself: reading a compacted table equals attention over the kept blocks' keys gathered
    into one contiguous sequence."""
    batch = draft_batch()
    key_cache, value_cache = split(batch.kv_cache)
    got = reference_for_layer(batch, 1)
    for row in range(len(SEQ_LENS)):
        n = int(batch.seq_lens[row])
        blocks = batch.tables[1, row, : -(-n // BLOCK_SIZE)].long()
        keys = key_cache[blocks].flatten(0, 1)[:n].repeat_interleave(2, dim=1)
        values = value_cache[blocks].flatten(0, 1)[:n].repeat_interleave(2, dim=1)
        weights = (torch.einsum("hd,khd->hk", batch.query[row], keys) * SCALE).softmax(dim=-1)
        torch.testing.assert_close(got[row], torch.einsum("hk,khd->hd", weights, values))


LAYER_NAMES = [f"layers.{i}.attn" for i in range(NUM_LAYERS)]


def triton_impl(triton_cpu: types.SimpleNamespace) -> Any:
    return triton_cpu.backend.TritonAttentionImpl(
        NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, None, None, "auto"
    )


def scales() -> types.SimpleNamespace:
    """The per-layer quantization scales the impl reads (1: an unquantized cache)."""
    one = torch.ones(())
    return types.SimpleNamespace(_q_scale=one, _k_scale=one, _v_scale=one)


def triton_forward(impl: Any, batch: Batch, metadata: Any) -> torch.Tensor:
    output = torch.empty_like(batch.query)
    return impl.forward(scales(), batch.query, None, None, batch.kv_cache, metadata, output)


def test_triton_views_read_their_own_blocks(triton_cpu: types.SimpleNamespace, vllm_config: Any) -> None:
    """vLLM's `TritonAttentionImpl` (its unified Triton kernel, interpreted) with the per-layer metadata the
    TRITON_ATTN adapter builds: each layer reads exactly its kept blocks, in GQA, for requests of different
    lengths with partial last blocks, on the kernel's 2D and 3D (split-softmax) paths."""
    impl = triton_impl(triton_cpu)
    batch = draft_batch()
    triton_builder = builder(triton_cpu.backend, vllm_config)
    adapter = adapter_for("TRITON_ATTN")
    for threshold in (1, 64):  # batch 3 >= 1: the 2D kernel; 3 < 64: the 3D kernel
        triton_builder.seq_threshold_3D = threshold
        metadata = adapter.sparse_metadata(
            triton_builder, common(batch, batch.tables[0], batch.seq_lens), batch.tables, LAYER_NAMES
        )
        outs = [triton_forward(impl, batch, metadata[name]) for name in LAYER_NAMES]
        for layer, out in enumerate(outs):
            torch.testing.assert_close(out, reference_for_layer(batch, layer), atol=2e-5, rtol=2e-5)
        assert not torch.allclose(outs[0], outs[1])  # the layers did read different blocks


def test_triton_view_keeping_every_block_is_the_dense_step(
    triton_cpu: types.SimpleNamespace, vllm_config: Any
) -> None:
    """With every block kept, the adapter's views give the dense step's result, bit for bit."""
    impl = triton_impl(triton_cpu)
    batch = draft_batch(seed=1, keep_all=True)
    assert torch.equal(batch.tables[0], batch.dense_table) and torch.equal(batch.seq_lens, batch.dense_lens)
    triton_builder = builder(triton_cpu.backend, vllm_config)
    dense = triton_builder.build(0, common(batch, batch.dense_table, batch.dense_lens))
    views = adapter_for("TRITON_ATTN").sparse_metadata(
        triton_builder, common(batch, batch.tables[0], batch.seq_lens), batch.tables, LAYER_NAMES
    )
    expected = triton_forward(impl, batch, dense)
    for name in LAYER_NAMES:
        assert torch.equal(triton_forward(impl, batch, views[name]), expected)


def test_triton_kv_write_lands_in_the_true_slots_only(triton_cpu: types.SimpleNamespace) -> None:
    """vLLM's Triton KV write, given a draft step's true slots: those slots (and nothing else) change, and
    the TRITON_ATTN / FLASH_ATTN adapters read the keys back from them (`read_keys`, prefill scoring)."""
    impl = triton_impl(triton_cpu)
    batch = draft_batch(seed=2)
    before = batch.kv_cache.clone()
    key = torch.randn(len(SEQ_LENS), NUM_KV_HEADS, HEAD_SIZE)
    value = torch.randn(len(SEQ_LENS), NUM_KV_HEADS, HEAD_SIZE)
    capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *args: (9, 0)  # asked by the write's launcher; no GPU here
    try:
        impl.do_kv_cache_update(scales(), key, value, batch.kv_cache, batch.slots)
    finally:
        torch.cuda.get_device_capability = capability
    key_cache, value_cache = split(batch.kv_cache)
    flat_keys, flat_values = key_cache.flatten(0, 1), value_cache.flatten(0, 1)
    torch.testing.assert_close(flat_keys[batch.slots], key, atol=0, rtol=0)
    torch.testing.assert_close(flat_values[batch.slots], value, atol=0, rtol=0)
    changed = (batch.kv_cache != before).transpose(1, 2).flatten(0, 1).any(dim=(1, 2))
    assert torch.equal(torch.nonzero(changed).flatten(), batch.slots.sort().values)
    for row, n in enumerate(SEQ_LENS):
        for name in ("TRITON_ATTN", "FLASH_ATTN"):
            keys = adapter_for(name).read_keys(None, batch.kv_cache, batch.dense_table[row].long(), n)
            assert torch.equal(keys[-1], key[row])
            assert torch.equal(keys, split_cache_keys(batch.kv_cache, batch.dense_table[row].long(), n))
        assert torch.equal(keys[:-1], key_cache[batch.dense_table[row].long()].flatten(0, 1)[: n - 1])


def test_flash_attention_views_read_their_own_blocks(vllm_config: Any) -> None:
    """The FLASH_ATTN adapter's per-layer metadata, built by vLLM's `FlashAttentionMetadataBuilder` from CPU
    tensors and read by the reference as FlashAttention reads it (`block_table`, `seq_lens` as `seqused_k`,
    `query_start_loc` as `cu_seqlens_q`): each layer reads its kept blocks; the drafting build leaves the
    FA3 ahead-of-time schedule (which the target's CUDA graphs replay) alone."""
    from vllm.v1.attention.backends import flash_attn

    batch = draft_batch(seed=3)
    fa_builder = builder(flash_attn, vllm_config)
    metadata = adapter_for("FLASH_ATTN").sparse_metadata(
        fa_builder, common(batch, batch.tables[0], batch.seq_lens), batch.tables, LAYER_NAMES
    )
    key_cache, value_cache = split(batch.kv_cache)
    for layer, name in enumerate(LAYER_NAMES):
        md = metadata[name]
        assert isinstance(md, flash_attn.FlashAttentionMetadata)
        assert md.scheduler_metadata is None
        got = paged_attention(
            batch.query, key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc, SCALE
        )
        torch.testing.assert_close(got, reference_for_layer(batch, layer))
        assert torch.equal(md.block_table, batch.tables[layer])
    assert metadata[LAYER_NAMES[0]].slot_mapping is metadata[LAYER_NAMES[1]].slot_mapping


# ------------------------------------------------------------------------ STD's own full graphs


GRAPH_SIZE, GRAPH_BLOCKS = 4, 8  # rows and blocks per row of the captured inputs (three rows draft)


def graph_inputs() -> GraphInputs:
    tables = torch.zeros(NUM_LAYERS, GRAPH_SIZE + 2, GRAPH_BLOCKS, dtype=torch.int32)
    return GraphInputs(GRAPH_SIZE, tables[:, :GRAPH_SIZE])  # the rows of a larger size's buffer, as shared


def graph_steps() -> Iterator[tuple[Batch, list[int]]]:
    """Two rounds of other blocks and lengths: every row drafting, then one whose row 1 has stopped."""
    yield draft_batch(seed=4), [0, 1, 2]
    yield draft_batch(seed=5), [0, 2]


def load(inputs: GraphInputs, batch: Batch, active: list[int]) -> torch.Tensor:
    """The round's tables and a step of its `active` rows into `inputs`; their queries, packed and padded."""
    inputs.load_round(batch.tables)
    inputs.load_step(
        active,
        [int(batch.seq_lens[i]) for i in active],
        [int(batch.slots[i]) for i in active],
        list(range(len(active))),
        torch.tensor(active) + 100,
    )
    query = torch.zeros(GRAPH_SIZE, NUM_HEADS, HEAD_SIZE)
    query[: len(active)] = batch.query[active]
    return query


def test_graph_inputs_keep_their_addresses_and_pad_rows_to_nothing() -> None:
    """The inputs a full graph captured are refreshed in place: same addresses every step and round; rows
    that stop drafting or pad the batch query nothing (a repeated offset), over a length-0 view, and write
    to slot -1; queries are packed in row order."""
    inputs = graph_inputs()
    tensors = (
        inputs.tables,
        inputs.seq_lens,
        inputs.query_start_loc,
        inputs.slots,
        inputs.positions,
        inputs.tokens,
    )
    addresses = [t.data_ptr() for t in tensors]
    for batch, active in graph_steps():
        load(inputs, batch, active)
        assert [t.data_ptr() for t in tensors] == addresses
        lengths = [int(batch.seq_lens[i]) if i in active else 0 for i in range(GRAPH_SIZE)]
        assert inputs.seq_lens.tolist() == lengths
        ends = [sum(1 for i in active if i < row) for row in range(GRAPH_SIZE + 1)]
        assert inputs.query_start_loc.tolist() == ends
        padding = GRAPH_SIZE - len(active)
        assert inputs.slots.tolist() == [int(batch.slots[i]) for i in active] + [-1] * padding
        assert inputs.tokens.tolist() == [i + 100 for i in active] + [0] * padding
        assert torch.equal(inputs.tables[:, :3, : batch.tables.shape[2]], batch.tables)
    with pytest.raises(ValueError, match="exceeds the graph's 4 x 8"):
        inputs.load_round(torch.zeros(NUM_LAYERS, 5, 2, dtype=torch.int32))


def test_draft_batches_pad_to_the_smallest_captured_size() -> None:
    """The sizes captured: vLLM's own below the largest draft batch, and that batch: at most 64 rows, the
    engine's most requests, and vLLM's own largest capture size (up to which FLASH_ATTN bounds its splits);
    none where vLLM captures none. A round pads to the smallest size that holds it, and one above the largest
    takes the piecewise path."""
    assert graph_sizes([1, 2, 4, 8, 16, 24, 512], max_num_seqs=20, max_capture_size=512) == [
        1,
        2,
        4,
        8,
        16,
        20,
    ]
    assert graph_sizes([1, 2, 4, 8, 512], max_num_seqs=256, max_capture_size=512) == [
        1,
        2,
        4,
        8,
        MAX_GRAPH_BATCH,
    ]
    assert graph_sizes([1, 2, 4, 8], max_num_seqs=256, max_capture_size=8) == [1, 2, 4, 8]
    assert graph_sizes([], max_num_seqs=256, max_capture_size=None) == []
    sizes = [1, 2, 4, 8]
    assert [padded_size(sizes, rows) for rows in (1, 3, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, None]


def test_full_graphs_only_where_the_backend_and_the_engine_allow_them() -> None:
    """On CUDA, FLASH_ATTN or TRITON_ATTN, in an engine that captures graphs; FLASH_ATTN only beside vLLM's
    own full graphs (vLLM's default), the only engines in which its builder bounds FlashAttention's splits."""
    from vllm.config import CUDAGraphMode

    default = CUDAGraphMode.FULL_AND_PIECEWISE
    assert full_graphs_allowed("cuda", "FLASH_ATTN", False, default)
    assert full_graphs_allowed("cuda", "TRITON_ATTN", False, CUDAGraphMode.PIECEWISE)
    assert full_graphs_allowed("cuda", "FLASH_ATTN", False, CUDAGraphMode.FULL_DECODE_ONLY)
    assert not full_graphs_allowed("cuda", "FLASH_ATTN", False, CUDAGraphMode.PIECEWISE)
    assert not full_graphs_allowed("cuda", "TRITON_ATTN", False, CUDAGraphMode.NONE)
    assert not full_graphs_allowed("cuda", "TRITON_ATTN", True, default)
    assert not full_graphs_allowed("cuda", "FLASHINFER", False, default)
    assert not full_graphs_allowed("cpu", "TRITON_ATTN", False, default)


def test_a_capture_that_fails_on_one_rank_stops_every_rank() -> None:
    """The ranks agree after each captured size: a rank whose own capture passed raises too when another's
    failed (their next warm-up would wait in a collective for it), and one whose capture failed raises
    its own error."""
    done = []
    agreed(lambda failed: failed, lambda: done.append(1))
    with pytest.raises(RuntimeError, match="failed on another tensor-parallel rank"):
        agreed(lambda failed: True, lambda: done.append(2))
    assert done == [1, 2]

    def fails() -> None:
        raise ValueError("operation not permitted when stream is capturing")

    with pytest.raises(ValueError, match="not permitted"):
        agreed(lambda failed: failed, fails)


def _round_of(lengths: list[tuple[int, int]], out: torch.Tensor | None) -> DraftRound:
    """A round whose request `i` keeps `kept` of its prompt's blocks and drafts past it into `tail` more, per
    `lengths[i] = (kept, tail)`: every block id distinct."""
    requests = []
    for row, (kept, tail) in enumerate(lengths):
        num_prompt = kept + 2
        ids = list(range(100 * row + 1, 100 * row + 1 + num_prompt + tail))
        selection = RequestSelection(torch.arange(kept).expand(NUM_LAYERS, -1), num_prompt, 0, 0, 0, 0)
        first = (num_prompt + tail - 1) * BLOCK_SIZE  # the last draft in the request's last block
        kept_ids = torch.tensor(ids, dtype=torch.int32)[selection.kept_prompt_blocks]
        requests.append(DraftRequest(row, selection, first + 1, 1, kept_ids, ids, 0))
    return DraftRound(requests, NUM_LAYERS, BLOCK_SIZE, torch.device("cpu"), out)


def test_rounds_that_fit_build_their_tables_in_the_graph_buffer() -> None:
    """A round the graphs hold builds its tables in their buffer, so that loading it copies nothing; each
    row reads there what a round of its own holds, also after a wider round left other ids past its end."""
    inputs = graph_inputs()
    wide, narrow = [(3, 2), (5, 1), (1, 1)], [(2, 1), (1, 0)]
    for lengths in (wide, narrow):
        own = _round_of(lengths, None)
        built = _round_of(lengths, inputs.tables)
        assert built.tables.data_ptr() == inputs.tables.data_ptr()
        inputs.load_round(built.tables)
        for row, (kept, tail) in enumerate(lengths):
            width = kept + tail
            assert torch.equal(inputs.tables[:, row, :width], own.tables[:, row, :width])
    too_wide = _round_of([(GRAPH_BLOCKS, 1)], inputs.tables)
    assert too_wide.tables.data_ptr() != inputs.tables.data_ptr(), (
        "a round the buffer cannot hold has its own"
    )


def test_triton_reads_graph_inputs_refreshed_in_place(
    triton_cpu: types.SimpleNamespace, vllm_config: Any
) -> None:
    """What a full graph replays: the TRITON_ATTN adapter's per-layer metadata built once over the graph's
    inputs, with the longest length, then two rounds loaded in place. vLLM's `TritonAttentionImpl` (its
    kernel interpreted, 2D and 3D paths) reads each step's own tables and lengths: every drafting row equals
    attention over its kept blocks; and vLLM's KV write, given the inputs' slots, writes the true slots only
    (padding rows go to slot -1)."""
    impl = triton_impl(triton_cpu)
    triton_builder = builder(triton_cpu.backend, vllm_config)
    inputs = graph_inputs()
    metadata = adapter_for("TRITON_ATTN").sparse_metadata(
        triton_builder, inputs.common_metadata(GRAPH_BLOCKS * BLOCK_SIZE), inputs.tables, LAYER_NAMES
    )
    for batch, active in graph_steps():
        query = load(inputs, batch, active)
        for threshold in (1, 64):
            triton_builder.seq_threshold_3D = threshold
            for layer, name in enumerate(LAYER_NAMES):
                metadata[name].seq_threshold_3D = threshold
                output = torch.zeros_like(query)
                impl.forward(scales(), query, None, None, batch.kv_cache, metadata[name], output)
                expected = reference_for_layer(batch, layer)[active]
                torch.testing.assert_close(output[: len(active)], expected, atol=2e-5, rtol=2e-5)
        before = batch.kv_cache.clone()
        key = torch.randn(GRAPH_SIZE, NUM_KV_HEADS, HEAD_SIZE)
        capability = torch.cuda.get_device_capability
        torch.cuda.get_device_capability = lambda *args: (9, 0)  # asked by the write's launcher; no GPU here
        try:
            impl.do_kv_cache_update(scales(), key, key, batch.kv_cache, metadata[LAYER_NAMES[0]].slot_mapping)
        finally:
            torch.cuda.get_device_capability = capability
        changed = (batch.kv_cache != before).transpose(1, 2).flatten(0, 1).any(dim=(1, 2))
        assert torch.nonzero(changed).flatten().tolist() == sorted(int(batch.slots[i]) for i in active)


def test_flash_attention_metadata_built_once_reads_the_graph_inputs(vllm_config: Any) -> None:
    """FLASH_ATTN's metadata built once over a full graph's inputs (what its captured kernels read) holds
    those very buffers, so each in-place refresh reaches them: per layer its own rows of the shared table,
    the lengths as `seqused_k`, the query offsets and the slots; FA3's ahead-of-time schedule is left to
    the target's graphs."""
    from vllm.v1.attention.backends import flash_attn

    inputs = graph_inputs()
    fa_builder = builder(flash_attn, vllm_config)
    metadata = adapter_for("FLASH_ATTN").sparse_metadata(
        fa_builder, inputs.common_metadata(GRAPH_BLOCKS * BLOCK_SIZE), inputs.tables, LAYER_NAMES
    )
    for layer, name in enumerate(LAYER_NAMES):
        md = metadata[name]
        assert md.block_table.data_ptr() == inputs.tables[layer].data_ptr() and md.block_table.is_contiguous()
        assert md.seq_lens is inputs.seq_lens and md.query_start_loc is inputs.query_start_loc
        assert md.slot_mapping is inputs.slots and md.scheduler_metadata is None
        assert md.max_seq_len == GRAPH_BLOCKS * BLOCK_SIZE
    for batch, active in graph_steps():
        query = load(inputs, batch, active)
        key_cache, value_cache = split(batch.kv_cache)
        for layer, name in enumerate(LAYER_NAMES):
            md = metadata[name]
            got = paged_attention(
                query, key_cache, value_cache, md.block_table, md.seq_lens, md.query_start_loc, SCALE
            )
            expected = reference_for_layer(batch, layer)[active]
            torch.testing.assert_close(got[: len(active)], expected)


# ------------------------------------------------------------------------ FlashInfer's XQA decode path


@pytest.fixture(scope="module")
def flashinfer() -> Iterator[types.ModuleType]:
    """vLLM's FlashInfer backend module. Without the `flashinfer` package (no CPU build exists), it is
    imported over a stand-in that holds only the names it imports, none of which these tests call: what
    they run is vLLM's own metadata builder and dataclasses."""
    if importlib.util.find_spec("flashinfer") is not None:
        yield importlib.import_module("vllm.v1.attention.backends.flashinfer")
        return
    names = {
        "flashinfer": (
            "BatchAttentionWithAttentionSinkWrapper",
            "BatchDecodeWithPagedKVCacheWrapper",
            "BatchPrefillWithPagedKVCacheWrapper",
            "BatchPrefillWithRaggedKVCacheWrapper",
            "get_seq_lens",
            "nvfp4_quantize_append_paged_kv_cache_with_slot_mapping",
        ),
        "flashinfer.decode": ("fast_decode_plan", "trtllm_batch_decode_with_kv_cache"),
        "flashinfer.prefill": ("trtllm_batch_context_with_kv_cache",),
        "flashinfer.utils": ("FP4Tensor",),
    }
    for module, attrs in names.items():
        stand_in = types.ModuleType(module)
        stand_in.__spec__ = importlib.machinery.ModuleSpec(module, None)
        stand_in.__path__ = []
        for attr in attrs:
            setattr(stand_in, attr, type(attr, (), {}))
        sys.modules[module] = stand_in
    try:
        yield importlib.import_module("vllm.v1.attention.backends.flashinfer")
    finally:
        for module in [*names, "vllm.v1.attention.backends.flashinfer"]:
            sys.modules.pop(module, None)
        # vLLM caches what it found (`has_flashinfer` and the like): forget the stand-in for later tests.
        import vllm.utils.flashinfer as probes

        for probe in vars(probes).values():
            if isinstance(probe, functools._lru_cache_wrapper):
                probe.cache_clear()


def xqa_builder(flashinfer: types.ModuleType, vllm_config: Any, xqa: bool = True) -> Any:
    """vLLM's `FlashInferMetadataBuilder` as its `__init__` sets it up on an SM90 GPU (XQA decode; `xqa`
    False: the native decode path it falls back to elsewhere). The constructor itself asks the GPU and
    the model's layers, so the attributes `build` reads are set as it sets them; each is checked to be
    one `__init__` sets, so a vLLM that renames one fails here."""
    import copy

    cls = flashinfer.FlashInferMetadataBuilder
    cache_config = copy.copy(vllm_config.cache_config)
    cache_config.kv_cache_layout = "LBHNC"  # resolved by the engine core; FlashInfer's default
    kernel = flashinfer.FlashInferDecodeKernel.XQA if xqa else None
    settings = {
        "cache_config": cache_config,
        # Prefill's TRTLLM check asks NVIDIA's artifactory for cubins; a draft step has no prefill.
        "attention_config": dataclasses.replace(vllm_config.attention_config, use_trtllm_attention=False),
        "page_size": BLOCK_SIZE,
        "num_qo_heads": NUM_HEADS,
        "num_kv_heads": NUM_KV_HEADS,
        "dcp_world_size": 1,
        "use_dcp": False,
        "cache_dtype": "auto",
        "q_data_type_prefill": torch.float32,
        "q_data_type_decode": torch.float32,
        "has_sinks": False,
        "_num_speculative_tokens": 6,
        "use_trtllm_decode_attention": xqa,
        "flashinfer_trtllm_api_decode_kernel": kernel,
        "use_xqa": xqa,
        "use_trtllm_gen_varlen_decode": False,
        "reorder_batch_threshold": 1,
    }
    init = inspect.getsource(cls.__init__) + inspect.getsource(cls._init_reorder_batch_threshold)
    built = object.__new__(cls)
    for name, value in settings.items():
        assert re.search(rf"self\.{name}\b[^=\n]*=", init), name
        setattr(built, name, value)
    return built


def test_flashinfer_xqa_views_read_their_own_blocks(flashinfer: types.ModuleType, vllm_config: Any) -> None:
    """The FLASHINFER adapter's per-layer metadata, built by vLLM's `FlashInferMetadataBuilder.build` for a
    draft step on the XQA decode path: every request a decode, no host plan, and each layer's decode
    table its kept blocks, read by the reference as XQA reads `block_tables` and `seq_lens`."""
    batch = draft_batch(seed=5)
    metadata = adapter_for("FLASHINFER").sparse_metadata(
        xqa_builder(flashinfer, vllm_config),
        common(batch, batch.tables[0], batch.seq_lens),
        batch.tables,
        LAYER_NAMES,
    )
    key_cache, value_cache = split(batch.kv_cache)
    starts = torch.arange(len(SEQ_LENS) + 1)
    for layer, name in enumerate(LAYER_NAMES):
        md = metadata[name]
        assert isinstance(md, flashinfer.FlashInferMetadata)
        assert isinstance(md.decode, flashinfer.FlashInferTrtllmAPIDecode)
        assert md.prefill is None and md.num_decodes == len(SEQ_LENS) and md.decode.q_len_per_req == 1
        assert md.decode.max_seq_len == int(batch.seq_lens.max())
        got = paged_attention(
            batch.query, key_cache, value_cache, md.decode.block_tables, md.decode.seq_lens, starts, SCALE
        )
        torch.testing.assert_close(got, reference_for_layer(batch, layer))
        assert torch.equal(md.decode.block_tables, batch.tables[layer])
    assert metadata[LAYER_NAMES[0]].slot_mapping is metadata[LAYER_NAMES[1]].slot_mapping


def test_flashinfer_native_decode_is_refused(flashinfer: types.ModuleType, vllm_config: Any) -> None:
    """Where FlashInfer decodes on its native path (no XQA or trtllm-gen: this CPU, an A100, an unsupported
    head size), STD refuses to start with one line naming the backends to pass instead: from vLLM's
    `FlashInferImpl` (whose decode support is decided per GPU) and from the builder."""
    from vllm.config import set_current_vllm_config

    from vllm_std.config import STDConfigError

    adapter = adapter_for("FLASHINFER")
    with set_current_vllm_config(vllm_config):
        impl = flashinfer.FlashInferImpl(NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, None, None, "auto")
    assert not impl.supports_xqa_or_trtllm_gen_decode
    for check in (
        lambda: adapter.check_layer(impl),
        lambda: adapter.check_builder(xqa_builder(flashinfer, vllm_config, xqa=False)),
    ):
        with pytest.raises(STDConfigError, match="native decode path") as refused:
            check()
        assert "--attention-backend FLASH_ATTN or TRITON_ATTN" in str(refused.value)
        assert "\n" not in str(refused.value)
    adapter.check_builder(xqa_builder(flashinfer, vllm_config))
