"""Draft steps padded as on a GPU, for the test that padding is lossless: imported into each worker as its
`worker_extension_cls`, this module turns on `RunnerView.piecewise_drafts` and has the runner's dispatcher
pad every draft batch to a power of two of at least 8 rows in PIECEWISE mode, as it pads to a captured size
on a GPU. The CPU has no graphs to replay: the model runs the padded batch, whose padding rows carry token
0 at position 0 and write to slot -1, exactly as they would between the graph pieces."""

from vllm.config import CUDAGraphMode
from vllm.forward_context import BatchDescriptor

from vllm_std.runner_view import RunnerView

PADDED_STEPS = 0


def _padding_dispatch(num_tokens: int, *args, **kwargs) -> tuple[CUDAGraphMode, BatchDescriptor]:
    global PADDED_STEPS
    PADDED_STEPS += 1
    return CUDAGraphMode.PIECEWISE, BatchDescriptor(max(8, 1 << (num_tokens - 1).bit_length()))


def _padded(original):
    def draft_logits(self, *args, **kwargs):
        dispatcher = self.runner.cudagraph_dispatcher
        dispatcher.dispatch = _padding_dispatch  # for this call only: target steps dispatch as before
        try:
            return original(self, *args, **kwargs)
        finally:
            del dispatcher.dispatch

    return draft_logits


RunnerView.piecewise_drafts = property(lambda self: True)
RunnerView.draft_logits = _padded(RunnerView.draft_logits)


class PaddedDrafts:
    def padded_steps(self) -> int:
        """Forward passes of the drafter (self-check, calibration, drafts) padded so far in this worker."""
        return PADDED_STEPS
