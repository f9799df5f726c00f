"""STD's full-graph path of the draft step in a whole engine on this CPU, each graph replayed eagerly: for the
slow end-to-end test on vLLM's TRITON_ATTN backend (imported into each worker as its `worker_extension_cls`,
after tests/triton_attn_on.py switched the backend). `DraftGraphs` runs as on a GPU (per-layer metadata built
once over its persistent inputs, a warm-up per size, one logits buffer, rounds built in its table buffer,
steps loaded in place, padding rows) except that where a GPU would capture a CUDA graph of the step and
replay it, this runs the very step the graph would hold, on the same buffers, each replay."""

import triton_attn_on  # noqa: F401  (TRITON_ATTN, interpreted, in this worker)

from vllm_std.draft_graphs import DraftGraphs
from vllm_std.runner_view import RunnerView

# The sizes vLLM would have captured: draft batches pad to 1, 2 or 4 rows.
RunnerView.full_draft_graphs = property(lambda self: True)
RunnerView.cudagraph_capture_sizes = property(lambda self: [1, 2])
RunnerView.max_cudagraph_capture_size = property(lambda self: 4)


REPLAYS: dict[int, int] = {}
"""Replays per size, in this worker."""


class EagerGraph:
    """Stands where a captured CUDA graph would: its replay runs the captured step."""

    def __init__(self, graphs: DraftGraphs, size: int) -> None:
        self.graphs, self.size = graphs, size

    def replay(self) -> None:
        REPLAYS[self.size] = REPLAYS.get(self.size, 0) + 1
        self.graphs.captured_step(self.size)


def capture(self: DraftGraphs) -> None:
    """`DraftGraphs.capture` without CUDA: the metadata and each size's warm-up as there."""
    self.build_metadata()
    for size in sorted(self.sizes, reverse=True):
        self.warm_up(size)
        self.graphs[size] = EagerGraph(self, size)


DraftGraphs.capture = capture


class EagerGraphsOn:
    """The worker extension vLLM mixes in; importing this module turned the graphs on."""
