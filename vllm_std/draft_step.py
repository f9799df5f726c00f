"""One round's draft-step inputs: for each drafting request, its next position, the true KV slot of that
position, and per layer the compacted block table the drafter reads (its kept prompt blocks, then every
block after the prompt), as the attention backend's per-layer metadata.

The host work of a step does not grow with the context: a request's kept prompt blocks are looked up once
(`KeptBlocks`, a device tensor), a round copies them on the device and reads only the ids of the blocks
after the prompt (`DraftRound`), and a step sends only positions, lengths and slots, one of each per
request."""

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vllm_std.backends.base import AttentionAdapter
from vllm_std.selection import RequestSelection, compacted_seq_len

if TYPE_CHECKING:
    from vllm_std.runner_view import RunnerView


@dataclasses.dataclass
class DraftRequest:
    row: int
    selection: RequestSelection
    num_tokens: int  # n: tokens so far, the last one sampled but not yet in the KV cache
    num_drafts: int
    kept: torch.Tensor  # [L, m] physical ids of the kept prompt blocks, on the device (`KeptBlocks`)
    block_ids: Sequence[int]  # physical id of each logical block (vLLM's own list: indexed, never copied)
    delta: int  # M-RoPE offset of generated tokens

    def position(self, step: int) -> int:
        return self.num_tokens - 1 + step


class KeptBlocks:
    """Each drafting request's kept prompt blocks as physical ids on the device, `[L, m]`, made on its first
    round and reused while its selection and block list stand (a request resumed after preemption gets a
    new block list from vLLM, and is scored again)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._made: dict[str, tuple[RequestSelection, Sequence[int], int, torch.Tensor]] = {}

    def of(self, req_id: str, selection: RequestSelection, block_ids: Sequence[int]) -> torch.Tensor:
        made = self._made.get(req_id)
        last = block_ids[selection.num_prompt_blocks - 1]
        if made is None or made[0] is not selection or made[1] is not block_ids or made[2] != last:
            prompt = torch.tensor(block_ids[: selection.num_prompt_blocks], dtype=torch.int32)
            kept = prompt[selection.kept_prompt_blocks].to(self.device)
            made = self._made[req_id] = (selection, block_ids, last, kept)
        return made[3]

    def release(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self._made.pop(req_id, None)

    def forget(self, live_req_ids: set[str]) -> None:
        for req_id in self._made.keys() - live_req_ids:
            del self._made[req_id]


@dataclasses.dataclass(frozen=True)
class DraftStepInputs:
    positions: torch.Tensor  # [B] model positions (with each request's M-RoPE offset)
    slots: torch.Tensor  # [B] true KV slots: the drafter writes where the verifier will
    metadata: dict[str, Any]  # per layer


class DraftRound:
    """The block tables of one round's draft steps, `[L, B, W]` on the device: each request's kept prompt
    blocks, then its blocks after the prompt up to the one its last draft writes (allocated ahead by vLLM's
    look-ahead slots). A step reads its requests' rows; each row's length masks the blocks a later step
    will reach, and past its length a row narrower than the widest holds block ids no step reads.

    `out` (`[L, rows, blocks]`, at least as large): a buffer to build the tables in, the first rows and blocks
    of each layer's; STD's full graphs read theirs from one (`DraftGraphs.table_buffer`)."""

    def __init__(
        self,
        requests: list[DraftRequest],
        num_layers: int,
        block_size: int,
        device: torch.device,
        out: torch.Tensor | None = None,
    ):
        self.requests, self.block_size = requests, block_size
        tails = []
        for r in requests:
            last_block = r.position(r.num_drafts - 1) // block_size + 1
            tails.append(list(r.block_ids[r.selection.num_prompt_blocks : last_block]))
        width = max(r.kept.shape[1] + len(t) for r, t in zip(requests, tails, strict=True))
        if out is not None and len(requests) <= out.shape[1] and width <= out.shape[2]:
            self.tables = out[:, : len(requests), :width]
        else:
            self.tables = torch.zeros(num_layers, len(requests), width, dtype=torch.int32, device=device)
        tail_ids = torch.tensor([i for t in tails for i in t], dtype=torch.int32).to(device)
        start = 0
        for row, (r, tail) in enumerate(zip(requests, tails, strict=True)):
            m = r.kept.shape[1]
            self.tables[:, row, :m] = r.kept
            self.tables[:, row, m : m + len(tail)] = tail_ids[start : start + len(tail)]
            start += len(tail)

    def step(self, active: list[int], step: int) -> tuple[list[int], list[int], list[int]]:
        """Draft step `step` of the requests `active` (indices into the round's): per request the compacted
        view's length, the true KV slot and the model position."""
        bs = self.block_size
        seq_lens, slots, positions = [], [], []
        for i in active:
            r = self.requests[i]
            pos = r.position(step)
            num_blocks = r.kept.shape[1] + pos // bs + 1 - r.selection.num_prompt_blocks
            seq_lens.append(compacted_seq_len(num_blocks, pos, bs))
            slots.append(int(r.block_ids[pos // bs]) * bs + pos % bs)
            positions.append(pos + r.delta)
        return seq_lens, slots, positions

    def inputs(
        self, view: "RunnerView", adapter: AttentionAdapter, active: list[int], step: int
    ) -> DraftStepInputs:
        """The backend's per-layer metadata and the model inputs of one draft step."""
        seq_lens, slots, positions = self.step(active, step)
        tables = self.tables if len(active) == len(self.requests) else self.tables[:, active]
        slot_tensor = torch.tensor(slots, dtype=torch.int64).to(view.device)
        common = view.common_metadata(torch.tensor(seq_lens, dtype=torch.int32), tables[0], slot_tensor)
        builder = view.attn_group.get_metadata_builder()
        metadata = adapter.sparse_metadata(builder, common, tables, view.layer_names)
        return DraftStepInputs(torch.tensor(positions, dtype=torch.int64), slot_tensor, metadata)


def keep_all_round(
    physical: Sequence[torch.Tensor],
    contexts: Sequence[int],
    num_layers: int,
    block_size: int,
    device: torch.device,
) -> DraftRound:
    """One draft step per row, at position `contexts[i]` over the physical blocks `physical[i]`, every block
    kept: the synthetic rounds of the start-up self-check and calibration (each view the whole context)."""
    requests = []
    for row, (ids, context) in enumerate(zip(physical, contexts, strict=True)):
        kept = torch.arange(-(-context // block_size)).expand(num_layers, -1)
        selection = RequestSelection.of(kept, torch.zeros(context, dtype=torch.bool), block_size)
        requests.append(DraftRequest(row, selection, context + 1, 1, ids[kept].to(device), ids.tolist(), 0))
    return DraftRound(requests, num_layers, block_size, device)
