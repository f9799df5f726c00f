"""`vllm_std.scoring` against plain references: the block scores decide which visual blocks the drafter keeps.

The library loops over KV heads to bound memory; the references here materialise the full attention
(dense softmax with a causal mask, or explicit per-query loops) so a masking, grouping or averaging slip in
the library shows up as a numeric mismatch. Hypothesis repeats the reference comparisons over random shapes
(GQA groups, key_start on and off block edges, queries past the last key).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_std.scoring import block_mass, key_attention_mass


def random_qk(
    num_queries: int, num_keys: int, num_heads: int, num_kv_heads: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `[Tq, H, D]` queries and `[Tk, Hkv, D]` keys, seeded so failures reproduce."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(num_queries, num_heads, head_dim, generator=gen)
    key = torch.randn(num_keys, num_kv_heads, head_dim, generator=gen)
    return query, key


def dense_reference(
    query: torch.Tensor, key: torch.Tensor, scale: float, query_positions: torch.Tensor, key_start: int
) -> torch.Tensor:
    """Full `[H, Tq, Tk]` causal softmax in float64, KV heads repeated for GQA: the obvious formula."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    q = query.double().transpose(0, 1)  # [H, Tq, D]
    k = key.double().repeat_interleave(num_heads // num_kv_heads, dim=1).transpose(0, 1)  # [H, Tk, D]
    logits = q @ k.transpose(1, 2) * scale  # [H, Tq, Tk]
    key_positions = key_start + torch.arange(key.shape[0])
    visible = key_positions[None, :] <= query_positions[:, None]  # [Tq, Tk]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.sum(dim=0).mean(dim=0)


def loop_reference(
    query: torch.Tensor, key: torch.Tensor, scale: float, query_positions: list[int], key_start: int
) -> list[float]:
    """Per query and head, a hand-written softmax over the visible keys: independent of torch masking."""
    num_queries, num_heads, _ = query.shape
    num_keys, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    mass = [0.0] * num_keys
    for i in range(num_queries):
        visible = [j for j in range(num_keys) if key_start + j <= query_positions[i]]
        for h in range(num_heads):
            kv = h // group
            logits = {j: float(query[i, h].double() @ key[j, kv].double()) * scale for j in visible}
            top = max(logits.values())
            exps = {j: math.exp(v - top) for j, v in logits.items()}
            total = sum(exps.values())
            for j, e in exps.items():
                mass[j] += e / total
    return [m / num_queries for m in mass]


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(4, 2), (4, 4), (4, 1), (6, 3)], ids=["gqa", "mha", "mqa", "gqa-6-3"]
)
@pytest.mark.parametrize("key_start", [0, 37])
def test_matches_dense_reference(num_heads: int, num_kv_heads: int, key_start: int) -> None:
    """GQA/MHA/MQA, causal queries spread over the keys, keys not starting at position 0."""
    num_keys, head_dim = 24, 16
    query, key = random_qk(9, num_keys, num_heads, num_kv_heads, head_dim, seed=num_heads + key_start)
    # Queries at the first key, in the middle, at the last key and past it (text after the prompt's keys).
    offsets = torch.tensor([0, 1, 5, 11, 12, 20, 23, 23, 30])
    positions = key_start + offsets
    scale = head_dim**-0.5
    got = key_attention_mass(query, key, scale, positions, key_start)
    want = dense_reference(query, key, scale, positions, key_start)
    assert got.dtype == torch.float32 and got.shape == (num_keys,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@st.composite
def attention_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, int]:
    """(query, key, scale, query_positions, key_start): 1-3 KV heads of 1-3 query heads each; every query
    sees at least the first key, some sit past the last one."""
    num_kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_keys = draw(st.integers(1, 20))
    key_start = draw(st.integers(0, 40))
    offsets = draw(st.lists(st.integers(0, num_keys + 3), min_size=1, max_size=6))
    head_dim = draw(st.sampled_from([1, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    query, key = random_qk(len(offsets), num_keys, num_kv_heads * group, num_kv_heads, head_dim, seed)
    scale = draw(st.floats(0.0, 1.0))
    return query, key, scale, key_start + torch.tensor(offsets), key_start


@settings(max_examples=60, deadline=None, database=None)
@given(attention_inputs())
def test_matches_dense_reference_on_random_shapes(
    inputs: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, int],
) -> None:
    """The parametrized comparison above, over random head counts, sizes, key offsets and query positions."""
    query, key, scale, positions, key_start = inputs
    got = key_attention_mass(query, key, scale, positions, key_start)
    assert got.dtype == torch.float32 and got.shape == (key.shape[0],)
    want = dense_reference(query, key, scale, positions, key_start)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_matches_loop_reference() -> None:
    """Cross-checks against explicit loops, so the dense reference is not the only oracle."""
    query, key = random_qk(5, 7, 4, 2, 8, seed=3)
    positions = [12, 13, 15, 16, 20]
    got = key_attention_mass(query, key, 0.5, torch.tensor(positions), key_start=10)
    want = loop_reference(query, key, 0.5, positions, key_start=10)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_gqa_groups_query_heads_with_their_own_kv_head() -> None:
    """Query heads 0-1 read KV head 0 and heads 2-3 KV head 1: contiguous groups, as vLLM lays them out."""
    num_keys, head_dim = 4, 2
    key = torch.zeros(num_keys, 2, head_dim)
    key[0, 0, 0] = 10.0  # KV head 0 strongly prefers key 0
    key[3, 1, 0] = 10.0  # KV head 1 strongly prefers key 3
    query = torch.zeros(1, 4, head_dim)
    query[0, :, 0] = 1.0
    mass = key_attention_mass(query, key, 1.0, torch.tensor([3]), key_start=0)
    # Heads 0,1 put ~all mass on key 0, heads 2,3 on key 3: interleaved grouping would mix them.
    assert mass[0].item() == pytest.approx(2.0, abs=1e-3)
    assert mass[3].item() == pytest.approx(2.0, abs=1e-3)
    torch.testing.assert_close(mass, dense_reference(query, key, 1.0, torch.tensor([3]), 0).float())


@pytest.mark.parametrize("key_start", [0, 7])
def test_causal_mask_hides_later_keys(key_start: int) -> None:
    """A query at an early position gives exactly zero mass to every key after it."""
    num_keys = 10
    query, key = random_qk(1, num_keys, 4, 2, 8, seed=1)
    key = key * 5  # large logits: any leak through the mask would be visible
    for offset in range(num_keys):
        mass = key_attention_mass(query, key, 1.0, torch.tensor([key_start + offset]), key_start)
        assert torch.all(mass[offset + 1 :] == 0), offset
        assert torch.all(mass[: offset + 1] > 0), offset
        assert mass.sum().item() == pytest.approx(4.0, rel=1e-5)


def test_first_query_puts_all_mass_on_first_key() -> None:
    """A query that sees only one key gives it the full softmax mass of every head."""
    query, key = random_qk(1, 6, 4, 2, 8, seed=2)
    mass = key_attention_mass(query, key, 1.0, torch.tensor([5]), key_start=5)
    torch.testing.assert_close(mass, torch.tensor([4.0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (4, 4), (8, 1)])
def test_total_mass_is_number_of_heads(num_heads: int, num_kv_heads: int) -> None:
    """Each query's softmax sums to 1 per head; summed over heads and averaged over queries that is H."""
    query, key = random_qk(13, 40, num_heads, num_kv_heads, 16, seed=5)
    positions = torch.randint(3, 60, (13,), generator=torch.Generator().manual_seed(0))
    mass = key_attention_mass(query, key, 0.25, positions, key_start=3)
    assert mass.sum().item() == pytest.approx(num_heads, rel=1e-5)
    assert torch.all(mass >= 0)


def test_shifting_every_position_changes_nothing() -> None:
    """Only relative positions matter: `key_start` and the query positions move together (chunked prefill)."""
    query, key = random_qk(6, 16, 4, 2, 8, seed=4)
    offsets = torch.tensor([2, 4, 8, 15, 15, 20])
    base = key_attention_mass(query, key, 0.3, offsets, key_start=0)
    shifted = key_attention_mass(query, key, 0.3, offsets + 1000, key_start=1000)
    torch.testing.assert_close(base, shifted)


def test_scale_zero_spreads_mass_uniformly_over_visible_keys() -> None:
    """With zero logits every visible key gets 1/visible per head: checks `scale` and the mask together."""
    query, key = random_qk(2, 4, 2, 1, 4, seed=6)
    mass = key_attention_mass(query, key, 0.0, torch.tensor([1, 3]), key_start=0)
    # Query at 1 sees keys 0-1 (1/2 each), query at 3 sees keys 0-3 (1/4 each); x2 heads, /2 queries.
    torch.testing.assert_close(mass, torch.tensor([0.75, 0.75, 0.25, 0.25]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    """Half inputs give a float32 result equal to scoring their float32 upcast, even where half overflows."""
    query, key = random_qk(5, 12, 4, 2, 64, seed=7)
    # Logits around 300*300*64: far past float16's 65504, so a half-precision product would give inf/NaN.
    query_h, key_h = (query * 300).to(dtype), (key * 300).to(dtype)
    positions = torch.tensor([3, 5, 8, 11, 11])
    got = key_attention_mass(query_h, key_h, 1.0, positions, key_start=0)
    want = key_attention_mass(query_h.float(), key_h.float(), 1.0, positions, key_start=0)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        got.double(), dense_reference(query_h, key_h, 1.0, positions, 0), rtol=1e-4, atol=1e-4
    )


def test_query_positions_of_another_integer_dtype() -> None:
    """Positions arrive as int32 from vLLM's metadata; the comparison with int64 key positions must hold."""
    query, key = random_qk(3, 8, 4, 2, 8, seed=8)
    pos64 = torch.tensor([2, 5, 7])
    got = key_attention_mass(query, key, 0.5, pos64.to(torch.int32), key_start=0)
    torch.testing.assert_close(got, key_attention_mass(query, key, 0.5, pos64, key_start=0))


def block_mass_reference(
    key_mass: list[float], key_start: int, block_size: int, num_blocks: int
) -> list[float]:
    """Sums each key's mass into the block of its absolute position, one key at a time."""
    out = [0.0] * num_blocks
    for j, m in enumerate(key_mass):
        out[(key_start + j) // block_size] += m
    return out


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.sampled_from([1, 3, 4, 16]),
    st.integers(0, 40),
    st.lists(st.floats(0.0, 4.0, width=32), min_size=1, max_size=40),
)
def test_block_mass_sums_any_chunk_into_its_blocks(
    block_size: int, key_start: int, mass: list[float]
) -> None:
    """Keys from any `key_start` (on a block edge or mid-block) up to the prompt's end, as scoring passes
    them: each lands in the block of its absolute position, earlier blocks stay zero, and no mass is lost."""
    num_blocks = -(-(key_start + len(mass)) // block_size)
    key_mass = torch.tensor(mass, dtype=torch.float32)
    got = block_mass(key_mass, key_start, block_size, num_blocks)
    assert got.dtype == torch.float32 and got.shape == (num_blocks,)
    torch.testing.assert_close(
        got, torch.tensor(block_mass_reference(mass, key_start, block_size, num_blocks))
    )
    assert not got[: key_start // block_size].any()
    assert got.sum().item() == pytest.approx(math.fsum(mass), rel=1e-5, abs=1e-5)


def test_block_mass_mid_block_start_by_hand() -> None:
    """Positions 5..14 with blocks of 4: block 0 empty, block 1 gets keys 5-7, block 2 8-11, block 3 12-14."""
    got = block_mass(torch.ones(10), key_start=5, block_size=4, num_blocks=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 3.0, 4.0, 3.0]))


def test_block_mass_accepts_half_precision_mass() -> None:
    """The result is always float32, whatever the dtype of the per-key mass."""
    got = block_mass(torch.ones(6, dtype=torch.float16), key_start=2, block_size=4, num_blocks=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([2.0, 4.0]))


def test_block_mass_does_not_modify_its_input() -> None:
    """`index_add_` works on a fresh tensor: the per-key mass can be reused after bucketing."""
    key_mass = torch.rand(9)
    before = key_mass.clone()
    block_mass(key_mass, key_start=1, block_size=4, num_blocks=3)
    assert torch.equal(key_mass, before)


def test_scores_end_to_end_match_dense_blocks() -> None:
    """key_attention_mass then block_mass equals block-summing the dense reference, for a chunked prompt."""
    block_size, prompt_len, key_start = 4, 30, 0
    query, key = random_qk(8, prompt_len, 4, 2, 8, seed=9)
    positions = torch.arange(prompt_len - 8, prompt_len)  # the text after the video
    num_blocks = -(-prompt_len // block_size)
    got = block_mass(
        key_attention_mass(query, key, 0.35, positions, key_start), key_start, block_size, num_blocks
    )
    dense = dense_reference(query, key, 0.35, positions, key_start)
    want = block_mass_reference(dense.tolist(), key_start, block_size, num_blocks)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_where_the_captured_tensors_are(device: str, dtype: torch.dtype) -> None:
    """Inside vLLM the captured queries and keys are on the accelerator and the query positions on the host:
    the scores are computed on the tensors' device, in float32, and equal the dense reference (Qwen2-VL-7B's
    head layout: 28 query heads on 4 KV heads of 128). The CUDA case runs where a GPU is present."""
    block_size, prompt_len, num_text = 16, 200, 24
    query, key = (t.to(dtype) for t in random_qk(num_text, prompt_len, 28, 4, 128, seed=11))
    positions = torch.arange(prompt_len - num_text, prompt_len)
    num_blocks = -(-prompt_len // block_size)
    mass = key_attention_mass(query.to(device), key.to(device), 128**-0.5, positions, 0)
    got = block_mass(mass, 0, block_size, num_blocks)
    assert got.device.type == device and got.dtype == torch.float32
    dense = dense_reference(query, key, 128**-0.5, positions, 0)
    want = block_mass_reference(dense.tolist(), 0, block_size, num_blocks)
    torch.testing.assert_close(
        got.cpu().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("logit_rows", [1, 3, 8, 10_000])
def test_queries_scored_in_chunks_match_the_dense_reference(logit_rows: int) -> None:
    """Chunks of queries (any size, down to one query of one head) change nothing: each query's softmax
    runs over its whole row of keys either way."""
    query, key = random_qk(23, 61, 4, 2, 16, seed=5)
    positions = 20 + torch.arange(23) * 2
    got = key_attention_mass(query, key, 0.3, positions, 5, logit_rows=logit_rows)
    torch.testing.assert_close(got, dense_reference(query, key, 0.3, positions, 5).float())


def test_no_queries_is_an_error_not_nan() -> None:
    query, key = random_qk(0, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="no queries"):
        key_attention_mass(query, key, 1.0, torch.zeros(0, dtype=torch.long), 0)


PEAK_SCRIPT = """
import resource, sys, torch
from vllm_std.scoring import key_attention_mass
torch.set_num_threads(1)
num_queries, num_keys = int(sys.argv[1]), 32_768
query = torch.randn(num_queries, 8, 64)
key = torch.randn(num_keys, 2, 64)
positions = num_keys - num_queries + torch.arange(num_queries)
key_attention_mass(query[:1], key[:64], 0.1, positions[:1], 0)  # allocator and kernels warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
key_attention_mass(query, key, 0.1, positions, 0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_scoring_memory_does_not_grow_with_the_number_of_queries() -> None:
    """The documented bound (docs/limits.md): beyond its inputs, one KV head's keys in float32 and two
    `[LOGIT_ROWS, Tk]` float32 blocks, whatever the number of queries. Measured as the growth of the
    process's peak memory, in a fresh process: 4096 queries of 8 heads over 32k keys would need 4 GiB of
    logits at once; the bound is 8 MiB of keys and 64 MiB of logits."""
    import subprocess
    import sys

    from vllm_std.scoring import LOGIT_ROWS

    bound = 32_768 * 64 * 4 + 2 * LOGIT_ROWS * 32_768 * 4
    for num_queries in (64, 4096):
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(num_queries)], capture_output=True, text=True, check=True
        )
        grown = int(done.stdout.split()[-1])
        assert grown <= 1.25 * bound, (num_queries, grown, bound)
