"""STD settings: validated once, at engine start-up, and carried to every process in `additional_config`.

Users write `--speculative-config '{"method": "std", "num_speculative_tokens": 6, "top_k": 1024}'` (or
the bare `std` for the defaults). vLLM knows no method "std": `vllm_std.patches` translates it, before
vLLM validates anything, into vLLM's own `custom_class` method pointing at `STDProposer`, and stores the
STD fields in `VllmConfig.additional_config["std"]`, which vLLM hashes and pickles to every process.
"""

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

METHOD = "std"
ADDITIONAL_CONFIG_KEY = "std"
PROPOSER_CLASS = "vllm_std.proposer.STDProposer"

Modality = Literal["video", "image"]
Selection = Literal["attention", "streaming", "recent_visual", "random"]


class STDConfigError(ValueError):
    """A bad STD setting, phrased as one line that names the field and what is allowed."""


def unsupported(what: str, fix: str) -> STDConfigError:
    """Refuses what STD cannot serve, in the form every start-up check shares: what, then the fix."""
    return STDConfigError(f"speculative_config.method 'std' does not support {what}: {fix}")


class STDConfig(BaseModel):
    """The `--speculative-config` fields of method "std" (vLLM's own name for gamma is kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: Literal["std"] = METHOD
    num_speculative_tokens: Annotated[int, Field(ge=1, le=32)] = 6
    """gamma: the most tokens drafted per round (paper: best around 6-9 on GPUs); with `adaptive` off,
    every drafting request drafts exactly this many."""
    top_k: Annotated[int, Field(ge=1)] = 1024
    """K: visual tokens each layer's drafter keeps, rounded up to whole KV blocks."""
    modalities: Annotated[tuple[Modality, ...], Field(min_length=1)] = ("video", "image")
    """Which multimodal items count as visual (their placeholder tokens are the candidates for dropping)."""
    min_visual_tokens: Annotated[int, Field(ge=0)] = 1
    """Requests with fewer visual tokens than this get no drafts (they decode as without speculation)."""
    selection: Selection = "attention"
    """How each layer's K visual blocks are chosen: "attention" is STD (the question's attention at prefill).
    The others are baselines, so that a benchmark compares selection policies with everything else equal:
    "streaming" is the paper's StreamingLLM drafter (the attention-sink block plus the most recent blocks of
    the whole context, as many blocks as STD keeps, text or not); "recent_visual" keeps all text and the K
    most recent visual blocks; "random" keeps all text and K random visual blocks per layer."""

    draft_probs: bool = True
    """For sampled requests (temperature > 0), draw each draft from the drafter's own distribution (the
    request's temperature, top-k and top-p applied) and verify it against that distribution: exact, and
    accepted far more often than an argmax draft, which vLLM verifies as certain. Greedy requests are not
    affected. Off: argmax drafts for every request."""
    adaptive: bool = True
    """Choose each request's gamma (0 to num_speculative_tokens) at every step from the cost model and the
    request's acceptance so far, drafting nothing where no gamma is predicted to beat plain decoding."""
    lookup: bool = True
    """With `adaptive`, a request may draft, instead of with the sparse drafter, the tokens that followed the
    same few tokens earlier in its own prompt or output (as vLLM's ngram method does): such a draft costs no
    draft step, so where answers repeat or quote it is the cheaper draft. The cost model chooses between the
    two per request and round, from each one's acceptance so far. Off: sparse drafts only."""
    probe_interval: Annotated[int, Field(ge=1)] = 16
    """With `adaptive`, a request that stopped drafting probes (drafts the fewest tokens that would pay if all
    were accepted) after this many steps, to notice when its acceptance has come back."""
    min_gain: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """With `adaptive`, the predicted speed-up over plain decoding that drafting must exceed: 0.1 drafts only
    where the cost model predicts at least 10 % more tokens per second, about its error on a busy CPU, so
    that a predicted gain of a few percent (as likely a loss) does not slow a request down."""
    cost_profile: str | None = None
    """With `adaptive`, a saved cost profile (`vllm-std calibrate`) instead of the short measurement of
    draft, dense and verify steps that the workers otherwise make at start-up."""

    @field_validator("modalities", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        """JSON has lists, not tuples; everything else is validated strictly (no `true` for an int)."""
        return tuple(value) if isinstance(value, list) else value

    @field_validator("cost_profile")
    @classmethod
    def _profile_loads(cls, value: str | None) -> str | None:
        """A profile that will not load is refused now, not when the workers start."""
        if value is not None:
            from vllm_std.cost_model import CostModel

            try:
                CostModel.load(value)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"cannot load it ({type(e).__name__}: {e})") from None
        return value

    def top_k_blocks(self, block_size: int) -> int:
        return -(-self.top_k // block_size)

    @classmethod
    def parse(cls, raw: Any) -> "STDConfig":
        """Validates a dict (or the bare string "std"); raises STDConfigError on the first bad field."""
        if raw == METHOD:
            raw = {}
        if not isinstance(raw, dict):
            raise STDConfigError(f"speculative config for method 'std' must be a JSON object, got {raw!r}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise STDConfigError(_one_line(e)) from None

    def to_additional_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"method", "num_speculative_tokens"})

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "STDConfig":
        """The config as the engine resolved it (inside engine core and workers)."""
        fields = dict((vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {}))
        fields["num_speculative_tokens"] = vllm_config.speculative_config.num_speculative_tokens
        return cls.parse(fields)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "speculative_config"
    if first["type"] == "extra_forbidden":
        known = sorted(STDConfig.model_fields)
        close = difflib.get_close_matches(field, known, n=1)
        fix = (
            f"did you mean '{close[0]}'?"
            if close
            else "remove it (STD drafts with the target model itself and takes no draft-model settings)"
        )
        unknown = f"speculative_config: unknown field '{field}' for method 'std'"
        return f"{unknown}; {fix}; known fields: {', '.join(known)}"
    message = _MESSAGES.get(first["type"], first["msg"].removeprefix("Value error, "))
    got = first.get("input")
    got = list(got) if isinstance(got, tuple) else got
    allowed = _ALLOWED.get(field.split(".")[0], "")
    hint = f"; allowed: {allowed}" if allowed else ""
    return f"speculative_config.{field}: {message} (got {got!r}){hint}"


# `modalities` arrives as a JSON list and is validated as the tuple it became: speak of lists.
_MESSAGES = {"tuple_type": "Input should be a list", "too_short": "Input should not be empty"}
_ALLOWED = {
    "num_speculative_tokens": "an integer from 1 to 32",
    "top_k": "an integer >= 1 (visual tokens kept per layer)",
    "modalities": 'a non-empty list of "video" and/or "image"',
    "min_visual_tokens": "an integer >= 0",
    "method": '"std"',
    "selection": '"attention" (STD), or the baselines "streaming", "recent_visual" and "random"',
    "adaptive": "true or false",
    "draft_probs": "true or false",
    "lookup": "true or false",
    "probe_interval": "an integer >= 1 (steps)",
    "min_gain": "a number from 0 to 1 (0.1: draft only where 10 % faster is predicted)",
    "cost_profile": "the path of a JSON file written by `vllm-std calibrate`",
}
