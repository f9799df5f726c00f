"""The draws of sampled requests' drafts (pure torch plus vLLM's sampling metadata and top-k/top-p): greedy
rows keep argmax drafts, sampled rows draw from the distribution vLLM's sampler would make of the logits
and keep it for the rejection sampler, look-up drafts are certain, and a seeded request's draw at a
position is the same whatever else the batch holds."""

import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata

from vllm_std.draft_sampler import DraftSampler

VOCAB = 16


def _metadata(temperature: list[float], top_k: list[int] | None = None) -> SamplingMetadata:
    t = torch.tensor(temperature)
    return SamplingMetadata(
        temperature=t,
        all_greedy=bool((t < 1e-5).all()),
        all_random=bool((t >= 1e-5).all()),
        top_p=None,
        top_k=None if top_k is None else torch.tensor(top_k),
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(len(temperature)),
        presence_penalties=torch.zeros(len(temperature)),
        repetition_penalties=torch.ones(len(temperature)),
        output_token_ids=[[] for _ in temperature],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def test_greedy_rows_draft_argmax_and_sampled_rows_keep_their_distribution() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    sampler = DraftSampler(
        _metadata([0.0, 0.7], top_k=[VOCAB, 3]), {0: None, 1: None}, 2, 2, torch.Generator()
    )
    tokens = sampler.sample(logits, [0, 1], 0, [10, 10])
    assert tokens[0] == logits[0].argmax()
    assert sampler.probs is not None and sampler.probs.shape == (2, 2, VOCAB)
    expected = logits[1] / 0.7
    expected[expected < expected.topk(3).values[-1]] = -float("inf")
    torch.testing.assert_close(sampler.probs[1, 0], expected.softmax(-1))
    assert sampler.probs[1, 0, tokens[1]] > 0  # drawn from it: within its top 3
    assert not sampler.probs[0].any()  # greedy rows: not read by the rejection sampler
    sampler.certain(1, [5, 6])
    assert sampler.probs[1, 1, 6] == 1.0 and sampler.probs[1, 0, 5] == 1.0


def test_an_all_greedy_batch_keeps_no_probabilities() -> None:
    sampler = DraftSampler(_metadata([0.0, 0.0]), {0: None, 1: None}, 2, 3, torch.Generator())
    logits = torch.randn(2, VOCAB)
    assert torch.equal(sampler.sample(logits, [0, 1], 0, [4, 4]), logits.argmax(-1))
    sampler.certain(0, [1])
    assert sampler.probs is None


def test_a_seeded_draw_depends_on_its_seed_and_position_only() -> None:
    logits = torch.zeros(3, VOCAB)  # uniform: every draw shows the noise
    draws = []
    for other_seed in (None, 11):
        sampler = DraftSampler(
            _metadata([1.0, 1.0, 1.0]), {0: 7, 1: other_seed, 2: 7}, 3, 1, torch.Generator()
        )
        draws.append(sampler.sample(logits, [0, 1, 2], 0, [20, 20, 21]))
    assert draws[0][0] == draws[1][0]  # seed 7 at position 20, whatever its neighbours
    position_draws = {
        int(
            DraftSampler(_metadata([1.0]), {0: 7}, 1, 1, torch.Generator()).sample(logits[:1], [0], 0, [p])[0]
        )
        for p in range(40)
    }
    assert len(position_draws) > 1  # a new draw at each position, not one per request
