"""Start-up refusals: what STD cannot serve, decided from the command line and the model's config before
anything loads (`check_engine`, called while vLLM builds its engine config), and from the resolved
compilation settings again in the worker (`refused_compilation`), where vLLM has filled in its defaults.

Every refusal is one line in the same form (`vllm_std.config.unsupported`): what, then the fix.
"""

import logging
from typing import Any

from vllm_std.backends import GPU_BACKENDS
from vllm_std.backends.base import FLOAT_CACHE_DTYPES
from vllm_std.config import STDConfig, unsupported

# Under "vllm." so that vLLM's own logging configuration prints it.
logger = logging.getLogger(f"vllm.{__name__}")


def check_engine(engine_args: Any, model_config: Any, std: STDConfig) -> None:
    """Start-up refusals that the front end can decide, so `vllm serve` stops before loading anything.

    What the drafter cannot serve is decided here from the model's config, so that the worker's own checks
    (`vllm_std.backends.adapter_for`, the adapters' `check_layer`, `RunnerView`), which fire only after the
    weights load and inside vLLM's tracebacks, stay a safety net. Settings that are legal but make STD
    pointless are accepted with a warning.
    """
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise unsupported(
            f"the {current_platform.device_name} platform (STD has attention adapters for vLLM's CPU and "
            "CUDA platforms)",
            "run without STD on this platform (see docs/compatibility.md)",
        )
    backend = _attention_backend(engine_args)
    if current_platform.is_cuda() and backend is not None and backend not in GPU_BACKENDS:
        raise unsupported(
            f"--attention-backend {backend} (STD's GPU adapters: {', '.join(GPU_BACKENDS)})",
            f"pass --attention-backend {GPU_BACKENDS[0]} or run without STD",
        )
    refusal = refused_compilation(engine_args.compilation_config)
    if refusal is not None:
        raise unsupported(*refusal)
    if not model_config.is_multimodal_model:
        raise unsupported(
            f"{model_config.model}, which has no video or image inputs",
            "use another method (e.g. 'ngram') or no speculation",
        )
    if not any(model_config.multimodal_config.get_limit_per_prompt(m) > 0 for m in std.modalities):
        raise unsupported(
            f"a model whose {' and '.join(std.modalities)} inputs are turned off (--language-model-only or "
            "--limit-mm-per-prompt)",
            "allow them, or use another method (e.g. 'ngram') or no speculation",
        )
    refusal = _attention_refusal(model_config)
    if refusal is not None:
        raise unsupported(*refusal)
    for flag in refused_flags(engine_args):
        raise unsupported(flag, f"remove {flag.split()[0]} or run without STD")
    _warn_pointless(std, model_config.max_model_len)


def _attention_backend(engine_args: Any) -> str | None:
    """The backend `--attention-backend` or `--attention-config` asks for, None for vLLM's choice."""
    chosen = engine_args.attention_backend or getattr(engine_args.attention_config, "backend", None)
    name = str(getattr(chosen, "name", chosen or "")).upper()
    return None if name in ("", "AUTO") else name


def refused_flags(engine_args: Any) -> list[str]:
    """The engine flags STD cannot honour among those set, from `EngineArgs` or `vllm serve`'s parsed
    namespace (same attribute names): what a command line alone decides, e.g. in a deployment manifest."""
    return [
        flag
        for flag, present in (
            ("--enable-lora", engine_args.enable_lora),
            ("--kv-transfer-config", engine_args.kv_transfer_config is not None),
            ("--kv-offloading-size", engine_args.kv_offloading_size is not None),
            ("--pipeline-parallel-size > 1", engine_args.pipeline_parallel_size > 1),
            # With expert parallelism the data-parallel ranks hold collectives in every forward pass, which
            # the draft forwards of one rank would leave the others waiting in; plain data parallelism is
            # untested (one server per replica behind a load balancer serves the same).
            ("--data-parallel-size > 1", (engine_args.data_parallel_size or 1) > 1),
            ("--async-scheduling", engine_args.async_scheduling is True),
            # Prefill scoring reads keys back from the cache in its float dtype.
            (
                f"--kv-cache-dtype {engine_args.kv_cache_dtype}",
                engine_args.kv_cache_dtype not in FLOAT_CACHE_DTYPES,
            ),
        )
        if present
    ]


_FULL_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention"})


def _attention_refusal(model_config: Any) -> tuple[str, str] | None:
    """(what, fix) if the model's attention is not one full-attention KV cache read by `CPU_ATTN`.

    The drafter compacts one paged KV cache per layer and reads it with plain causal attention; anything
    else would be refused in the worker (several KV-cache groups, another backend, a layer it would get
    wrong). `sliding_attention` layer types are fine once the window is off: vLLM then reads them in full.
    """
    config, name = model_config.hf_text_config, model_config.model
    if model_config.get_sliding_window() is not None:
        return (
            f"sliding-window attention ({name}: the drafter's views assume full attention)",
            "pass --disable-sliding-window (vLLM then caps the context at the window) or run without STD",
        )
    kinds = set(getattr(config, "layer_types", None) or ()) - _FULL_ATTENTION_LAYER_TYPES
    if kinds or model_config.is_hybrid:
        layers = ", ".join(sorted(kinds)) or "non-attention"
        return f"hybrid models ({name} has {layers} layers besides full attention)", "run without STD"
    if model_config.attention_chunk_size is not None:
        return f"chunked local attention ({name})", "run without STD"
    if model_config.uses_alibi:
        return f"ALiBi attention ({name})", "run without STD"
    if model_config.use_mla:
        return (
            f"multi-head latent attention ({name}: vLLM's MLA backends have no STD adapter yet)",
            "run without STD",
        )
    return None


def _warn_pointless(std: STDConfig, max_model_len: int) -> None:
    """Warns about legal settings under which STD cannot help: a K at or above the context drops no visual
    token (tuning.md: drafting then only loses), a `min_visual_tokens` at or above it drafts nothing."""
    if std.top_k >= max_model_len:
        logger.warning(
            "speculative_config.top_k %d >= max_model_len %d: no request has more visual tokens than K, so "
            "the drafter always reads the full context and STD cannot be faster; lower top_k",
            std.top_k,
            max_model_len,
        )
    if std.min_visual_tokens >= max_model_len:
        logger.warning(
            "speculative_config.min_visual_tokens %d >= max_model_len %d: no request has that many visual "
            "tokens, so none is drafted; lower min_visual_tokens",
            std.min_visual_tokens,
            max_model_len,
        )


def refused_compilation(compilation_config: Any) -> tuple[str, str] | None:
    """(what, fix) if vLLM's CUDA graphs would hide from STD what it hooks: the target's attention calls
    during prefill (scoring) and the KV write (drafting passes its own slots through the forward context).

    With `cudagraph_mode` FULL every batch, prefills included, replays a graph in which attention runs
    without Python; with attention or the KV write fused into the compiled pieces (empty or custom
    `splitting_ops`, attention-quant fusion) the piecewise graphs freeze them too. FULL_AND_PIECEWISE (vLLM's
    default on CUDA) and FULL_DECODE_ONLY run prefills through piecewise graphs or eagerly, with attention
    between the pieces. Settings not yet resolved (None) are vLLM's defaults, which pass."""
    mode = getattr(compilation_config, "cudagraph_mode", None)
    if mode is not None and getattr(mode, "name", str(mode)) == "FULL":
        return (
            "cudagraph_mode FULL (prefills would replay graphs that STD's scoring cannot see)",
            "use the default FULL_AND_PIECEWISE (-cc.cudagraph_mode=FULL_AND_PIECEWISE) or FULL_DECODE_ONLY",
        )
    splitting_ops = getattr(compilation_config, "splitting_ops", None)
    pieces = mode is not None and getattr(mode, "name", "") in ("PIECEWISE", "FULL_AND_PIECEWISE")
    if pieces and splitting_ops is not None and "vllm::unified_attention_with_output" not in splitting_ops:
        return (
            "compilation settings that move attention inside vLLM's CUDA graphs (splitting_ops without "
            "vllm::unified_attention_with_output, or attention-quant fusion)",
            "keep vLLM's default splitting_ops or run without STD",
        )
    return None
