"""Prefill scoring: how much attention the prompt's text after the video puts on each KV block.

Pure torch, no vLLM: the same functions score inside vLLM (from captured queries and keys) and in the
eager-attention reference the tests compare against.
"""

import torch


def key_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    query_positions: torch.Tensor,
    key_start: int,
) -> torch.Tensor:
    """Softmax attention mass each key receives, summed over query heads and averaged over queries.

    `query` is `[Tq, H, D]` and `key` `[Tk, Hkv, D]`, both after rotary embedding; key `j` sits at position
    `key_start + j` and a query at position `p` sees keys at positions `<= p` (causal). The softmax of each
    query runs over all keys it sees, so the mass is the paper's score. KV groups (GQA) share one head of
    keys among `H / Hkv` query heads; the loop over KV heads bounds memory to `[H/Hkv, Tq, Tk]` floats.
    Returns `[Tk]` float32.
    """
    num_queries, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    key_positions = key_start + torch.arange(key.shape[0], device=key.device)
    hidden = key_positions[None, :] > query_positions[:, None].to(key.device)  # [Tq, Tk]
    q = query.float().view(num_queries, num_kv_heads, group, head_dim)
    mass = torch.zeros(key.shape[0], dtype=torch.float32, device=key.device)
    for h in range(num_kv_heads):
        logits = torch.einsum("qgd,kd->gqk", q[:, h], key[:, h].float()) * scale
        logits.masked_fill_(hidden, float("-inf"))
        mass += logits.softmax(dim=-1).sum(dim=(0, 1))
    return mass / num_queries


def block_mass(key_mass: torch.Tensor, key_start: int, block_size: int, num_blocks: int) -> torch.Tensor:
    """Sums per-key mass into logical KV blocks (block `b` holds positions `[b*bs, (b+1)*bs)`)."""
    blocks = (key_start + torch.arange(key_mass.shape[0], device=key_mass.device)) // block_size
    out = torch.zeros(num_blocks, dtype=torch.float32, device=key_mass.device)
    return out.index_add_(0, blocks, key_mass.float())
