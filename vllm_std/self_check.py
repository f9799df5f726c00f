"""The start-up self-check: before STD drafts for anyone, the engine's own draft path must reproduce its
dense step, on the engine's own hardware, backend and kernels.

One synthetic batch runs through the real runner, adapter and attention kernels on scratch KV blocks (no
request exists yet, as for the calibration): two prompts of different lengths, each ending inside a block,
are prefilled; then one decode step runs dense and eagerly, and again through the drafter's path
(`SparseDrafter.forward`: STD's own full CUDA graphs, or vLLM's piecewise graphs, wherever drafting
uses them) with every block kept.
With every block kept the drafter's view is the whole context, so its logits must equal the dense step's
(within what the dtype allows), and the only KV it may change is in the blocks it writes (all blocks are
compared on an accelerator; on the CPU the first `CPU_CHECKED_BLOCKS`, the check's own among them).
Between the two, a dense step of other tokens overwrites the owned slots, so a draft step that wrote
nowhere (or elsewhere) reads the wrong keys and fails the logits check too. A backend whose metadata the
adapter builds wrong, a kernel that reads a table differently, or a KV write that lands in another block
fails here instead of silently costing acceptance or corrupting the cache."""

from typing import TYPE_CHECKING

import torch

from vllm_std.backends.base import AttentionAdapter
from vllm_std.draft_step import keep_all_round
from vllm_std.selection import kv_slots

if TYPE_CHECKING:
    from vllm_std.runner_view import RunnerView
    from vllm_std.sparse_drafter import SparseDrafter

# Largest |draft - dense| logit, relative to the largest dense logit, that rounding in each dtype allows
# (the draft step may take another kernel path, e.g. FlashAttention without its ahead-of-time schedule).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class SelfCheckFailed(RuntimeError):
    """The draft path does not reproduce the dense step on this engine."""


# Blocks whose checksums are compared on the CPU, where reading a cache of several GiB twice would add
# seconds to every start (an accelerator reads its whole cache in milliseconds).
CPU_CHECKED_BLOCKS = 1024


def block_checksums(cache: torch.Tensor, num_blocks: int, chunk_blocks: int = 256) -> torch.Tensor:
    """`[num_blocks]` int64: for the first blocks (dim 0 of a per-layer cache view), the sum of each block's
    element bit patterns. A write that changes a block's bits changes its sum (bar a collision); NaN-safe,
    unlike float sums."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[cache.element_size()]
    sums = []
    for start in range(0, num_blocks, chunk_blocks):
        part = cache[start : min(start + chunk_blocks, num_blocks)]
        sums.append(part.reshape(part.shape[0], -1).view(bits).sum(dim=1, dtype=torch.int64))
    return torch.cat(sums)


class StartupSelfCheck:
    def __init__(self, view: "RunnerView", adapter: AttentionAdapter, drafter: "SparseDrafter") -> None:
        self.view, self.adapter, self.drafter = view, adapter, drafter
        block_size = view.block_size
        # Two rows of different lengths whose last blocks are partly filled (so their tables differ in
        # width); block 0 is vLLM's null block.
        self.contexts = [2 * block_size + 3, block_size + 5]
        self.physical: list[torch.Tensor] = []
        next_block = 1
        for context in self.contexts:
            count = context // block_size + 1
            self.physical.append(torch.arange(next_block, next_block + count, dtype=torch.int32))
            next_block += count
        self.num_blocks_needed = next_block

    def run(self) -> None:
        """Raises `SelfCheckFailed` with what differed."""
        view = self.view
        if view.num_kv_blocks < self.num_blocks_needed:
            raise SelfCheckFailed(f"{view.num_kv_blocks} KV blocks; it needs {self.num_blocks_needed}")
        vocab = view.vocab_size
        prompts = [(torch.arange(c) * 7919 + 13 * i) % vocab for i, c in enumerate(self.contexts)]
        for prompt, physical in zip(prompts, self.physical, strict=True):
            self._dense(prompt, [physical], start=0)
        nexts = torch.tensor([int(p[-1] * 31 + 7) % vocab for p in prompts])
        dense = self._dense(nexts, self.physical, start=None)
        checked = (
            view.num_kv_blocks if view.device.type != "cpu" else min(view.num_kv_blocks, CPU_CHECKED_BLOCKS)
        )
        before = [block_checksums(cache, checked) for cache in view.kv_caches]
        self._dense((nexts + 1) % vocab, self.physical, start=None)  # other keys in the owned slots
        draft_round = keep_all_round(
            self.physical, self.contexts, len(view.layer_names), view.block_size, view.device
        )
        active = list(range(len(self.contexts)))
        draft = self.drafter.forward(draft_round, active, 0, nexts.to(view.device))
        owned = {slot // view.block_size for slot in draft_round.step(active, 0)[1]}
        for layer, (cache, sums) in enumerate(zip(view.kv_caches, before, strict=True)):
            changed = set(torch.nonzero(block_checksums(cache, checked) != sums).flatten().tolist()) - owned
            if changed:
                raise SelfCheckFailed(
                    f"the draft step changed KV blocks {sorted(changed)[:8]} of layer {layer}, which it does "
                    f"not write (it writes blocks {sorted(owned)})"
                )
        self._compare(dense.float(), draft.float())

    def _dense(self, tokens: torch.Tensor, physical: list[torch.Tensor], start: int | None) -> torch.Tensor:
        """A target forward pass: one row prefilling `tokens` from position `start`, or (`start` None) one
        decode token per row at the end of its context. Logits of every token."""
        view, block_size = self.view, self.view.block_size
        if start is not None:
            positions = start + torch.arange(tokens.shape[0])
            seq_lens = [start + tokens.shape[0]]
        else:
            positions = torch.tensor(self.contexts)
            seq_lens = [c + 1 for c in self.contexts]
        query_len = tokens.shape[0] // len(physical)
        rows = torch.arange(len(physical)).repeat_interleave(query_len)
        width = max(p.shape[0] for p in physical)
        table = torch.zeros(len(physical), width, dtype=torch.int32)
        for i, p in enumerate(physical):
            table[i, : p.shape[0]] = p
        slots = kv_slots(table, rows, positions, block_size)
        common = view.common_metadata(torch.tensor(seq_lens, dtype=torch.int32), table, slots, query_len)
        # Eager: the reference for a draft step that may replay vLLM's piecewise graphs.
        return view.draft_logits(
            tokens.to(view.device),
            positions,
            slots.to(view.device),
            view.dense_metadata(common),
            graphs=False,
        )

    def _compare(self, dense: torch.Tensor, draft: torch.Tensor) -> None:
        dtype = self.view.vllm_config.model_config.dtype
        scale = max(1.0, float(dense.abs().max()))
        error = float((draft - dense).abs().max()) / scale
        tolerance = TOLERANCE.get(dtype, 1e-2)
        if not error <= tolerance:  # also NaN
            raise SelfCheckFailed(
                f"with every block kept, the draft step's logits differ from the dense step's by {error:.2e} "
                f"of their largest (tolerance {tolerance:.0e} in {str(dtype).removeprefix('torch.')})"
            )
