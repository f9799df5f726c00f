"""A drafter whose distribution is far from the target's, for the test that sampled drafts stay lossless
whatever their distribution: imported into each worker as its `worker_extension_cls`, this module flattens
every sampled draft's distribution (its processed logits halved). Drafts are still drawn from the
distribution handed to vLLM's rejection sampler, so the output must still follow the target's; and being
far from it, they are both accepted and rejected, so that both of the sampler's paths run."""

from vllm_std.draft_sampler import DraftSampler


def _flattened(original):
    def _probabilities(self, logits, requests):
        return original(self, logits * 0.5, requests)

    return _probabilities


DraftSampler._probabilities = _flattened(DraftSampler._probabilities)


class SkewedDrafts:
    """The worker extension vLLM mixes in; importing this module skewed the drafts."""
