"""Prefill scoring: how much attention the prompt's text after the video puts on each KV block.

Pure torch, no vLLM: the same functions score inside vLLM (from captured queries and keys) and in the
eager-attention reference the tests compare against.
"""

import torch

LOGIT_ROWS = 256
"""Rows of `[query, key]` logits scored at once: a KV head's query heads times a chunk of its queries."""


def key_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    query_positions: torch.Tensor,
    key_start: int,
    logit_rows: int = LOGIT_ROWS,
) -> torch.Tensor:
    """Softmax attention mass each key receives, summed over query heads and averaged over queries.

    `query` is `[Tq, H, D]` and `key` `[Tk, Hkv, D]`, both after rotary embedding; key `j` sits at position
    `key_start + j` and a query at position `p` sees keys at positions `<= p` (causal). The softmax of each
    query runs over all keys it sees, so the mass is the paper's score. KV groups (GQA) share one head of
    keys among `H / Hkv` query heads. One KV head and a chunk of queries at a time, so that beyond its
    inputs scoring holds one KV head's keys in float32 and two `[logit_rows, Tk]` float32 blocks (logits
    and their softmax), whatever the number of queries: a long multi-turn prompt scores in as little
    memory as a short question. Returns `[Tk]` float32.
    """
    num_queries, num_heads, head_dim = query.shape
    if num_queries == 0:
        raise ValueError("no queries: the mass of attention paid by nothing is undefined")
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    chunk = max(1, logit_rows // group)
    key_positions = key_start + torch.arange(key.shape[0], device=key.device)
    query_positions = query_positions.to(key.device)
    mass = torch.zeros(key.shape[0], dtype=torch.float32, device=key.device)
    for h in range(num_kv_heads):
        head_keys = key[:, h].float()
        for start in range(0, num_queries, chunk):
            q = query[start : start + chunk].float().view(-1, num_kv_heads, group, head_dim)[:, h]
            logits = torch.einsum("qgd,kd->gqk", q, head_keys).mul_(scale)
            hidden = key_positions[None, :] > query_positions[start : start + chunk, None]
            logits.masked_fill_(hidden, float("-inf"))
            mass += logits.softmax(dim=-1).sum(dim=(0, 1))
            del logits
    return mass / num_queries


def block_mass(key_mass: torch.Tensor, key_start: int, block_size: int, num_blocks: int) -> torch.Tensor:
    """Sums per-key mass into logical KV blocks (block `b` holds positions `[b*bs, (b+1)*bs)`)."""
    blocks = (key_start + torch.arange(key_mass.shape[0], device=key_mass.device)) // block_size
    out = torch.zeros(num_blocks, dtype=torch.float32, device=key_mass.device)
    return out.index_add_(0, blocks, key_mass.float())
