"""One draft step's inputs: for each drafting request, its next position, the true KV slot of that position,
and per layer the compacted block table the drafter reads (its kept prompt blocks, then every block after
the prompt), as the attention backend's per-layer metadata."""

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from vllm_std.backends.base import AttentionAdapter
from vllm_std.selection import RequestSelection, compacted_block_table, compacted_seq_len

if TYPE_CHECKING:
    from vllm_std.runner_view import RunnerView


@dataclasses.dataclass
class DraftRequest:
    row: int
    selection: RequestSelection
    num_tokens: int  # n: tokens so far, the last one sampled but not yet in the KV cache
    num_drafts: int
    physical: torch.Tensor  # physical id of each logical block
    delta: int  # M-RoPE offset of generated tokens

    def position(self, step: int) -> int:
        return self.num_tokens - 1 + step


@dataclasses.dataclass(frozen=True)
class DraftStepInputs:
    positions: torch.Tensor  # [B] model positions (with each request's M-RoPE offset)
    slots: torch.Tensor  # [B] true KV slots: the drafter writes where the verifier will
    metadata: dict[str, Any]  # per layer


def draft_step_inputs(
    view: "RunnerView", adapter: AttentionAdapter, requests: list[DraftRequest], step: int
) -> DraftStepInputs:
    block_size = view.block_size
    tables, seq_lens, slots, positions = [], [], [], []
    for r in requests:
        pos = r.position(step)
        table = compacted_block_table(
            r.selection.kept_prompt_blocks,
            r.selection.num_prompt_blocks,
            pos // block_size + 1,
            r.physical,
        )
        tables.append(table)
        seq_lens.append(compacted_seq_len(table.shape[1], pos, block_size))
        slots.append(int(r.physical[pos // block_size]) * block_size + pos % block_size)
        positions.append(pos + r.delta)
    width = max(t.shape[1] for t in tables)
    block_tables = torch.zeros(len(view.layer_names), len(requests), width, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[:, i, : table.shape[1]] = table
    # Rows narrower than the widest read block 0 past their length: the kernels mask by length.
    block_tables = block_tables.to(view.device)
    slot_tensor = torch.tensor(slots, dtype=torch.int64).to(view.device)
    common = view.common_metadata(torch.tensor(seq_lens, dtype=torch.int32), block_tables[0], slot_tensor)
    metadata = adapter.sparse_metadata(
        view.attn_group.get_metadata_builder(), common, block_tables, view.layer_names
    )
    return DraftStepInputs(torch.tensor(positions, dtype=torch.int64), slot_tensor, metadata)
