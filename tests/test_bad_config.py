"""Bad STD settings, as users write them, each stopped at start-up with one line that names the field and the
fix: wrong types and ranges, unknown fields, engine flags STD cannot honour, and models it cannot serve.

Every row goes through what a user runs: offline, `EngineArgs(...).create_engine_config()` (what `LLM(...)`
does before it loads anything); for `--speculative-config` values also vLLM's own `vllm serve` parser. A few
rows start the real `vllm serve`, which must exit with the same line and no traceback. The refused models
are config.json-only checkpoints: a refusal that needed the weights would fail here, not load them.
"""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from helpers import serve_arg_parser
from vllm.engine.arg_utils import EngineArgs

from vllm_std.config import STDConfigError
from vllm_std.engine_checks import logger as checks_logger

GAMMA_FIELD = "speculative_config.num_speculative_tokens"
GAMMA = "allowed: an integer from 1 to 32"
TOP_K = "allowed: an integer >= 1 (visual tokens kept per layer)"
MODALITIES = 'allowed: a non-empty list of "video" and/or "image"'
KNOWN = (
    "known fields: adaptive, cost_profile, draft_probs, lookup, method, min_gain, min_visual_tokens, "
    "modalities, num_speculative_tokens, probe_interval, selection, top_k"
)
PROFILE = "allowed: the path of a JSON file written by `vllm-std calibrate`"
NOT_A_PROFILE = str(Path(__file__).parents[1] / "pyproject.toml")
NOT_JSON = "use a JSON object or the bare 'std'"
WITHOUT_STD = "run without STD"


@dataclasses.dataclass(frozen=True)
class Bad:
    """One mistake: the model, `--speculative-config` and other engine settings, and what the line must say.

    `stage` is where `vllm serve` stops it: "argparse" for the STD fields themselves (exit status 2), "engine"
    for what needs the model or the other flags (refused while vLLM builds its config). `cli` rows are raw
    command-line text that only the parser sees.
    """

    id: str
    spec: Any
    names: str  # the field, flag or feature the message must name
    fix: str  # what it must tell the user to do
    stage: Literal["argparse", "engine"] = "engine"
    model: str = "qwen2_vl"  # a key of the `checkpoints` fixture
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    cli: bool = False
    platform: str | None = None  # pretend vLLM runs on this device instead of the CPU

    @property
    def argument(self) -> str:
        """The `--speculative-config` argument as typed on the command line."""
        return self.spec if self.cli or self.spec == "std" else json.dumps(self.spec)


def std(**fields: Any) -> dict[str, Any]:
    return {"method": "std", **fields}


def bad_value(row_id: str, spec: Any, names: str, fix: str, cli: bool = False) -> Bad:
    """A `--speculative-config` that is wrong by itself: argparse refuses it."""
    return Bad(row_id, spec, names, fix, stage="argparse", cli=cli)


ROWS = [
    # Wrong types and ranges.
    bad_value("gamma-word", std(num_speculative_tokens="six"), GAMMA_FIELD, GAMMA),
    bad_value("gamma-null", std(num_speculative_tokens=None), GAMMA_FIELD, GAMMA),
    bad_value("gamma-zero", std(num_speculative_tokens=0), GAMMA_FIELD, GAMMA),
    bad_value("gamma-negative", std(num_speculative_tokens=-3), GAMMA_FIELD, GAMMA),
    bad_value("gamma-too-large", std(num_speculative_tokens=64), GAMMA_FIELD, GAMMA),
    bad_value("top-k-fraction", std(top_k=1.5), "speculative_config.top_k", TOP_K),
    bad_value("top-k-bool", std(top_k=True), "speculative_config.top_k", TOP_K),
    bad_value("top-k-string", std(top_k="1024"), "speculative_config.top_k", TOP_K),
    bad_value("top-k-zero", std(top_k=0), "speculative_config.top_k", TOP_K),
    bad_value("top-k-negative", std(top_k=-256), "speculative_config.top_k", TOP_K),
    bad_value("modalities-string", std(modalities="video"), "modalities: Input should be a list", MODALITIES),
    bad_value("modalities-empty", std(modalities=[]), "modalities: Input should not be empty", MODALITIES),
    bad_value("modalities-audio", std(modalities=["audio"]), "speculative_config.modalities", MODALITIES),
    bad_value(
        "min-visual-negative", std(min_visual_tokens=-1), "min_visual_tokens", "allowed: an integer >= 0"
    ),
    bad_value("method-case", {"method": "STD"}, "speculative_config.method", 'allowed: "std"'),
    bad_value(
        "selection-unknown",
        std(selection="top_k"),
        "speculative_config.selection",
        'allowed: "attention" (STD)',
    ),
    bad_value("adaptive-word", std(adaptive="yes"), "speculative_config.adaptive", "allowed: true or false"),
    bad_value("lookup-word", std(lookup="off"), "speculative_config.lookup", "allowed: true or false"),
    bad_value(
        "draft-probs-number", std(draft_probs=1), "speculative_config.draft_probs", "allowed: true or false"
    ),
    bad_value(
        "probe-zero", std(probe_interval=0), "speculative_config.probe_interval", "allowed: an integer >= 1"
    ),
    bad_value(
        "min-gain-percent", std(min_gain=10), "speculative_config.min_gain", "allowed: a number from 0 to 1"
    ),
    bad_value(
        "profile-missing",
        std(cost_profile="/nonexistent/profile.json"),
        "cost_profile: cannot load it (FileNotFoundError",
        PROFILE,
    ),
    bad_value(
        "profile-not-a-profile", std(cost_profile=NOT_A_PROFILE), "cost_profile: cannot load it", PROFILE
    ),
    # Unknown fields: a typo, and vLLM's draft-model fields, which STD has no use for.
    bad_value("typo-topk", std(topk=1024), "unknown field 'topk'", f"did you mean 'top_k'?; {KNOWN}"),
    bad_value(
        "vllm-field-model", std(model="Qwen/Qwen2-VL-2B-Instruct"), "unknown field 'model'", "remove it"
    ),
    bad_value(
        "vllm-field-draft-tp", std(draft_tensor_parallel_size=1), "'draft_tensor_parallel_size'", "remove it"
    ),
    # Not JSON: a trailing comma, and a shell that ate the double quotes of an unquoted argument.
    bad_value(
        "json-trailing-comma", '{"method": "std", "top_k": 1024,}', "--speculative-config", NOT_JSON, cli=True
    ),
    bad_value("json-unquoted", "{method:std}", "--speculative-config", NOT_JSON, cli=True),
    # Models STD cannot serve, and visual inputs turned off.
    Bad("text-only-model", "std", "no video or image inputs", "use another method", model="text_only"),
    Bad(
        "sliding-window",
        "std",
        "sliding-window attention",
        "pass --disable-sliding-window",
        model="sliding_window",
    ),
    Bad("hybrid-model", "std", "hybrid models", WITHOUT_STD, model="hybrid"),
    Bad("chunked-local-attention", "std", "chunked local attention", WITHOUT_STD, model="chunked"),
    Bad("alibi", "std", "ALiBi attention", WITHOUT_STD, model="alibi"),
    Bad("mla", "std", "multi-head latent attention", WITHOUT_STD, model="mla"),
    Bad(
        "other-platform",
        "std",
        "the rocm platform",
        "run without STD on this platform",
        platform="rocm",
    ),
    Bad(
        "tree-attention-backend",
        "std",
        "--attention-backend TREE_ATTN",
        "pass --attention-backend FLASH_ATTN",
        engine={"attention_backend": "TREE_ATTN"},
        platform="cuda",
    ),
    Bad(
        "full-cuda-graphs",
        "std",
        "cudagraph_mode FULL",
        "-cc.cudagraph_mode=FULL_AND_PIECEWISE",
        engine={"compilation_config": {"cudagraph_mode": "FULL"}},
        platform="cuda",
    ),
    Bad(
        "language-model-only",
        "std",
        "video and image inputs are turned off",
        "allow them",
        engine={"language_model_only": True},
    ),
    Bad(
        "videos-off-video-modality",
        std(modalities=["video"]),
        "video inputs are turned off",
        "allow them",
        engine={"limit_mm_per_prompt": {"video": 0}},
    ),
    # Engine features STD cannot honour.
    Bad(
        "lora",
        "std",
        "--enable-lora",
        "remove --enable-lora or run without STD",
        engine={"enable_lora": True},
    ),
    Bad(
        "pipeline-parallel",
        "std",
        "--pipeline-parallel-size > 1",
        "remove --pipeline-parallel-size",
        engine={"pipeline_parallel_size": 2},
    ),
    Bad(
        "data-parallel",
        "std",
        "--data-parallel-size > 1",
        "remove --data-parallel-size",
        engine={"data_parallel_size": 2},
    ),
    Bad(
        "kv-connector",
        "std",
        "--kv-transfer-config",
        "remove --kv-transfer-config",
        engine={"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
    ),
    Bad(
        "kv-offloading",
        "std",
        "--kv-offloading-size",
        "remove --kv-offloading-size",
        engine={"kv_offloading_size": 1.0},
    ),
    Bad(
        "async-scheduling",
        "std",
        "--async-scheduling",
        "remove --async-scheduling",
        engine={"async_scheduling": True},
    ),
    Bad(
        "fp8-kv-cache",
        "std",
        "--kv-cache-dtype fp8",
        "remove --kv-cache-dtype",
        engine={"kv_cache_dtype": "fp8"},
    ),
    Bad(
        "4-bit-kv-cache",
        "std",
        "--kv-cache-dtype int4_per_token_head",
        "remove --kv-cache-dtype",
        engine={"kv_cache_dtype": "int4_per_token_head"},
    ),
]
BY_ID = {row.id: row for row in ROWS}

TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
}


@pytest.fixture(scope="module")
def checkpoints(qwen2_vl_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The fixture model, and config-only checkpoints of the kinds STD refuses (no weights are read first)."""
    qwen2_vl = json.loads((Path(qwen2_vl_path) / "config.json").read_text())

    def qwen2_vl_with(**text: Any) -> dict[str, Any]:
        return {**qwen2_vl, "text_config": {**qwen2_vl["text_config"], **text}}

    configs = {
        "text_only": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **TEXT},
        "sliding_window": qwen2_vl_with(use_sliding_window=True, sliding_window=4096, max_window_layers=0),
        "chunked": qwen2_vl_with(attention_chunk_size=1024),  # Llama 4's local attention
        "alibi": qwen2_vl_with(alibi=True),
        "hybrid": {  # Qwen3.5: linear-attention (Gated DeltaNet) layers between attention layers
            "architectures": ["Qwen3_5ForConditionalGeneration"],
            "model_type": "qwen3_5",
            "text_config": {**TEXT, "head_dim": 32, "layer_types": ["linear_attention", "full_attention"]},
            "vision_config": {
                "depth": 1,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 2,
                "out_hidden_size": 128,
            },
        },
        "mla": {  # Kimi-VL: a DeepSeek-V3 language model, multi-head latent attention
            "architectures": ["KimiVLForConditionalGeneration"],
            "model_type": "kimi_vl",
            "text_config": {
                **TEXT,
                "model_type": "deepseek_v3",
                "kv_lora_rank": 32,
                "q_lora_rank": None,
                "qk_rope_head_dim": 16,
                "qk_nope_head_dim": 16,
                "v_head_dim": 32,
            },
            "vision_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        },
    }
    paths = {"qwen2_vl": qwen2_vl_path}
    for name, config in configs.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps(config))
        paths[name] = str(folder)
    return paths


@pytest.fixture(scope="module")
def parser() -> Any:
    return serve_arg_parser()


def refusal(row: Bad, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> STDConfigError:
    """The error the offline path raises for `row`."""
    if row.platform is not None:
        from vllm.platforms import current_platform

        monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
        monkeypatch.setattr(current_platform, "is_cuda", lambda: row.platform == "cuda")
        monkeypatch.setattr(current_platform, "device_name", row.platform)
    args = EngineArgs(model=checkpoints[row.model], speculative_config=row.spec, **row.engine)
    with pytest.raises(STDConfigError) as info:
        args.create_engine_config()
    return info.value


def assert_says(line: str, row: Bad) -> None:
    assert "\n" not in line
    assert row.names in line, f"does not name {row.names!r}: {line}"
    assert row.fix in line, f"does not say {row.fix!r}: {line}"


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS if not r.cli])
def test_refused_offline_in_one_line(
    row: Bad, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LLM(...)` and `create_engine_config()` raise one line, not a chained pydantic or vLLM report."""
    error = refusal(row, checkpoints, monkeypatch)
    message = str(error)
    assert message.startswith("speculative_config")
    assert_says(message, row)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS if r.stage == "argparse"])
def test_refused_by_the_serve_parser_in_one_line(row: Bad, parser: Any) -> None:
    """`vllm serve` stops at argparse: exit status 2 and one `error:` line after the usage."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as info:
        parser.parse_args(["MODEL", "--speculative-config", row.argument])
    assert info.value.code == 2
    last = stderr.getvalue().strip().splitlines()[-1]
    assert last.startswith("vllm serve: error: argument --speculative-config")
    assert_says(last, row)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS if r.stage == "engine"])
def test_engine_rows_pass_the_parser(row: Bad, parser: Any) -> None:
    """What needs the model or the other flags is the engine config's to refuse: argparse lets it through."""
    assert parser.parse_args(["MODEL", "--speculative-config", row.argument]).speculative_config is not None


# ------------------------------------------------------------------------------------------- vllm serve

# One row per place the CLI stops: argparse (status 2), an engine flag, and a model the worker used to refuse
# only after loading the weights, inside vLLM's tracebacks.
SERVED = [
    pytest.param("gamma-zero", (), 2, id="gamma-zero", marks=pytest.mark.slow),
    pytest.param("lora", ("--enable-lora",), 1, id="lora", marks=pytest.mark.slow),
    pytest.param("hybrid-model", (), 1, id="hybrid-model"),
]


@pytest.mark.parametrize(("row_id", "flags", "status"), SERVED)
def test_serve_exits_with_the_one_line(
    row_id: str,
    flags: tuple[str, ...],
    status: int,
    checkpoints: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real CLI prints the offline message as its last line, with no traceback, and starts nothing."""
    row = BY_ID[row_id]
    message = str(refusal(row, checkpoints, monkeypatch))
    exe = Path(sys.executable).with_name("vllm")
    cmd = [exe, "serve", checkpoints[row.model], "--speculative-config", row.argument, *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == status, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(("error: ", "vllm serve: error: ")) and last.endswith(message)
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------- accepted, with a warning


ACCEPTED = [
    pytest.param("qwen2_vl", "std", {}, None, id="defaults"),
    pytest.param(
        "qwen2_vl",
        std(top_k=8192),
        {"max_model_len": 4096},
        "top_k 8192 >= max_model_len 4096",
        id="top-k-above-context",
    ),
    pytest.param(
        "qwen2_vl",
        std(min_visual_tokens=4096),
        {"max_model_len": 4096},
        "min_visual_tokens 4096 >= max_model_len 4096",
        id="min-visual-above-context",
    ),
    # The sliding-window refusal's fix works: vLLM then caps the context at the window.
    pytest.param(
        "sliding_window", "std", {"disable_sliding_window": True}, None, id="sliding-window-disabled"
    ),
    # Videos off, images on: STD still has visual tokens to drop.
    pytest.param("qwen2_vl", "std", {"limit_mm_per_prompt": {"video": 0}}, None, id="images-only"),
]


@pytest.mark.parametrize(("model", "spec", "engine", "warning"), ACCEPTED)
def test_accepted(
    model: str,
    spec: Any,
    engine: dict[str, Any],
    warning: str | None,
    checkpoints: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Legal settings start; one that makes STD pointless says so in one warning line that says what to do."""
    messages: list[str] = []
    monkeypatch.setattr(checks_logger, "warning", lambda message, *args: messages.append(message % args))
    config = EngineArgs(model=checkpoints[model], speculative_config=spec, **engine).create_engine_config()
    assert config.speculative_config.method == "custom_class"
    assert "std" in config.additional_config
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warning in messages[0] and "; lower " in messages[0]
        assert "\n" not in messages[0]
