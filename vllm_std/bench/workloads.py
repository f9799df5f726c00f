"""The bench's requests: questions about synthetic or real videos, or the trained look-up fixture's task."""

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vllm_std.bench.engines import Batch, VideoQuestion
from vllm_std.bench.methods import Workload

if TYPE_CHECKING:
    from vllm_std.fixtures.sparse import Episode

FOLLOW_UPS = ("What happens after that?", "How does the video end?", "What is in the first frame?")
"""The later turns' questions about a video (`vllm-std bench --turns`)."""
MAX_TURNS = 1 + len(FOLLOW_UPS)

FrameSource = Callable[[int, int, int, int], np.ndarray]
"""`(num_frames, height, width, seed) -> [num_frames, height, width, 3]` uint8 RGB."""


def file_frames(paths: list[str]) -> FrameSource:
    """Frames from the user's video files (request i reads file i mod n), evenly spaced over the file and
    resized, so that a workload's number of visual tokens is met from real footage."""
    import cv2

    def frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
        capture = cv2.VideoCapture(paths[seed % len(paths)])
        decoded = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            decoded.append(cv2.cvtColor(cv2.resize(frame, (width, height)), cv2.COLOR_BGR2RGB))
        capture.release()
        if not decoded:
            raise SystemExit(f"vllm-std bench: cannot read frames from {paths[seed % len(paths)]}")
        picks = np.linspace(0, len(decoded) - 1, num_frames).round().astype(int)
        return np.stack([decoded[i] for i in picks])

    return frames


class VideoQuestions:
    """A question about a video of about the requested number of visual tokens, synthetic or from files
    (the model's processor decides the exact count; it is measured and reported)."""

    def __init__(self, model: str, question: str, frame_side: int, frames: FrameSource | None = None) -> None:
        from vllm_std.fixtures.prompts import prompt_token_count, vllm_request
        from vllm_std.fixtures.video import synthetic_frames

        self.question, self.side = question, frame_side
        self._frames = frames or synthetic_frames
        probe = [
            prompt_token_count(
                model, vllm_request(model, question, videos=[self._frames(n, frame_side, frame_side, 0)])
            )
            for n in (4, 8)
        ]
        self.tokens_per_frame = (probe[1] - probe[0]) / 4
        self.text_tokens = probe[0] - 4 * self.tokens_per_frame

    def frames_for(self, visual_tokens: int) -> int:
        return max(2, 2 * round(visual_tokens / self.tokens_per_frame / 2))

    def requests(self, workload: Workload, seed: int) -> Batch:
        frames, side = self.frames_for(workload.visual_tokens), self.side
        tokens = round(self.text_tokens + frames * self.tokens_per_frame)
        return [
            VideoQuestion(self.question, self._frames(frames, side, side, seed + i), tokens, FOLLOW_UPS)
            for i in range(workload.batch)
        ]


def lookup_episode(workload: Workload, seed: int) -> "Episode":
    """The look-up fixture's held-out episode for `seed`: cycling, the fixture's default (a few clips of 12
    words; the answer cycles through the asked one's); one-pass, a video with one clip of every content word
    (the trained model reads such a long chain right), so that its answer up to the clip's end (marker name
    and 48 words: `len(cycle) + 1` tokens) holds no token twice."""
    from vllm_std.fixtures.sparse import CONTENT_WORDS, sparse_episode

    if workload.answers == "one-pass":
        return sparse_episode(workload.visual_tokens, seed, num_clips=1, clip_words=len(CONTENT_WORDS))
    return sparse_episode(workload.visual_tokens, seed)


class LookupQuestions:
    """The trained sparse fixture's task (`vllm_std.fixtures.sparse`): a video of one visual token per tile
    and a question whose answer sits in one marked clip; held-out episodes (`lookup_episode`), one per
    request, a one-pass request's output capped at its answer's end. The follow-ups ask about the video's
    other clips (the model was trained on single questions: what it answers after a first answer is its
    own, and STD is measured on it all the same); a one-pass video has no other clip, and the bench runs it
    with one turn only."""

    tokens_per_frame = 0.5

    def __init__(self, model: str) -> None:
        from vllm_std.fixtures.prompts import prompt_token_count
        from vllm_std.fixtures.sparse import sparse_request

        self.text_tokens = prompt_token_count(model, sparse_request(model, 64)[0]) - 64

    def requests(self, workload: Workload, seed: int) -> Batch:
        from vllm_std.fixtures.sparse import MARKERS, episode_question, question

        episodes = [lookup_episode(workload, seed + i) for i in range(workload.batch)]
        tokens = round(self.text_tokens + workload.visual_tokens)
        one_pass = workload.answers == "one-pass"
        out = []
        for ep in episodes:
            others = [question(MARKERS[m]) for m in ep.markers() if m != ep.marker]
            follow_ups = tuple((others * MAX_TURNS)[: MAX_TURNS - 1]) if others else FOLLOW_UPS
            cap = len(ep.cycle) + 1 if one_pass else None
            out.append(VideoQuestion(*episode_question(ep), tokens, follow_ups, max_tokens=cap))
        return out


def workload_source(
    model: str | None, question: str, frame_side: int, frames: FrameSource | None = None
) -> tuple[str, VideoQuestions | LookupQuestions]:
    """The model and its requests: the tiny random fixture (`None`), the trained look-up fixture (`sparse`,
    or a folder it was retrained into; `sparse-spread`, its variant with spread next-token distributions), or
    the user's model with synthetic videos or `frames`."""
    from vllm_std.fixtures.sparse import recipe_key, sparse_model

    if model == "sparse":
        model = str(sparse_model())
    elif model == "sparse-spread":
        from vllm_std.fixtures.spread import spread_model

        model = str(spread_model())
    if model is not None and recipe_key(model) is not None:
        return model, LookupQuestions(model)
    if model is None:
        from vllm_std.fixtures.models import tiny_model

        model = str(tiny_model("qwen2_vl"))
    return model, VideoQuestions(model, question, frame_side, frames)
