"""Engine settings STD cannot honour are refused while vLLM builds its config: before any weight is loaded,
offline with `STDConfigError`, and in `vllm serve` with one line on stderr."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_std.config import STDConfigError

REFUSED = [
    pytest.param({"enable_lora": True}, "--enable-lora", id="lora"),
    pytest.param({"pipeline_parallel_size": 2}, "--pipeline-parallel-size", id="pipeline-parallel"),
    pytest.param(
        {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
        "--kv-transfer-config",
        id="kv-connector",
    ),
]


@pytest.mark.parametrize(("flags", "flag"), REFUSED)
def test_engine_config_refuses(qwen2_vl_path: str, flags: dict[str, Any], flag: str) -> None:
    args = EngineArgs(model=qwen2_vl_path, speculative_config={"method": "std"}, **flags)
    with pytest.raises(STDConfigError) as info:
        args.create_engine_config()
    message = str(info.value)
    assert flag in message and "\n" not in message


def test_engine_config_accepts_the_same_engine_without_the_flag(qwen2_vl_path: str) -> None:
    config = EngineArgs(model=qwen2_vl_path, speculative_config="std").create_engine_config()
    assert config.speculative_config.method == "custom_class"
    assert config.additional_config["std"]["top_k"] == 1024


def _serve_error(model: str, *flags: str) -> tuple[int, str, str]:
    """Runs `vllm serve MODEL FLAGS` until it stops: (exit status, last stderr line, all of stderr)."""
    exe = Path(sys.executable).with_name("vllm")
    out = subprocess.run([exe, "serve", model, *flags], capture_output=True, text=True, timeout=300)
    return out.returncode, out.stderr.strip().splitlines()[-1], out.stderr


def test_serve_refusal_is_one_line(qwen2_vl_path: str) -> None:
    code, last, stderr = _serve_error(qwen2_vl_path, "--speculative-config", "std", "--enable-lora")
    assert code != 0
    assert last == (
        "error: speculative_config.method 'std' does not support --enable-lora: "
        "remove --enable-lora or run without STD"
    )
    assert "Traceback" not in stderr


def test_bad_std_config_stops_serve_with_one_argparse_line(qwen2_vl_path: str) -> None:
    spec = '{"method": "std", "num_speculative_tokens": 0}'
    code, last, stderr = _serve_error(qwen2_vl_path, "--speculative-config", spec)
    assert code == 2
    assert "speculative_config.num_speculative_tokens" in last and "1 to 32" in last
    assert "Traceback" not in stderr
