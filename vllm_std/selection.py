"""Block selection and the lengths of the drafter's compacted views. Pure torch, no vLLM.

Selection works on whole PagedAttention blocks: a block is a *candidate* for dropping only when every one of
its positions is a visual token of the prompt. Every other block (system prompt, question, generated text, a
block shared by video and text) is always kept, so the drafter sees all non-visual tokens.
"""

import dataclasses
from collections.abc import Sequence

import torch


def visual_mask(
    num_tokens: int,
    spans: Sequence[tuple[int, int]],
    embeds: Sequence[torch.Tensor | None] = (),
) -> torch.Tensor:
    """`[num_tokens]` bool: True at positions inside any `(offset, length)` span that hold the item's
    embeddings. `embeds[i]`, where given and not None, is span i's `[length]` bool mask of them (vLLM's
    `PlaceholderRange.is_embed`): text inside a span (Qwen3-VL's per-frame timestamps, vision start and end
    tokens) is not visual, so the drafter never drops it."""
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    for i, (offset, length) in enumerate(spans):
        embed = embeds[i] if i < len(embeds) else None
        span = mask[offset : offset + length]  # a view, clipped at the end
        span |= True if embed is None else embed[: span.shape[0]].to(torch.bool)
    return mask


def candidate_blocks(visual: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[ceil(T / bs)]` bool: blocks that are full and visual at every position (droppable)."""
    num_full = visual.shape[0] // block_size
    out = torch.zeros(-(-visual.shape[0] // block_size), dtype=torch.bool)
    out[:num_full] = visual[: num_full * block_size].view(num_full, block_size).all(dim=1)
    return out


def select_blocks(block_scores: torch.Tensor, candidates: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """Per layer, the prompt blocks the drafter keeps: every non-candidate plus the top-k candidates.

    `block_scores` is `[L, nb]`; returns `[L, nb - num_candidates + min(k, num_candidates)]` int64 block
    indices in ascending order (the order the attention kernel reads them). Ties go to the earlier block.
    """
    num_layers = block_scores.shape[0]
    cand_idx = candidates.nonzero().squeeze(1)
    always = (~candidates).nonzero().squeeze(1)
    k = min(k_blocks, cand_idx.numel())
    order = torch.sort(block_scores[:, cand_idx], dim=1, descending=True, stable=True).indices[:, :k]
    chosen = cand_idx[order]
    kept = torch.cat([always.expand(num_layers, -1), chosen], dim=1)
    return torch.sort(kept, dim=1).values


def baseline_scores(policy: str, num_layers: int, num_blocks: int, seed: int) -> torch.Tensor:
    """`[L, nb]` block scores of a ranking baseline, for `select_blocks` in place of attention scores:
    "recent_visual" ranks later blocks higher (the most recent visual blocks win), "random" draws them per
    layer from a generator seeded by `seed` (the same on every tensor-parallel rank)."""
    if policy == "recent_visual":
        return torch.arange(num_blocks, dtype=torch.float32).expand(num_layers, -1)
    if policy == "random":
        return torch.rand(num_layers, num_blocks, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown baseline selection policy {policy!r}")


def streaming_blocks(
    num_layers: int, num_prompt_blocks: int, num_kept: int, sink_blocks: int = 1
) -> torch.Tensor:
    """StreamingLLM's cache (Xiao et al., ICLR 2024), the paper's baseline drafter: the attention sinks at the
    start of the context plus the most recent window, whatever the tokens are (text before or between
    videos falls out of the window like visual tokens do).

    In blocks: the first `sink_blocks` and the last prompt blocks, `num_kept` prompt blocks in all (STD's
    budget: its K visual blocks plus every block it keeps anyway). Every block after the prompt is read by
    both drafters, so at each step the window is the most recent `num_kept - sink_blocks` blocks of the
    prompt plus all generated tokens: the whole context's most recent tokens, within STD's budget at that
    step. Returns `[L, min(num_kept, nb)]` ascending, the same for every layer.
    """
    num_kept = min(num_kept, num_prompt_blocks)
    sinks = min(sink_blocks, num_kept - 1) if num_kept > 1 else 0
    recent = torch.arange(num_prompt_blocks - (num_kept - sinks), num_prompt_blocks)
    return torch.cat([torch.arange(sinks), recent]).expand(num_layers, -1)


def kv_slots(
    table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The KV-cache slot of each token: position `positions[i]` of the request in row `rows[i]` of the
    physical block table `table`."""
    return table[rows, positions // block_size].long() * block_size + positions % block_size


def compacted_seq_len(num_kept_blocks: int, position: int, block_size: int) -> int:
    """Sequence length of a compacted view whose last block holds `position`; all others are full."""
    return (num_kept_blocks - 1) * block_size + position % block_size + 1


@dataclasses.dataclass(frozen=True)
class RequestSelection:
    """What one request's drafter reads, fixed once its prefill is scored."""

    kept_prompt_blocks: torch.Tensor  # [L, m] logical block ids within the prompt, ascending
    num_prompt_blocks: int
    num_visual_tokens: int
    num_candidate_blocks: int
    num_kept_visual_tokens: int  # visual tokens each layer's drafter still reads
    num_dropped_tokens: int  # prompt tokens each layer's drafter does not read

    @classmethod
    def of(
        cls, kept_prompt_blocks: torch.Tensor, visual: torch.Tensor, block_size: int
    ) -> "RequestSelection":
        """The selection `kept_prompt_blocks` makes of a prompt whose visual positions are `visual`. Every
        layer keeps as many blocks (counted on layer 0), and a dropped block is always a full one."""
        block_of = torch.arange(visual.shape[0]) // block_size
        read = torch.isin(block_of, kept_prompt_blocks[0])
        return cls(
            kept_prompt_blocks=kept_prompt_blocks,
            num_prompt_blocks=-(-visual.shape[0] // block_size),
            num_visual_tokens=int(visual.sum()),
            num_candidate_blocks=int(candidate_blocks(visual, block_size).sum()),
            num_kept_visual_tokens=int((visual & read).sum()),
            num_dropped_tokens=int((~read).sum()),
        )

    def drafter_context(self, num_tokens: int) -> int:
        """Tokens a draft step reads at context `num_tokens`: all but the prompt tokens of dropped blocks."""
        return num_tokens - self.num_dropped_tokens
