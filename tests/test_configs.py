"""Every file in configs/ is a valid `--speculative-config` value for method "std"."""

import json
from pathlib import Path

import pytest

from vllm_std.config import STDConfig
from vllm_std.patches import speculative_config_type

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path: Path) -> None:
    text = path.read_text()
    assert speculative_config_type(text) == json.loads(text)
    assert STDConfig.parse(json.loads(text)).method == "std"
