"""`vllm-std doctor`: proves that an environment works, not only that it installed."""

import importlib
import importlib.metadata
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vllm_std.compat import SUPPORTED_VLLM_VERSIONS, installed_vllm_version


def _vllm_version() -> str:
    version = installed_vllm_version()
    if version not in SUPPORTED_VLLM_VERSIONS:
        raise RuntimeError(
            f"vLLM {version} is installed; vllm-std supports {', '.join(SUPPORTED_VLLM_VERSIONS)}"
        )
    return version


def _vllm_distribution() -> str:
    return importlib.metadata.version("vllm")


def _processors() -> str:
    names = [
        "Qwen2VLProcessor",
        "Qwen2_5_VLProcessor",
        "LlavaOnevisionProcessor",
        "Qwen2VLForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
    ]
    transformers = importlib.import_module("transformers")
    for name in names:
        getattr(transformers, name)
    importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    return f"transformers {transformers.__version__}: {', '.join(names)}"


def _plugin() -> str:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    matches = [ep.value for ep in eps if ep.name == "std"]
    if matches != ["vllm_std.plugin:register"]:
        raise RuntimeError(f"entry point 'std' in vllm.general_plugins is {matches}")
    return matches[0]


def _vllm_cli() -> str:
    exe = str(Path(sys.executable).with_name("vllm"))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return f"{exe} --version -> {out.stdout.strip().splitlines()[-1]}"


CHECKS: dict[str, Callable[[], str]] = {
    "vllm version": _vllm_version,
    "vllm distribution metadata": _vllm_distribution,
    "torchvision + transformers processors": _processors,
    "vllm-std plugin entry point": _plugin,
    "vllm console script": _vllm_cli,
}


def run() -> int:
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"[ok]   {name}: {check()}")
        except Exception as e:
            failed += 1
            print(f"[FAIL] {name}: {type(e).__name__}: {e}")
    return 1 if failed else 0
