"""Make the registry's torchvision importable beside a CPU-only torch.

The torchvision wheels on PyPI for x86_64 are CUDA builds: their `_C` extension cannot load next to
`torch==2.13.0+cpu`, and `torchvision/_meta_registrations.py` then fails at import on
`register_fake("torchvision::nms")` because that operator was never defined. transformers' Qwen2-VL and
LLaVA-OneVision image and video processors need only torchvision's pure-Python transforms, so defining the
two operator schemas before torchvision is imported is enough. The operators get no kernel: calling
`torchvision.ops.nms` still fails, with torch's own "no kernel" error.

This module is imported from a `.pth` file at interpreter start-up, so it must stay cheap: it only puts a
finder on `sys.meta_path`; torch is imported when torchvision itself is.
"""

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    """Defines the torchvision operator schemas on the first import of torchvision, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for name, schema in _SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, name):
                torch.library.define(f"torchvision::{name}", schema)
        return None


def install() -> None:
    if not any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionOpsFinder())
