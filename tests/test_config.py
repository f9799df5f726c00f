"""STD settings: defaults, validation with one-line errors, and the trip through vLLM's `additional_config`.

A bad `--speculative-config` must stop `vllm serve` with a single line that names the field, before any
engine starts; a good one must reach every worker unchanged. No vLLM engine is needed for any of this.
"""

import argparse
import json
import types
from typing import Any

import pytest

from vllm_std.config import ADDITIONAL_CONFIG_KEY, METHOD, STDConfig, STDConfigError
from vllm_std.patches import speculative_config_type


def fake_vllm_config(additional_config: dict[str, Any] | None, num_speculative_tokens: int) -> Any:
    """The two attributes `STDConfig.from_vllm_config` reads, without building a real VllmConfig."""
    return types.SimpleNamespace(
        additional_config=additional_config,
        speculative_config=types.SimpleNamespace(num_speculative_tokens=num_speculative_tokens),
    )


# ------------------------------------------------------------------------------------------------- STDConfig


def test_bare_std_gives_the_defaults() -> None:
    """`--speculative-config std` is the documented shorthand for the defaults: the paper's gamma and K, as
    the most STD drafts per round, with each request's draft length chosen by the cost model."""
    cfg = STDConfig.parse("std")
    assert cfg.method == METHOD == "std"
    assert cfg.num_speculative_tokens == 6
    assert cfg.top_k == 1024
    assert cfg.modalities == ("video", "image")
    assert cfg.min_visual_tokens == 1
    assert (cfg.adaptive, cfg.probe_interval, cfg.min_gain, cfg.cost_profile) == (True, 16, 0.1, None)
    assert STDConfig.parse({}) == cfg
    assert STDConfig.parse({"method": "std"}) == cfg


def test_valid_dict() -> None:
    """Every field set, as a user would write it in JSON (lists, not tuples)."""
    raw = {
        "method": "std",
        "num_speculative_tokens": 9,
        "top_k": 256,
        "modalities": ["video"],
        "min_visual_tokens": 0,
        "selection": "streaming",
        "adaptive": False,
        "probe_interval": 4,
        "min_gain": 0,
    }
    cfg = STDConfig.parse(raw)
    got = (cfg.num_speculative_tokens, cfg.top_k, cfg.modalities, cfg.min_visual_tokens, cfg.selection)
    assert got == (9, 256, ("video",), 0, "streaming")
    assert (cfg.adaptive, cfg.probe_interval, cfg.min_gain) == (False, 4, 0.0)


@pytest.mark.parametrize("gamma", [1, 32])
def test_gamma_bounds_are_inclusive(gamma: int) -> None:
    """1 and 32 are the documented limits and both allowed."""
    assert STDConfig.parse({"num_speculative_tokens": gamma}).num_speculative_tokens == gamma


def test_config_is_frozen() -> None:
    """The config is validated once; later mutation would bypass validation."""
    cfg = STDConfig.parse("std")
    with pytest.raises(Exception, match="frozen"):
        cfg.top_k = 5  # type: ignore[misc]


@pytest.mark.parametrize("raw", [[1, 2], 6, None, "STD"])
def test_non_object_is_refused_in_one_line(raw: Any) -> None:
    """Non-objects the offline `speculative_config=` may hold; dicts are tests/test_bad_config.py's."""
    with pytest.raises(STDConfigError) as info:
        STDConfig.parse(raw)
    message = str(info.value)
    assert "JSON object" in message and "\n" not in message
    assert info.value.__cause__ is None


def test_std_config_error_is_a_value_error() -> None:
    """Callers that catch ValueError (vLLM's config plumbing) still catch it."""
    assert issubclass(STDConfigError, ValueError)


@pytest.mark.parametrize(
    ("top_k", "block_size", "blocks"), [(1024, 16, 64), (1000, 16, 63), (1, 128, 1), (129, 128, 2)]
)
def test_top_k_blocks_rounds_up(top_k: int, block_size: int, blocks: int) -> None:
    """K visual tokens become whole KV blocks, rounded up so at least K tokens are kept."""
    assert STDConfig.parse({"top_k": top_k}).top_k_blocks(block_size) == blocks


def test_to_additional_config_excludes_method_and_gamma() -> None:
    """Gamma travels in vLLM's own speculative config; only the STD-only fields go to additional_config."""
    cfg = STDConfig.parse({"num_speculative_tokens": 8, "top_k": 512, "modalities": ["image"]})
    extra = cfg.to_additional_config()
    assert extra == {
        "top_k": 512,
        "modalities": ["image"],
        "min_visual_tokens": 1,
        "selection": "attention",
        "draft_probs": True,
        "adaptive": True,
        "lookup": True,
        "probe_interval": 16,
        "min_gain": 0.1,
        "cost_profile": None,
    }
    assert "method" not in extra and "num_speculative_tokens" not in extra
    assert json.loads(json.dumps(extra)) == extra, "must be JSON-able: vLLM hashes and pickles it"


@pytest.mark.parametrize(
    "raw",
    ["std", {"num_speculative_tokens": 3, "top_k": 64, "modalities": ["video"], "min_visual_tokens": 0}],
)
def test_round_trip_through_vllm_config(raw: Any) -> None:
    """What the API server stores is what the engine core and workers read back."""
    cfg = STDConfig.parse(raw)
    vllm_config = fake_vllm_config(
        {"unrelated": {"x": 1}, ADDITIONAL_CONFIG_KEY: cfg.to_additional_config()}, cfg.num_speculative_tokens
    )
    assert STDConfig.from_vllm_config(vllm_config) == cfg


@pytest.mark.parametrize("additional_config", [None, {}, {"unrelated": 1}])
def test_from_vllm_config_without_std_fields_gives_defaults(additional_config: dict[str, Any] | None) -> None:
    """Missing `additional_config["std"]` falls back to the defaults, with vLLM's gamma."""
    cfg = STDConfig.from_vllm_config(fake_vllm_config(additional_config, 4))
    assert cfg == STDConfig.parse({"num_speculative_tokens": 4})


def test_from_vllm_config_does_not_mutate_additional_config() -> None:
    """vLLM hashes additional_config; reading it must not add gamma into it."""
    stored = {ADDITIONAL_CONFIG_KEY: {"top_k": 32}}
    STDConfig.from_vllm_config(fake_vllm_config(stored, 5))
    assert stored == {ADDITIONAL_CONFIG_KEY: {"top_k": 32}}


def test_from_vllm_config_rejects_a_tampered_additional_config() -> None:
    """Values are re-validated in every process, not trusted."""
    with pytest.raises(STDConfigError, match="top_k"):
        STDConfig.from_vllm_config(fake_vllm_config({ADDITIONAL_CONFIG_KEY: {"top_k": 0}}, 6))


# --------------------------------------------------------------------------------- speculative_config_type


@pytest.mark.parametrize("value", ["std", " std ", "std\n"])
def test_argparse_bare_std(value: str) -> None:
    """The bare word becomes vLLM's dict form."""
    assert speculative_config_type(value) == {"method": "std"}


def test_argparse_valid_std_json_is_returned_parsed() -> None:
    """Validated but otherwise untouched: the engine-side patch does the translation."""
    raw = {"method": "std", "num_speculative_tokens": 4, "top_k": 128}
    assert speculative_config_type(json.dumps(raw)) == raw


@pytest.mark.parametrize("value", ["{bad", "std,", "{'method': 'std'}", ""])
def test_argparse_invalid_json_mentions_std(value: str) -> None:
    """The error points to the two accepted forms, in one line."""
    with pytest.raises(argparse.ArgumentTypeError) as info:
        speculative_config_type(value)
    message = str(info.value)
    assert "std" in message
    assert "JSON" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "raw",
    [
        {"method": "ngram", "num_speculative_tokens": 3},
        {"method": "eagle", "model": "x", "num_speculative_tokens": 2, "top_k": 0},
        {"num_speculative_tokens": 3},
        [1, 2],
    ],
)
def test_argparse_passes_other_methods_through_unchanged(raw: Any) -> None:
    """Other methods are vLLM's business: STD must not validate or alter them."""
    assert speculative_config_type(json.dumps(raw)) == raw
