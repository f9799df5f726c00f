"""STD's own full graphs of the draft step turned on where they cannot be captured, for the test of the
fallback: imported into each worker as its `worker_extension_cls` (before the drafter binds), this module
makes `RunnerView.full_draft_graphs` true on this CPU, which has no CUDA graphs, and gives it vLLM's capture
sizes up to 4, so the capture at start-up raises as a capture would on a GPU whose kernels cannot be
captured."""

from vllm_std.runner_view import RunnerView

RunnerView.full_draft_graphs = property(lambda self: True)
RunnerView.cudagraph_capture_sizes = property(lambda self: [1, 2, 4])
RunnerView.max_cudagraph_capture_size = property(lambda self: 4)


class FullGraphsOn:
    """The worker extension vLLM mixes in; importing this module turned the graphs on."""
