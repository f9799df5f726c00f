"""A drafter broken on purpose, for the test of the start-up self-check: imported into each worker as its
`worker_extension_cls` (before the drafter binds), this module breaks STD's draft path as the environment
variable `STD_TEST_BREAK` says:

- `view`: the CPU adapter gives every layer its blocks in the wrong order (a table the kernel misreads);
- `write`: draft steps write their KV one block past their true slots (into blocks they do not own).
"""

import os

import torch

from vllm_std.backends.cpu import CPUAttentionAdapter
from vllm_std.runner_view import RunnerView

BREAK = os.environ.get("STD_TEST_BREAK", "view")


def _rolled_tables(original):
    def sparse_metadata(self, builder, common, block_tables, layer_names):
        return original(self, builder, common, torch.roll(block_tables, 1, dims=-1), layer_names)

    return sparse_metadata


def _stray_writes(original):
    def draft_logits(self, token_ids, positions, slots, attn_metadata, graphs=True):
        if len({id(m) for m in attn_metadata.values()}) > 1:  # per-layer views: a draft step
            slots = slots + self.block_size
        return original(self, token_ids, positions, slots, attn_metadata, graphs)

    return draft_logits


if BREAK == "view":
    CPUAttentionAdapter.sparse_metadata = _rolled_tables(CPUAttentionAdapter.sparse_metadata)
elif BREAK == "write":
    RunnerView.draft_logits = _stray_writes(RunnerView.draft_logits)
else:
    raise ValueError(f"STD_TEST_BREAK={BREAK!r}: expected 'view' or 'write'")


class BrokenDrafter:
    """The worker extension vLLM mixes in; importing this module did the breaking."""
